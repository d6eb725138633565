"""Recipient addresses, as mail and calendar systems write them, made comparable.

Pure functions, no I/O. An entry of a collector message is one string that may
hold one address (``a@x.org``), a named address (``"Doe, J" <j@y.org>``), an
RFC 5322 list of them (``A <a@x>, B <b@y>``), a group (``team: a@x, b@y;``),
MIME encoded-words in the names (``=?utf-8?q?J=C3=BCrgen?= <j@x>``) and
internationalised domains (``bücher.de`` or ``xn--bcher-kva.de``).

Comparison: two addresses are the same contact when their *keys* are equal.
The key is the whole address, NFC-normalised and case-folded, with the domain
decoded from IDNA to Unicode first, so ``J@Bücher.DE``, ``j@xn--bcher-kva.de``
and ``j@bücher.de`` are one address. The local part is compared without case
too: RFC 5321 allows case-sensitive mailboxes, but no mail system in use gives
``John@`` and ``john@`` to two people, and CardDAV's ``i;unicode-casemap``
collation (what the dedup query uses) compares that way anyway. ``+detail``
is kept: ``a+x@`` and ``a+y@`` are what the user wrote, so each is collected.

Whatever cannot be collected is returned as :class:`Rejected` with a reason,
never silently dropped.
"""

from __future__ import annotations

import re
import unicodedata
from email.headerregistry import Address
from email.policy import default as default_policy
from typing import Iterable

import attrs

from mailhub.decoding import address_problem, domain_forms

# Defects Python's parser reports that still leave a usable address: RFC 6532
# allows UTF-8 local parts.
_HARMLESS_DEFECTS = ("NonASCIILocalPartDefect",)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SPACES = re.compile(r"\s+")


@attrs.frozen
class Recipient:
    """One collectable address.

    ``email`` is what goes into the vCard (the local part as written, the
    domain lower-cased in the form it was written: ASCII or Unicode);
    ``key`` what addresses are compared by; ``name`` the display name
    (trimmed, whitespace collapsed; empty when there was none); ``forms``
    every spelling a CardDAV server may hold it under (ASCII and Unicode
    domain), for the exact-match query.
    """

    email: str
    key: str
    name: str = ""
    forms: tuple[str, ...] = ()

    @property
    def fn(self) -> str:
        """The vCard FN: the display name, or the address when there is none."""
        return self.name or self.email

    @property
    def family_given(self) -> tuple[str, str]:
        """The vCard N components (family, given), see :func:`split_name`."""
        return split_name(self.name)


@attrs.frozen
class Rejected:
    """An entry (or a part of one) that is not collected, and why."""

    raw: str
    reason: str


@attrs.frozen
class Parsed:
    """What a list of entries gave: each address once, and the rejects."""

    recipients: tuple[Recipient, ...]
    rejected: tuple[Rejected, ...]


def clean_name(name: str) -> str:
    """A display name trimmed, whitespace collapsed, one pair of wrapping quotes removed.

    Outlook writes ``'John Doe' <j@x>``; the quotes are not part of the name.
    """
    name = _SPACES.sub(" ", _CONTROL.sub(" ", name)).strip()
    while len(name) >= 2 and name[0] == name[-1] and name[0] in "'\"":
        name = name[1:-1].strip()
    return unicodedata.normalize("NFC", name)


def split_name(name: str) -> tuple[str, str]:
    """(family, given) of a display name, as OpenPaaS splits it.

    OpenPaaS takes the first word as the given name and the rest as the
    family name (``"John Ronald Tolkien"`` gives family ``"Ronald Tolkien"``,
    given ``"John"``). mailhub does the same, and also reads the
    ``"Family, Given"`` form that address books write, which the first-word
    rule would turn into a given name of ``"Doe,"``. One word: given name only.
    """
    name = clean_name(name)
    if not name:
        return "", ""
    if name.count(",") == 1:
        family, given = (part.strip() for part in name.split(","))
        if family and given:
            return family, given
    first, _, rest = name.partition(" ")
    return rest.strip(), first


def address_key(address: str) -> str | None:
    """The comparison key of a bare address (``local@domain``), or None."""
    local, at, domain = address.strip().rpartition("@")
    if not at or not local:
        return None
    forms = domain_forms(domain)
    if forms is None:
        return None
    return unicodedata.normalize("NFC", local).casefold() + "@" + forms[1].casefold()


