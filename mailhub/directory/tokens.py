"""Tokens as the directory holds them: the site token and named, scoped tokens.

Plain Python, no I/O. GroupServer has one token per site, good for every
hook; mailhub keeps it (the *site token*, name ``site`` in listings) and adds
*named tokens*, each good only on the hooks it was made for (its *scopes*).
Either kind may keep its previous secret for an *overlap* after a rotation:
both are accepted until the overlap ends, then only the new one.

Scopes are the hooks' URL paths without ``/`` and ``.json``
(``gs-group-member-add``) and ``calendar`` for the calendar collector's
endpoint (``POST /collector/v1/calendar``).
"""

from __future__ import annotations

import hmac
import re

import attrs

#: The name under which the site token is listed (a named token may not take it).
SITE = "site"

#: Every scope a named token may be given: the hooks, then the calendar endpoint.
SCOPES: tuple[str, ...] = (
    "gs-group-groups", "gs-group-member-add", "gs-group-member-leave",
    "gs-search-people", "gs-site-member-list", "calendar",
)

#: Other spellings of a scope: the hook's path, its documented alias.
_ALIASES = {"gs-site-member": "gs-site-member-list"}

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}\Z")
_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?\Z")

#: The longest overlap allowed: a forgotten old secret must not live for ever.
MAX_OVERLAP = 30 * 86400


def scope_of(text: str) -> str:
    """The scope a hook name or path names; ValueError for anything else.

    ``gs-group-member-add``, ``/gs-group-member-add.json`` and
    ``gs-group-member-add.json`` are one scope; so are ``gs-site-member``
    (GroupServer's documented, wrong, name) and ``gs-site-member-list``.
    """
    name = text.strip().lower().lstrip("/")
    if name.endswith(".json"):
        name = name[:-len(".json")]
    name = _ALIASES.get(name, name)
    if name not in SCOPES:
        raise ValueError("unknown hook %r: expected one of %s" % (text, ", ".join(SCOPES)))
    return name


def check_name(name: str) -> str:
    """A named token's name, or ValueError: lower-case letters, digits, ``.``,
    ``_`` and ``-``, at most 64 characters, and not ``site``."""
    if name == SITE:
        raise ValueError("the name %r is the site token's" % SITE)
    if not _NAME.match(name):
        raise ValueError("bad token name %r: use a-z, 0-9, '.', '_', '-' "
                         "(at most 64, starting with a letter or digit)" % name)
    return name


def parse_duration(text: str) -> int:
    """Seconds in ``10m``, ``90s``, ``90``, ``1h30m``, ``2d``; ValueError
    for anything else or more than :data:`MAX_OVERLAP`."""
    match = _DURATION.match(text.strip())
    if not text.strip() or match is None or not any(match.groups()):
        raise ValueError("bad duration %r: expected e.g. 30s, 10m, 1h30m, 2d" % text)
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total > MAX_OVERLAP:
        raise ValueError("overlap %r is longer than %d days" % (text, MAX_OVERLAP // 86400))
    return total


@attrs.frozen
class TokenRecord:
    """One token as stored: the secret, its scopes, its previous secret.

    ``scopes`` is None for the site token (every hook and the calendar).
    ``previous_until`` is the time (seconds since the epoch) at which the
    previous secret stops being accepted; None when there is none.
    """

    name: str
    secret: str | None
    scopes: frozenset[str] | None = None
    created: str = ""
    rotated: str = ""
    previous: str | None = None
    previous_until: float | None = None


@attrs.frozen
class Grant:
    """What a matching token proves: its name and where it may be used.

    ``previous`` is true when the caller used the previous secret during
    the overlap (``until``: when that stops); ``expired`` when it used a
    previous secret whose overlap has ended (not accepted anywhere).
    """

    name: str
    scopes: frozenset[str] | None = None
    previous: bool = False
    until: float | None = None
    expired: bool = False

    def allows(self, scope: str | None) -> bool:
        """Whether this token may be used on ``scope`` (None: a surface no
        scope names, where only the site token is good)."""
        if self.expired:
            return False
        return self.scopes is None or (scope is not None and scope in self.scopes)


def _same(given: bytes, secret: str | None) -> bool:
    return secret is not None and hmac.compare_digest(given, secret.encode("utf-8"))


def match(records: "list[TokenRecord] | tuple[TokenRecord, ...]", given: str,
          now: float) -> Grant | None:
    """The grant of the token whose secret (or previous secret) ``given`` is.

    Every secret is compared in constant time, each one whatever the
    others gave, so the time taken does not say which one matched.
    """
    if not given:
        return None
    raw = given.encode("utf-8")
    found: Grant | None = None
    for record in records:
        current = _same(raw, record.secret)
        previous = _same(raw, record.previous)
        if found is not None:
            continue
        if current:
            found = Grant(record.name, record.scopes)
        elif previous and record.previous_until is not None:
            expired = now >= record.previous_until
            found = Grant(record.name, record.scopes, previous=True,
                          until=record.previous_until, expired=expired)
    return found
