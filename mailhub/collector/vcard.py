"""vCards of collected contacts: written (text and jCard) and read back. Pure.

A collected contact is a vCard 4.0 (RFC 6350) with ``FN``, ``N``,
``EMAIL;TYPE=work``, ``UID``, ``REV`` and ``PRODID``, lines ended by CRLF and
folded at 75 octets without splitting a UTF-8 sequence; or, for a book whose
server offers only vCard 3.0 (``supported-address-data``, RFC 6352 6.2.2;
3.0 is also what a server that says nothing accepts), the same card as
vCard 3.0 (RFC 2426), with ``EMAIL;TYPE=INTERNET,WORK``. See
:func:`choose_version`.

A contact with a ``source`` also says where it came from: a ``NOTE`` (the
words of [collector] note) and ``X-MAILHUB-SOURCE`` (mail, calendar or
queue), ``X-MAILHUB-FIRST-SEEN`` and ``X-MAILHUB-MESSAGE-ID`` or
``X-MAILHUB-EVENT-UID`` (extension properties, RFC 6350 6.10), in both
versions and in the jCard.

Ranking and ownership (see :mod:`mailhub.collector.retention`): a contact
mailhub writes says how often the user wrote to the address
(``X-MAILHUB-COUNT``) and when last (``X-MAILHUB-LAST-USED``, the same
UTC timestamp form as ``X-MAILHUB-FIRST-SEEN``), and carries
``X-MAILHUB-HASH``, a digest of what mailhub wrote (:func:`content_hash`:
every property but the ranking ones, REV, PRODID and VERSION, compared
after normalising what servers rewrite). A card whose digest no longer
matches was edited by its user (:func:`edited`).

UID: ``urn:uuid:`` + a UUID version 5 of the address's comparison key
(:func:`mailhub.collector.addresses.address_key`). Deterministic, so every
instance, every redelivery and every restart writes the same address to the
same resource (``{uuid}.vcf``), and ``If-None-Match: *`` makes the second
writer a no-op. OpenPaaS used random uuid4 UIDs (so duplicates across
instances were possible); tmail (2024) uses the hex SHA-1 of the address with
its ``+detail`` stripped. mailhub keeps ``+detail`` (the user wrote to that
address) and uses the UUID form RFC 6350 recommends for UIDs; duplicates with
cards other programs wrote are prevented by the exact-email query instead.

Reading (:func:`parse_vcard`) understands enough of vCard 3.0 and 4.0 to
find the EMAIL values and FN of any card in any book, and :func:`with_name`
rewrites a card's FN and N while keeping every other line.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import datetime, timezone
from typing import Any

import attrs

PRODID = "-//mailhub//collector//EN"
#: Fixed namespace of collected contacts' UIDs (uuid5 of a URL naming mailhub's collector).
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://mailhub.invalid/collector/contact")
_FOLD = re.compile(r"\r?\n[ \t]")


def contact_uuid(key: str) -> str:
    """The UUID (text) of the collected contact of an address key."""
    return str(uuid.uuid5(UID_NAMESPACE, key))


def escape(value: str) -> str:
    """Escape a TEXT value: backslash, comma, semicolon and newlines."""
    return (value.replace("\\", "\\\\").replace(",", "\\,").replace(";", "\\;")
            .replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\n"))


def unescape(value: str) -> str:
    """Undo :func:`escape` (``\\n`` and ``\\N`` are newlines)."""
    if "\\" not in value:
        return value
    out: list[str] = []
    chars = iter(value)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            out.append("\n" if nxt in "nN" and nxt else nxt)
        else:
            out.append(ch)
    return "".join(out)


def fold(line: str) -> str:
    """Fold one content line at 75 octets, never inside a UTF-8 sequence.

    Continuation lines start with one space, which counts in their 75.
    """
    data = line.encode("utf-8")
    if len(data) <= 75:
        return line
    pieces: list[str] = []
    start = 0
    limit = 75
    while start < len(data):
        end = min(start + limit, len(data))
        # Step back from a UTF-8 continuation byte (10xxxxxx).
        while end < len(data) and end > start and (data[end] & 0xC0) == 0x80:
            end -= 1
        pieces.append(data[start:end].decode("utf-8"))
        start = end
        limit = 74
    return "\r\n ".join(pieces)


def unfold(text: str) -> list[str]:
    """The logical content lines of a vCard text (folding removed, empty lines dropped)."""
    return [line for line in _FOLD.sub("", text).replace("\r\n", "\n").split("\n")
            if line.strip()]


@attrs.frozen
class Contact:
    """A collected contact, before it is written."""

    uid: str  # the bare UUID
    email: str
    fn: str
    family: str = ""
    given: str = ""
    rev: datetime = attrs.field(factory=lambda: datetime.now(timezone.utc))
    #: Where it was collected from: ``mail``, ``calendar`` or ``queue`` (empty: unsaid).
    source: str = ""
    #: The Message-ID (mail) or event UID (calendar) it came from, where known.
    ref: str = ""
    #: The NOTE line clients show ([collector] note, filled in); empty: none.
    note: str = ""
    #: Times the user wrote to the address (0: no ranking properties written).
    count: int = 0
    #: When the user last wrote to it (None: ``rev``).
    last_used: datetime | None = None

    @property
    def href_name(self) -> str:
        """The resource name in the book: ``{uuid}.vcf``."""
        return self.uid + ".vcf"


def _rev(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


#: The vCard versions mailhub writes, best first.
VERSIONS = ("4.0", "3.0")


def choose_version(offered: tuple[str, ...] | None) -> str:
    """The vCard version to write into a book whose server offers ``offered``.

    ``offered`` is the book's ``supported-address-data`` (the versions of its
    ``text/vcard`` types); empty or None when the server does not say, which
    RFC 6352 (6.2.2) reads as vCard 3.0 only. 4.0 where offered, else 3.0.
    """
    return "4.0" if offered and "4.0" in offered else "3.0"


def to_vcard(contact: Contact, version: str = "4.0") -> str:
    """The vCard text (4.0 or 3.0) of a contact (CRLF lines, folded)."""
    if version not in VERSIONS:
        raise ValueError("cannot write vCard %r" % version)
    email = "EMAIL;TYPE=work:" if version == "4.0" else "EMAIL;TYPE=INTERNET,WORK:"
    lines = [
        "BEGIN:VCARD",
        "VERSION:" + version,
        "PRODID:" + PRODID,
        "UID:urn:uuid:" + contact.uid,
        "FN:" + escape(contact.fn),
        "N:%s;%s;;;" % (escape(contact.family), escape(contact.given)),
        email + escape(contact.email),
        "REV:" + _rev(contact.rev),
        *provenance_lines(contact),
        *ranking_lines(contact),
    ]
    if contact.source:
        lines.append("%s:%s" % (X_HASH, content_hash_of_lines(lines)))
    lines.append("END:VCARD")
    return "".join(fold(line) + "\r\n" for line in lines)


#: Machine-readable provenance properties (RFC 6350 6.10 extension properties).
X_SOURCE = "X-MAILHUB-SOURCE"
X_FIRST_SEEN = "X-MAILHUB-FIRST-SEEN"
X_MESSAGE_ID = "X-MAILHUB-MESSAGE-ID"
X_EVENT_UID = "X-MAILHUB-EVENT-UID"
#: Ranking properties: how often and when last the user wrote to the address.
X_COUNT = "X-MAILHUB-COUNT"
X_LAST_USED = "X-MAILHUB-LAST-USED"
#: Digest of what mailhub wrote (:func:`content_hash`): differs once the user edits.
X_HASH = "X-MAILHUB-HASH"
#: Properties left out of the digest: those mailhub rewrites (ranking, REV) and
#: those clients and servers rewrite on their own (PRODID, VERSION, the digest).
_UNHASHED = frozenset(["BEGIN", "END", "VERSION", "PRODID", "REV", X_COUNT, X_LAST_USED,
                       X_HASH])


def _provenance(contact: Contact) -> list[tuple[str, str]]:
    """(name, value) of the provenance properties of a contact, values unescaped."""
    if not contact.source:
        return []
    props = [("NOTE", contact.note)] if contact.note else []
    props.append((X_SOURCE, contact.source))
    props.append((X_FIRST_SEEN, _rev(contact.rev)))
    if contact.ref:
        props.append((X_EVENT_UID if contact.source == "calendar" else X_MESSAGE_ID,
                      contact.ref))
    return props


def provenance_lines(contact: Contact) -> list[str]:
    """The NOTE and X-MAILHUB-* content lines saying where a contact came from.

    None for a contact without a ``source`` (written as before).
    """
    return ["%s:%s" % (name, escape(value)) for name, value in _provenance(contact)]


def ranking_lines(contact: Contact) -> list[str]:
    """The X-MAILHUB-COUNT and X-MAILHUB-LAST-USED lines (none when ``count`` is 0)."""
    if contact.count <= 0:
        return []
    return ["%s:%d" % (X_COUNT, contact.count),
            "%s:%s" % (X_LAST_USED, _rev(contact.last_used or contact.rev))]


def to_jcard(contact: Contact) -> list[Any]:
    """The jCard (RFC 7095) of a contact: what ESN sends as ``vcard``."""
    extra: list[list[Any]] = [
        [name.lower(), {}, "text", value] for name, value in _provenance(contact)]
    extra.extend([name.lower(), {}, "text", value]
                 for name, _, value in (line.partition(":") for line in ranking_lines(contact)))
    return ["vcard", [
        ["version", {}, "text", "4.0"],
        ["prodid", {}, "text", PRODID],
        ["uid", {}, "uri", "urn:uuid:" + contact.uid],
        ["fn", {}, "text", contact.fn],
        ["n", {}, "text", [contact.family, contact.given, "", "", ""]],
        ["email", {"type": "work"}, "text", contact.email],
        ["rev", {}, "timestamp",
         contact.rev.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")],
        *extra,
    ]]


@attrs.frozen
class Property:
    """One content line: group, upper-cased name, raw parameters and raw value."""

    name: str
    params: str
    value: str
    group: str = ""


def split_line(line: str) -> Property | None:
    """Split a content line at the first colon outside quoted parameter values."""
    colon = line.find(":")
    if colon < 0:
        return None
    if '"' not in line[:colon]:  # the common case: no quoted parameter before it
        name, _, params = line[:colon].partition(";")
        group, dot, bare = name.rpartition(".")
        return Property(name=(bare if dot else name).strip().upper(),
                        params=params, value=line[colon + 1:], group=group if dot else "")
    quoted = False
    for i, ch in enumerate(line):
        if ch == '"':
            quoted = not quoted
        elif ch == ":" and not quoted:
            head, value = line[:i], line[i + 1:]
            name, _, params = head.partition(";")
            group, dot, bare = name.rpartition(".")
            return Property(name=(bare if dot else name).strip().upper(),
                            params=params, value=value, group=group if dot else "")
    return None


@attrs.frozen
class ParsedCard:
    """What the collector reads from any card: its emails, FN and UID."""

    emails: tuple[str, ...]
    fn: str
    uid: str

    def has_display_name(self) -> bool:
        """False when FN is missing, empty, or just one of the card's addresses."""
        fn = self.fn.strip()
        if not fn:
            return False
        return fn.casefold() not in {e.strip().casefold() for e in self.emails}


