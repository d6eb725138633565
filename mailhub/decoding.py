"""What mailhub accepts from outside: JSON texts and e-mail addresses, one set of rules.

Every surface that reads JSON (the group hooks' JSON bodies, the push
receiver, the collector's work queue, the calendar queues, global pubsub
messages) decodes it with :func:`decode_json` or :func:`decode_json_object`,
and every place that takes an address from a person (the ``add`` hook, the
``mailhub`` command, the collector after parsing a header) checks it with
:func:`address_problem`; the ``add`` hook first finds the address in what
GroupServer's clients send (``Name <a@x>``, ``a@x,``) with
:func:`sanitise_address`. Plain Python, no I/O: the web layer turns a
:class:`~mailhub.errors.ValidationError` into a 400, the queues into a dead
letter with the reason.

The JSON rules (RFC 8259 as interoperable peers read it):

- the bytes are UTF-8, nothing else (``json.loads`` would also guess UTF-16
  and UTF-32 from the first bytes); a byte-order mark is refused;
- ``NaN``, ``Infinity`` and ``-Infinity`` are not JSON and are refused, and
  so is a number too large for a float (``1e400``), which would read as one;
- no string or key holds a lone surrogate (``"\\ud800"``), which no UTF-8
  text can carry on;
- at most :data:`MAX_DEPTH` nested arrays and objects;
- at most :data:`MAX_BYTES` bytes unless the caller names its own bound (the
  web surfaces have read their body with the surface's own limit already).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from email.utils import parseaddr
from typing import Any

import idna

from mailhub.errors import ValidationError

#: Nesting bound of a JSON text: every shape mailhub reads (jCal, push
#: events, ESN payloads) stays under 10.
MAX_DEPTH = 64
#: Default size bound of a JSON text, in bytes.
MAX_BYTES = 1024 * 1024

#: A JSON escape that may make a lone surrogate (\\uD800 to \\uDFFF).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _no_constants(name: str) -> None:
    raise ValueError("%s is not JSON" % name)


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("the number %s is too large (it would read as Infinity)" % text[:40])
    return value


#: The one decoder, made once (json.loads with options makes one per call).
_DECODER = json.JSONDecoder(parse_constant=_no_constants, parse_float=_finite)


def decode_utf8(raw: bytes, what: str) -> str:
    """``raw`` as text, or a ValidationError naming the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValidationError("%s is not valid UTF-8 (byte %d)" % (what, e.start))


def decode_json(raw: bytes | str, what: str = "the body", max_bytes: int = MAX_BYTES) -> Any:
    """The JSON value of ``raw`` under mailhub's rules, or a ValidationError.

    ``what`` names the input in the messages ("the request body is not
    valid JSON: ..."); ``max_bytes`` bounds its size (for text: its length
    in characters, which a caller reaches only after having read bytes).
    """
    if len(raw) > max_bytes:
        raise ValidationError("%s is larger than %d bytes" % (what, max_bytes))
    text = decode_utf8(raw, what) if isinstance(raw, bytes) else raw
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise _too_deep(what)
    except ValueError as e:
        raise ValidationError("%s is not valid JSON: %s" % (what, e))
    # Both checks walk the value only when the text could break the rule:
    # a body with few brackets and no \\uD8.. escape (nearly all) costs two
    # scans of the text in C.
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        raise _too_deep(what)
    if "\\u" in text and _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise ValidationError("%s holds a lone surrogate (\\uD800 to \\uDFFF), which is "
                              "not Unicode" % what)
    return value


def decode_json_object(raw: bytes | str, what: str = "the body",
                       max_bytes: int = MAX_BYTES) -> dict[str, Any]:
    """:func:`decode_json` for inputs that must be a JSON object."""
    value = decode_json(raw, what, max_bytes)
    if not isinstance(value, dict):
        raise ValidationError("%s must be a JSON object" % what)
    return value


def _too_deep(what: str) -> ValidationError:
    return ValidationError("%s is nested too deeply (more than %d levels)" % (what, MAX_DEPTH))


