"""Quarantine: the LDAP login fast path, which reaches inside ldap3.

Why it exists. Profiling MailStore ``cmd=auth`` showed that most of
mailhub's own CPU per login went to ldap3 building and BER-encoding its two
requests (the search for the entry, the bind as it) with pyasn1: more than
reading the answers and more than the whole HTTP side. Both requests are
fixed in shape, so :mod:`.ber` encodes them directly and :mod:`.requests`
sends them through ldap3's own connection, which still owns the socket,
TLS, message ids and the decoding of every answer. ``bench/mailstore``
measures the difference (doc/performance.rst).

What it relies on. Not ldap3's public API, but these internals of ldap3
2.9.1, the version ``pyproject.toml`` pins exactly:

- ``Connection.socket`` (replaced for a moment to record the template),
  ``Connection.connection_lock``, ``Connection.request``, ``auto_range``,
  ``auto_referrals`` and ``empty_attributes``;
- ``Server.next_message_id()``;
- ``SyncStrategy._outstanding`` (the message ids it waits answers for),
  ``post_send_search`` and ``post_send_single_response``;
- ``ldap3.protocol.sasl.sasl.validate_simple_password`` (SASLprep).

How it is kept honest. ``tests/directory/test_ldap_wire.py`` records what
goes out on the socket against a real slapd and checks it is byte for byte
what ldap3 sends for the same login and password (hypothesis), and that both
paths give the same answers; ``tests/directory/test_ldap_ber.py`` checks the
encoder against pyasn1; ``tests/directory/test_ldap_pin.py`` fails as soon
as the installed ldap3 is not the pinned one, so an upgrade is a deliberate
change that re-runs those tests. With any other ldap3 version at run time,
:data:`FAST_REQUESTS` is False and every request takes ldap3's own path.

Nothing outside :mod:`mailhub.directory.ldap` uses this package.
"""

from __future__ import annotations

from mailhub.directory.ldap_wire.requests import (
    FAST_REQUESTS, LDAP3_VERSION, TEMPLATE_MARKER, FastRequests,
)

__all__ = ["FAST_REQUESTS", "LDAP3_VERSION", "TEMPLATE_MARKER", "FastRequests"]