def parse_vcard(text: str) -> ParsedCard:
    """Read the EMAIL values (``mailto:`` stripped), FN and UID of a vCard."""
    emails: list[str] = []
    fn = ""
    uid = ""
    for line in unfold(text):
        prop = split_line(line)
        if prop is None:
            continue
        if prop.name == "EMAIL":
            value = unescape(prop.value).strip()
            if value.lower().startswith("mailto:"):
                value = value[7:]
            if value:
                emails.append(value)
        elif prop.name == "FN" and not fn:
            fn = unescape(prop.value).strip()
        elif prop.name == "UID" and not uid:
            uid = unescape(prop.value).strip()
    return ParsedCard(tuple(emails), fn, uid)


def with_name(text: str, fn: str, family: str, given: str,
              now: datetime | None = None) -> str:
    """The card with FN and N set (added if missing) and REV renewed.

    Every other line is kept as it was (re-folded), so properties another
    client added survive the fill-in. A card mailhub wrote and nobody
    edited is signed again (X-MAILHUB-HASH); an edited one stays edited.
    """
    out: list[str] = []
    seen_n = False
    seen_fn = False
    for line in unfold(text):
        prop = split_line(line)
        name = prop.name if prop else ""
        if name == "FN":
            if not seen_fn:
                out.append("FN:" + escape(fn))
            seen_fn = True
            continue
        if name == "N":
            if not seen_n:
                out.append("N:%s;%s;;;" % (escape(family), escape(given)))
            seen_n = True
            continue
        if name == "REV":
            continue
        if name == "END" and prop is not None and prop.value.strip().upper() == "VCARD":
            if not seen_fn:
                out.append("FN:" + escape(fn))
            if not seen_n:
                out.append("N:%s;%s;;;" % (escape(family), escape(given)))
            out.append("REV:" + _rev(now or datetime.now(timezone.utc)))
        out.append(line)
    named = "".join(fold(line) + "\r\n" for line in out)
    # Still as mailhub wrote it, but for the name mailhub gives it now:
    # signed again, so the fill-in is not taken for the user's edit.
    return named if edited(text) else sign(named)