def _depth(value: Any) -> int:
    """How deep arrays and objects nest in ``value`` (iterative: no recursion limit)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if level > deepest:
            deepest = level
            if deepest > MAX_DEPTH:
                return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def _lone(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _lone(item):
                return True
        elif isinstance(item, dict):
            if any(_lone(key) for key in item):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


# -- addresses ----------------------------------------------------------------

_LOCAL_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010FFFF]+"
#: RFC 5321's Local-part: a dot-atom (UTF-8 allowed, RFC 6531) or a quoted string.
_LOCAL = re.compile(r'^(?:%s(?:\.%s)*|"(?:[^"\\\x00-\x1f\x7f]|\\[ -~])*")$'
                    % (_LOCAL_ATOM, _LOCAL_ATOM))
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def domain_forms(domain: str) -> tuple[str, str] | None:
    """(ASCII, Unicode) forms of a domain, lower-cased; None when it is not one.

    Uses IDNA 2008 with UTS 46 mapping (what browsers and mail clients do),
    then IDNA 2003 (Python's codec) for the few older names 2008 refuses.
    A domain needs two labels or more, each a valid host-name label in its
    ASCII form, and a top-level label that is not all digits. One trailing
    dot (the DNS root) is allowed here; :func:`address_problem` refuses it.
    """
    domain = unicodedata.normalize("NFC", domain.strip().rstrip(".")).lower()
    if not domain or domain.startswith("["):
        return None
    ascii_form: str | None = None
    try:
        ascii_form = idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        try:
            ascii_form = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    ascii_form = ascii_form.lower()
    labels = ascii_form.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        return None
    if labels[-1].isdigit():
        return None
    try:
        unicode_form = idna.decode(ascii_form)
    except (idna.IDNAError, UnicodeError, ValueError):
        try:
            unicode_form = ascii_form.encode("ascii").decode("idna")
        except UnicodeError:
            return None
    return ascii_form, unicodedata.normalize("NFC", unicode_form).lower()


def address_problem(address: str) -> str | None:
    """Why ``address`` is not an e-mail address mailhub accepts, or None when it is.

    One ``local@domain`` (an RFC 5321 addr-spec): a local part that is a
    dot-atom (UTF-8 allowed, RFC 6531) or a quoted string, at most 64 octets;
    an internet domain of two labels or more that IDNA can write (Unicode or
    ``xn--`` form), no address literal, no trailing dot; at most 254 octets
    in all. No display name, comments, spaces or control characters. The
    reason reads after the address: ``"'a@b' has an invalid domain"``.
    """
    if _CONTROL.search(address):
        return "holds control characters"
    if _lone(address):
        return "is not valid Unicode (lone surrogate)"
    if len(address.encode("utf-8")) > 254:
        return "is longer than 254 octets"
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return "is not an email address (local@domain)"
    if len(local.encode("utf-8")) > 64:
        return "has a local part longer than 64 octets"
    if not _LOCAL.match(local):
        return "has a local part with characters an address cannot hold"
    if domain.startswith("["):
        return "has an address literal ([1.2.3.4]) for a domain"
    if domain.endswith(".") or domain_forms(domain) is None:
        return "has an invalid domain"
    return None


#: Longest text :func:`sanitise_address` reads: an address (254 octets at
#: most) with a display name and comments around it. Longer texts are no
#: address, and parsing them would hold the reactor.
MAX_ADDRESS_TEXT = 1024
#: What GroupServer's ``sanitise_address`` strips from both ends of the
#: address it parsed (gs.profile.email.base).
_SANITISE_STRIP = ",.!?; \t\n\r<>(){}[]"
#: A quoted string of a local part, kept whole (with its blanks) by the split.
_QUOTED = re.compile(r'("(?:[^"\\]|\\.)*")')


def _parse_address(text: str) -> str:
    """The first address of ``text`` as Python's lenient parser reads it.

    GroupServer ran on Python 2, whose ``parseaddr`` takes the first address
    of a list; Python releases with CVE-2023-27043's fix read a list as no
    address unless ``strict=False``, which keeps the old reading.
    """
    try:
        try:
            address = parseaddr(text, strict=False)[1]  # type: ignore[call-arg]
        except TypeError:  # a Python without the strict parameter: the old reading
            address = parseaddr(text)[1]
    except RecursionError:  # comments nested hundreds deep: no address
        return ""
    # Python 3 keeps the blanks between the words of a local part
    # ("a b@x"), where Python 2 joined them ("ab@x"); quoted strings keep theirs.
    local, at, domain = address.rpartition("@")
    if at and (" " in local or "\t" in local):
        local = "".join(part if part.startswith('"') else re.sub(r"[ \t]+", "", part)
                        for part in _QUOTED.split(local))
        address = local + at + domain
    return address


def sanitise_address(text: str) -> str:
    """The address in ``text``, found as GroupServer's ``sanitise_address`` finds it.

    ``text`` is parsed as a header's address (``Name <a@x>``, ``<a@x>``,
    ``a@x (Name)``; of a list, the first), then ``,.!?;``, blanks and
    brackets are stripped from both ends (so ``a@x,`` is ``a@x``). The result
    may still be no address (``""`` for ``<>``, ``"bad"``):
    check it with :func:`address_problem`. A text longer than
    :data:`MAX_ADDRESS_TEXT` characters is no address (``""``).
    """
    if len(text) > MAX_ADDRESS_TEXT:
        return ""
    return _parse_address(text).strip(_SANITISE_STRIP)