def split_list(text: str) -> list[str]:
    """Split an RFC 5322 address list at its top-level commas.

    Commas inside quoted strings, angle brackets and (nested) comments do not
    split. Group syntax (``name: a, b;``) gives its members; the group name
    is dropped.
    """
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    escaped = False
    angle = 0
    comment = 0
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
            continue
        if ch == "\\" and (quoted or comment):
            current.append(ch)
            escaped = True
            continue
        if quoted:
            current.append(ch)
            if ch == '"':
                quoted = False
            continue
        if comment:
            current.append(ch)
            if ch == "(":
                comment += 1
            elif ch == ")":
                comment -= 1
            continue
        if ch == '"':
            quoted = True
        elif ch == "(":
            comment += 1
        elif ch == "<":
            angle += 1
        elif ch == ">" and angle:
            angle -= 1
        elif angle == 0 and ch in ",;":
            parts.append("".join(current))
            current = []
            continue
        elif angle == 0 and ch == ":":
            # A group's display name ends here; its members follow.
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_one(text: str) -> Recipient | Rejected:
    """One address with an optional display name, or why it is not collected."""
    raw = text
    if _CONTROL.search(text.replace("\t", " ")):
        return Rejected(raw, "contains control characters")
    try:
        header = default_policy.header_factory("To", text)
        found = list(header.addresses)  # type: ignore[attr-defined]
        defects = [d for d in header.defects  # type: ignore[attr-defined]
                   if type(d).__name__ not in _HARMLESS_DEFECTS]
    except Exception:  # the stdlib parser raises IndexError on some junk
        return Rejected(raw, "not an email address")
    if len(found) != 1 or defects:
        return Rejected(raw, "not an email address")
    mailbox = found[0]
    local, domain = mailbox.username, mailbox.domain
    if not local or not domain:
        return Rejected(raw, "not an email address (no %s)" % ("domain" if local else "local part"))
    if domain.startswith("["):
        return Rejected(raw, "address literals ([1.2.3.4]) are not collected")
    forms = domain_forms(domain)
    if forms is None:
        return Rejected(raw, "%r is not an internet domain name" % domain)
    local = unicodedata.normalize("NFC", local)
    written_domain = forms[1] if domain.strip().lower() != forms[0] else forms[0]
    try:
        email = Address(username=local, domain=written_domain).addr_spec
        spellings = tuple(dict.fromkeys(
            Address(username=local, domain=d).addr_spec for d in (written_domain, *forms)))
    except (ValueError, TypeError):
        return Rejected(raw, "not an email address")
    # The one validator (lengths, local part, domain) has the last word.
    problem = address_problem(email)
    if problem is not None:
        return Rejected(raw, "the address %s" % problem)
    key = local.casefold() + "@" + forms[1].casefold()
    name = clean_name(mailbox.display_name or "")
    # A "name" that is only the address again ("a@x" <a@x>) is no name.
    if name and address_key(name) == key:
        name = ""
    return Recipient(email=email, key=key, name=name, forms=spellings)


def parse_entries(entries: Iterable[object]) -> Parsed:
    """Every address of a collector message's ``emails``, each once.

    The same address in several forms (``a@x`` and ``A <a@x>``) gives one
    recipient: the first form that has a display name, else the first form.
    Entries that are not strings, and parts that are not addresses, are
    rejected with a reason.
    """
    by_key: dict[str, Recipient] = {}
    rejected: list[Rejected] = []
    for entry in entries:
        if not isinstance(entry, str):
            rejected.append(Rejected(repr(entry)[:200], "not a string"))
            continue
        parts = split_list(entry)
        if not parts:
            rejected.append(Rejected(entry, "empty"))
            continue
        for part in parts:
            result = parse_one(part)
            if isinstance(result, Rejected):
                rejected.append(result)
                continue
            known = by_key.get(result.key)
            if known is None or (not known.name and result.name):
                by_key[result.key] = result
    return Parsed(tuple(by_key.values()), tuple(rejected))


def format_address(name: str, email: str) -> str:
    """``"Name" <email>`` (or the bare address), quoted so parse_one reads it back."""
    name = clean_name(name)
    if not name:
        return email
    return '"%s" <%s>' % (name.replace("\\", "\\\\").replace('"', '\\"'), email)