# -- ranking and ownership ---------------------------------------------------

def _split_params(params: str) -> list[str]:
    """Split ``;``-separated parameters, not inside double quotes."""
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in params:
        if ch == '"':
            quoted = not quoted
        if ch == ";" and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    out.append("".join(current))
    return [p for p in out if p.strip()]


def _canonical(prop: Property) -> str:
    """One property in a form that survives what servers do to a card they store.

    Radicale (vobject) and others re-serialise: they may reorder lines and
    parameters, change the case of names, split ``TYPE=a,b`` into
    ``TYPE=a;TYPE=b``, quote or re-escape values, or add a group. None of that
    is an edit; a changed value, an added or removed property or parameter is.
    """
    merged: dict[str, set[str]] = {}
    for param in _split_params(prop.params):
        name, eq, value = param.partition("=")
        values = value.split(",") if eq else [""]
        merged.setdefault(name.strip().upper(), set()).update(
            v.strip().strip('"').casefold() for v in values)
    params = ";".join("%s=%s" % (name, ",".join(sorted(values)))
                      for name, values in sorted(merged.items()))
    return "%s;%s:%s" % (prop.name, params, unescape(prop.value).strip())


def content_hash_of_lines(lines: list[str]) -> str:
    """The digest of a card's logical (unfolded) content lines; see :func:`content_hash`."""
    canon = []
    for line in lines:
        prop = split_line(line)
        if prop is not None and prop.name not in _UNHASHED:
            canon.append(_canonical(prop))
    data = "\n".join(sorted(canon)).encode("utf-8")
    return hashlib.sha256(data).hexdigest()[:32]


