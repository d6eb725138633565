"""The manual names what the code does: facts read from the code, checked in doc/."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "doc"


def login_sources() -> set[str]:
    """Every ``source`` a ``login:*`` event can carry: the surface of each
    password login (``Auth.login(surface, ...)``, ``PasswordLogin(auth, surface, ...)``)."""
    found: set[str] = set()
    for path in (ROOT / "mailhub").rglob("*.py"):
        text = path.read_text()
        found.update(re.findall(r"\.login\(\s*\"(\w+)\"", text))
        found.update(re.findall(r"PasswordLogin\(\s*\w+,\s*\"(\w+)\"", text))
    return found


def test_every_login_source_is_documented() -> None:
    sources = login_sources()
    assert {"mailstore", "events", "dav"} <= sources, sources
    catalogue = (DOC / "pubsub.rst").read_text()
    row = catalogue[catalogue.index("``login:success``, ``login:failure``"):]
    row = row[:row.index("* - ``token:rotated``")]
    auth = (DOC / "auth.rst").read_text()
    for source in sorted(sources):
        assert '"%s"' % source in row, "doc/pubsub.rst's catalogue omits %r" % source
        assert '``"%s"``' % source in auth, "doc/auth.rst omits %r" % source


def test_the_ox_driver_metadata_is_described_as_server_metadata() -> None:
    for path in (DOC / "push.rst", ROOT / "mailhub/data/dovecot/10-mailhub-push.conf",
                 ROOT / "mailhub/data/dovecot/10-mailhub-push-2.4.conf",
                 ROOT / "mailhub/push/dovecot_config.py"):
        text = path.read_text()
        assert "server METADATA" in text, path
        assert "INBOX has" not in text, path
        assert '-s ""' in text or '-s \\"\\"' in text, path
