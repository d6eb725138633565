"""A login's search and bind, sent pre-encoded through an ldap3 connection.

:class:`FastRequests` is what :class:`~mailhub.directory.ldap.LDAPClient`
calls on its worker threads when :data:`FAST_REQUESTS` holds: it records the
search once from ldap3 (a template, see :mod:`.ber`), then sends each
login's search and bind as bytes and lets ldap3 read the answers. Every
reach into ldap3's internals is here; the package docstring lists them.
"""

from __future__ import annotations

import threading
from typing import Any

import ldap3
from ldap3 import SUBTREE, Connection
from ldap3.core.exceptions import LDAPSocketSendError
from ldap3.strategy.sync import SyncStrategy
from twisted.logger import Logger

from mailhub.config import LDAPSection
from mailhub.directory.ldap_wire import ber

#: The ldap3 release whose internals this package was written and tested
#: against; pyproject.toml pins the same (tests/directory/test_ldap_pin.py).
LDAP3_VERSION = "2.9.1"
#: The login the search template is recorded for: plain letters, so ldap3
#: and RFC 4515 escaping leave it as it is, and found nowhere else.
TEMPLATE_MARKER = "mailhubLoginMarker7f3a9c1e"
#: Whether this ldap3 is the one the pre-encoded requests go through.
FAST_REQUESTS = ldap3.__version__ == LDAP3_VERSION and all(
    hasattr(SyncStrategy, name)
    for name in ("post_send_search", "post_send_single_response", "get_response"))

_UNTRIED = object()


class FastRequests:
    """The pre-encoded search and bind of one LDAP client (worker threads only)."""

    log = Logger()

    def __init__(self, settings: LDAPSection) -> None:
        self.settings = settings
        self._template: Any = _UNTRIED
        self._lock = threading.Lock()

    @property
    def template(self) -> ber.SearchTemplate | None:
        """The recorded search template; None until recorded, or when unusable."""
        template = self._template
        return template if isinstance(template, ber.SearchTemplate) else None

    def search_template(self, conn: Connection) -> ber.SearchTemplate | None:
        """The template, recorded once from ldap3 on ``conn``; None if unusable."""
        if self._template is _UNTRIED and self._lock.acquire(blocking=False):
            try:
                if self._template is _UNTRIED:
                    self._template = self._record(conn)
            finally:
                self._lock.release()
        return self.template

    def _record(self, conn: Connection) -> ber.SearchTemplate | None:
        s = self.settings
        expected = s.user_filter.count("{login}")
        if not expected:
            return None
        recorder = ber.Recorder(conn.socket)
        conn.socket = recorder
        try:
            # The marker is plain letters: RFC 4515 escaping leaves it as it is.
            conn.search(s.base_dn, s.user_filter.replace("{login}", TEMPLATE_MARKER), SUBTREE,
                        attributes=s.attributes, size_limit=2)
        finally:
            if conn.socket is recorder:
                conn.socket = recorder._sock
        try:
            if len(recorder.sent) != 1:
                raise ber.BERError("%d messages sent for one search" % len(recorder.sent))
            return ber.SearchTemplate(recorder.sent[0], TEMPLATE_MARKER, expected)
        except ber.BERError as e:
            self.log.info("LDAP logins use ldap3's own request encoding: {why}", why=str(e))
            return None

    def search(self, conn: Connection, login: str) -> bool:
        """Send ``login``'s search pre-encoded; ldap3 reads the answer into ``conn``.

        False when ldap3's own path must do it (no template, a login the
        template cannot hold, referrals or empty attributes wanted, or a
        ranged attribute in the answer that ldap3 must fetch the rest of).
        """
        template = self.search_template(conn)
        if template is None or conn.auto_referrals or conn.empty_attributes:
            return False
        message_id = conn.server.next_message_id()
        try:
            message = template.message(message_id, login)
        except UnicodeEncodeError:
            return False  # ldap3's path decides what such a login is
        with conn.connection_lock:
            auto_range, conn.auto_range = conn.auto_range, False
            try:
                _send(conn, message_id, message, "searchRequest")
                conn.strategy.post_send_search(message_id)
            finally:
                conn.auto_range = auto_range
        return not (auto_range and _ranged(conn.response))

    def bind(self, conn: Connection, dn: str, password: bytes) -> None:
        """Send a simple bind as ``dn`` (``password`` SASLprepped); ldap3 reads the result."""
        message_id = conn.server.next_message_id()
        with conn.connection_lock:
            _send(conn, message_id, ber.bind_message(message_id, dn, password), "bindRequest")
            conn.strategy.post_send_single_response(message_id)


def _ranged(response: Any) -> bool:
    """Whether an entry holds a ranged attribute (``member;range=0-1499``)."""
    return any(";range=" in name for entry in response or ()
               for name in entry.get("raw_attributes") or ())


def _send(conn: Connection, message_id: int, message: bytes, kind: str) -> None:
    """Send a pre-encoded request on ``conn`` so that ldap3 reads its answer.

    ldap3 answers only message ids it has outstanding; the entry it keeps
    holds no request detail (no password), which nothing reads with
    referrals, auto-range and empty attributes turned off.
    """
    strategy = conn.strategy
    outstanding = getattr(strategy, "_outstanding", None)
    if conn.closed or conn.socket is None or outstanding is None:
        raise LDAPSocketSendError("the connection is closed")
    request = {"type": kind}
    conn.request = request
    outstanding[message_id] = request
    try:
        conn.socket.sendall(message)
    except OSError:
        outstanding.pop(message_id, None)
        raise