def content_hash(text: str) -> str:
    """Digest of what a card says, left out: ranking, REV, PRODID, VERSION, the digest.

    mailhub writes it into X-MAILHUB-HASH; a card whose content no longer
    gives the same digest was edited by its user.
    """
    return content_hash_of_lines(unfold(text))


#: What mailhub wrote into a card before it signed cards with X-MAILHUB-HASH.
_LEGACY = frozenset(["BEGIN", "END", "VERSION", "PRODID", "UID", "FN", "N", "EMAIL", "REV",
                     "NOTE", X_SOURCE, X_FIRST_SEEN, X_MESSAGE_ID, X_EVENT_UID])


def _edited(lines: list[str], props: list[Property]) -> bool:
    signed = [p for p in props if p.name == X_HASH]
    if signed:
        return unescape(signed[0].value).strip() != content_hash_of_lines(lines)
    if any(p.name not in _LEGACY for p in props):
        return True
    prodid = [unescape(p.value).strip() for p in props if p.name == "PRODID"]
    emails = [e for e in (_email_value(p) for p in props if p.name == "EMAIL") if e]
    uids = [unescape(p.value).strip() for p in props if p.name == "UID"]
    if prodid != [PRODID] or len(emails) != 1 or len(uids) != 1:
        return True
    from mailhub.collector.addresses import address_key  # no cycle at import time
    key = address_key(emails[0])
    return not key or uids[0].removeprefix("urn:uuid:") != contact_uuid(key)


def _email_value(prop: Property) -> str:
    value = unescape(prop.value).strip()
    return value[7:] if value.lower().startswith("mailto:") else value


@attrs.frozen
class Assessed:
    """What retention reads of a collected card, in one reading of it."""

    edited: bool
    email: str
    uid: str
    ranking: "Ranking"


def assess(text: str) -> Assessed:
    """Whether the card was edited, its first EMAIL, bare UID and ranking, reading it once."""
    lines = unfold(text)
    props = [p for p in map(split_line, lines) if p is not None]
    first: dict[str, str] = {}
    email = ""
    for p in props:
        if p.name not in first:
            first[p.name] = unescape(p.value).strip()
        if p.name == "EMAIL" and not email:
            email = _email_value(p)
    return Assessed(_edited(lines, props), email,
                    first.get("UID", "").removeprefix("urn:uuid:"), _ranking(first))


def edited(text: str) -> bool:
    """True when a collected card is no longer as mailhub wrote it (its user's now).

    A card with X-MAILHUB-HASH: its digest differs. A card without one
    (collected by an older mailhub, or the user's client dropped the
    property): edited unless it has only the properties mailhub wrote, with
    mailhub's PRODID (clients that edit a card write their own), one EMAIL,
    and the UID mailhub derives from that address.
    """
    lines = unfold(text)
    return _edited(lines, [p for p in map(split_line, lines) if p is not None])


def sign(text: str) -> str:
    """The card with X-MAILHUB-HASH set to the digest of its content (after mailhub changed it)."""
    lines = [line for line in unfold(text)
             if (split_line(line) or Property("", "", "")).name != X_HASH]
    digest = content_hash_of_lines(lines)
    end = len(lines)
    for i, line in enumerate(lines):
        if line.strip().upper() == "END:VCARD":
            end = i
    lines.insert(end, "%s:%s" % (X_HASH, digest))
    return "".join(fold(line) + "\r\n" for line in lines)


def parse_stamp(value: str | None) -> datetime | None:
    """A vCard timestamp (``20261202T030405Z``, dashes and colons tolerated) in UTC, or None."""
    if not value:
        return None
    compact = value.strip().replace("-", "").replace(":", "")
    if len(compact) == 16 and compact[8] == "T" and compact[15] == "Z" and \
            compact[:8].isdigit() and compact[9:15].isdigit():
        try:  # the form mailhub writes, without strptime's cost
            return datetime(int(compact[:4]), int(compact[4:6]), int(compact[6:8]),
                            int(compact[9:11]), int(compact[11:13]), int(compact[13:15]),
                            tzinfo=timezone.utc)
        except ValueError:
            return None
    for form in ("%Y%m%dT%H%M%SZ", "%Y%m%dT%H%M%S", "%Y%m%d"):
        try:
            return datetime.strptime(compact, form).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
    return None


@attrs.frozen
class Ranking:
    """How often and when last the user wrote to a collected contact, as its card says."""

    count: int
    last_used: datetime | None
    first_seen: datetime | None
    rev: datetime | None

    @property
    def latest(self) -> datetime | None:
        """The last time the contact was written or used: LAST-USED, else FIRST-SEEN, else REV."""
        return self.last_used or self.first_seen or self.rev


def ranking_of(text: str) -> Ranking:
    """The ranking properties of a card (count 0 and None where absent or unreadable)."""
    first: dict[str, str] = {}
    for line in unfold(text):
        prop = split_line(line)
        if prop is not None and prop.name not in first:
            first[prop.name] = unescape(prop.value).strip()
    return _ranking(first)


def _ranking(first: dict[str, str]) -> Ranking:
    """The Ranking from the first value of each property (unescaped)."""
    count = 0
    raw = first.get(X_COUNT)
    if raw is not None:
        try:
            count = max(0, int(raw))
        except ValueError:
            count = 0
    return Ranking(count, parse_stamp(first.get(X_LAST_USED)),
                   parse_stamp(first.get(X_FIRST_SEEN)), parse_stamp(first.get("REV")))


def with_ranking(text: str, count: int, last_used: datetime) -> str:
    """The card with X-MAILHUB-COUNT and X-MAILHUB-LAST-USED set and REV renewed.

    Every other line is kept (so is X-MAILHUB-HASH: the ranking is not part of
    the digest, and an edited card stays edited).
    """
    out: list[str] = []
    for line in unfold(text):
        prop = split_line(line)
        name = prop.name if prop else ""
        if name in (X_COUNT, X_LAST_USED, "REV"):
            continue
        if name == "END" and prop is not None and prop.value.strip().upper() == "VCARD":
            out.append("REV:" + _rev(last_used))
            out.append("%s:%d" % (X_COUNT, count))
            out.append("%s:%s" % (X_LAST_USED, _rev(last_used)))
        out.append(line)
    return "".join(fold(line) + "\r\n" for line in out)
