"""Decode the bodies Dovecot's push drivers send into :class:`PushEvent` values.

Two shapes arrive:

- the **OX driver** (``push_notification_driver = ox:url=...``): one JSON
  object per delivered message, ``{"user", "event": "messageNew", "folder",
  "imap-uidvalidity", "imap-uid", "from", "subject", "snippet", "unseen"}``;
  read by :func:`decode_ox`;
- the **Lua driver** with mailhub's script: ``{"user": ..., "events": [{name,
  mailbox, uid, ...}, ...]}``, one request per transaction; a single event
  object (``{"user": ..., "name": ..., ...}``) or a form body
  (``user=...&name=...&from=...``, whatever its Content-Type) from other
  scripts; read by :func:`decode_lua`.

Whatever the bytes, the result is a list of events or a
:class:`~mailhub.errors.ValidationError` listing what is wrong: the
hypothesis tests hold the decoders to that.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from typing import Any, Callable
from urllib.parse import parse_qsl

from mailhub.decoding import decode_json_object, decode_utf8
from mailhub.errors import ValidationError
from mailhub.push.events import (
    CONTENT_EVENTS,
    MESSAGE_EVENTS,
    PushEvent,
    canonical_event,
    topic_of,
)

UINT32 = 2**32 - 1
MAX_FORM_FIELDS = 200

#: Dovecot's ``enum mail_flags`` bits, as the Lua driver may pass ``flags``.
FLAG_BITS = ((0x01, "\\Answered"), (0x02, "\\Flagged"), (0x04, "\\Deleted"),
             (0x08, "\\Seen"), (0x10, "\\Draft"), (0x20, "\\Recent"))

_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([QqBb])\?([^?\s]*)\?=")
_INTEGER = re.compile(r"^\s*([+-]?\d{1,20})(?:\.0*)?\s*$")

#: The payload of mail:new and mail:append, in order.
MESSAGE_FIELDS = ("user", "event", "driver", "mailbox", "uid", "uid_validity", "date", "tz",
                  "from", "to", "from_address", "from_display_name", "to_address",
                  "to_display_name", "subject", "snippet", "message_id", "flags", "keywords",
                  "unseen")

# Header fields whose value may hold RFC 2047 encoded-words.
_WORD_FIELDS = ("from", "to", "subject", "from_display_name", "to_display_name")
#: Header fields holding address lists: decoded so that they still parse.
_ADDRESS_FIELDS = ("from", "to")
_SPECIALS = set('()<>[]:;@\\,."')


# -- text -------------------------------------------------------------------


def _decode_word(charset: str, encoding: str, payload: str) -> str | None:
    """One encoded-word's text, or None when it cannot be decoded."""
    raw_payload = payload.encode("utf-8", "replace")
    try:
        if encoding in "Bb":
            raw = base64.b64decode(raw_payload + b"=" * (-len(raw_payload) % 4))
        else:
            raw = binascii.a2b_qp(raw_payload, header=True)
    except (binascii.Error, ValueError):
        return None
    try:
        text = raw.decode(charset, "replace")
    except (LookupError, UnicodeError, ValueError, TypeError):
        # Unknown or non-text charsets: UTF-8 is the likeliest truth.
        text = raw.decode("utf-8", "replace")
    # Codecs such as unicode-escape can make lone surrogates: never pass one on.
    return text.encode("utf-8", "replace").decode("utf-8")


def decode_words(text: str) -> str:
    """Decode RFC 2047 encoded-words (``=?utf-8?q?Andr=C3=A9?=``) in a header value.

    Whitespace between two adjacent encoded-words is dropped, as RFC 2047
    says; a word that cannot be decoded is kept as it was. Never raises.
    """
    if "=?" not in text:
        return text
    return _join_words(text, _words(text))


def _words(text: str) -> list[tuple[re.Match[str], str | None]]:
    """Each encoded-word of ``text`` with its decoded text (None: undecodable)."""
    return [(m, _decode_word(*m.groups())) for m in _ENCODED_WORD.finditer(text)]


def _join_words(text: str, words: list[tuple[re.Match[str], str | None]]) -> str:
    """``text`` with each matched encoded-word replaced by its decoded text."""
    out: list[str] = []
    pos = 0
    after_word = False
    for match, decoded in words:
        between = text[pos:match.start()]
        if decoded is None:
            out.append(between + match.group(0))
            after_word = False
        else:
            if not (after_word and between.strip() == ""):
                out.append(between)
            out.append(decoded)
            after_word = True
        pos = match.end()
    out.append(text[pos:])
    return "".join(out)


def decode_addresses(text: str) -> str:
    """Decode the encoded-words of an address-list header, keeping it parseable.

    ``=?utf-8?q?Doe=2C_John?= <j@x.org>`` becomes ``"Doe, John" <j@x.org>``:
    a decoded name with a comma or another special is quoted, so the
    collector (and any reader) still sees one address, not two. Never raises.
    """
    if "=?" not in text:
        return text
    words = _words(text)
    if all(piece is None or _SPECIALS.isdisjoint(piece) for _, piece in words):
        # No decoded word brings a special: decoding cannot change how the
        # header parses (the common case, and the fast one).
        return _join_words(text, words)
    from email.utils import getaddresses

    try:
        pairs = getaddresses([text])
    except Exception:
        return decode_words(text)
    if not pairs or any(not address for _, address in pairs):
        return decode_words(text)
    out = []
    for name, address in pairs:
        name = " ".join(decode_words(name).split())
        if not name:
            out.append(address)
            continue
        if _SPECIALS.intersection(name):
            name = '"%s"' % name.replace("\\", "\\\\").replace('"', '\\"')
        out.append("%s <%s>" % (name, address))
    return ", ".join(out)


# -- typed fields -----------------------------------------------------------


class _Fields:
    """Typed reads of one event object, collecting every error before raising."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data = data
        self.where = where
        self.errors: list[str] = []

    def _error(self, key: str, what: str) -> None:
        self.errors.append("%s: field %r %s" % (self.where, key, what))

    def text(self, key: str, required: bool = False, words: bool = False) -> str | None:
        value = self.data.get(key)
        if value is None:
            if required:
                self._error(key, "is required")
            return None
        if not isinstance(value, str):
            self._error(key, "must be text")
            return None
        if required and not value.strip():
            self._error(key, "must not be empty")
            return None
        if not words:
            return value
        return decode_addresses(value) if key in _ADDRESS_FIELDS else decode_words(value)

    def integer(self, key: str, low: int, high: int, required: bool = False) -> int | None:
        value = self.data.get(key)
        if value is None or value == "":
            if required:
                self._error(key, "is required")
            return None
        number = self._to_int(key, value)
        if number is None:
            return None
        if not low <= number <= high:
            self._error(key, "must be between %d and %d" % (low, high))
            return None
        return number

    def _to_int(self, key: str, value: Any) -> int | None:
        if isinstance(value, bool):
            self._error(key, "must be a whole number, not a boolean")
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            if math.isfinite(value) and value.is_integer():
                return int(value)
            self._error(key, "must be a whole number")
            return None
        if isinstance(value, str):
            match = _INTEGER.match(value)
            if match:
                return int(match.group(1))
        self._error(key, "must be a whole number")
        return None

    def names(self, key: str, bitmask: bool = False) -> list[str] | None:
        """A list of flag or keyword names: a JSON list, a spaced string, or a bitmask."""
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, dict) and not value:
            return []  # an empty Lua table encoded as an object
        if isinstance(value, str):
            return value.replace(",", " ").split()
        if bitmask and isinstance(value, (int, float)) and not isinstance(value, bool):
            bits = self._to_int(key, value)
            if bits is None:
                return None
            if not 0 <= bits <= 0xFFFF:
                self._error(key, "is not a flag bitmask")
                return None
            return [name for bit, name in FLAG_BITS if bits & bit]
        if isinstance(value, list):
            out = []
            for item in value:
                if not isinstance(item, str):
                    self._error(key, "must be a list of text")
                    return None
                out.append(item)
            return out
        self._error(key, "must be a list of names")
        return None

    def done(self) -> None:
        if self.errors:
            raise ValidationError(self.errors)


# -- payloads ---------------------------------------------------------------


def _message_payload(f: _Fields, user: str, event: str, driver: str,
                     mailbox: str | None, uid: int | None, uid_validity: int | None,
                     unseen: int | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "user": user, "event": event, "driver": driver,
        "mailbox": mailbox, "uid": uid, "uid_validity": uid_validity,
    }
    if event in CONTENT_EVENTS:
        data["date"] = f.integer("date", -(2**53), 2**53)
        data["tz"] = f.integer("tz", -100000, 100000)
        for key in ("from", "to", "from_address", "from_display_name",
                    "to_address", "to_display_name", "subject", "snippet", "message_id"):
            data[key] = f.text(key, words=key in _WORD_FIELDS)
        data["flags"] = f.names("flags", bitmask=True) or []
        data["keywords"] = f.names("keywords") or []
        data["unseen"] = unseen
    elif event in ("flags_set", "flags_clear", "message_read"):
        flags = f.names("flags", bitmask=True)
        if flags is None:
            flags = ["\\Seen"] if event == "message_read" else []
        data["flags"] = flags
        data["keywords"] = f.names("keywords") or []
        data["flags_old"] = f.names("flags_old", bitmask=True)
        data["keywords_old"] = f.names("keywords_old")
    return data


def _lua_event(obj: dict[str, Any], user: Any, where: str, default_event: str | None,
               ) -> PushEvent:
    f = _Fields(obj, where)
    raw_name = obj.get("name", obj.get("event", default_event))
    if raw_name is None:
        raise ValidationError("%s: field 'name' (the Dovecot event) is required" % where)
    if not isinstance(raw_name, str):
        raise ValidationError("%s: field 'name' must be text" % where)
    event = canonical_event(raw_name)
    if event is None:
        raise ValidationError("%s: unknown event %r" % (where, raw_name[:80]))
    own_user = obj.get("user")
    if own_user is not None:
        user = own_user
    if user is None:
        raise ValidationError("%s: field 'user' is required" % where)
    if not isinstance(user, str) or not user.strip():
        raise ValidationError("%s: field 'user' must be non-empty text" % where)
    mailbox = f.text("mailbox", required=event not in MESSAGE_EVENTS)
    if event in MESSAGE_EVENTS:
        uid = f.integer("uid", 0, UINT32)
        uid_validity = f.integer("uid_validity", 0, UINT32)
        data = _message_payload(f, user, event, "lua", mailbox, uid, uid_validity,
                                f.integer("unseen", 0, UINT32))
    else:
        data = {"user": user, "event": event, "driver": "lua", "mailbox": mailbox}
        if event == "mailbox_rename":
            data["mailbox_old"] = f.text("mailbox_old")
    f.done()
    return PushEvent(topic_of(event), data)


def decode_ox(body: bytes) -> list[PushEvent]:
    """Events of one OX driver body: one ``mail:new`` per UID in ``imap-uid``.

    ``event`` must be ``messageNew`` in any case (Dovecot sends
    ``messageNew``, its documentation says ``MessageNew``); ``imap-uid`` may
    be a number or an array of numbers; ``from`` and ``subject`` have their
    MIME encoded-words decoded. The body is read by the shared
    :func:`~mailhub.decoding.decode_json_object` (UTF-8 only, no NaN, no lone
    surrogate, bounded depth), then by the fast path or the checked one.
    """
    data = decode_json_object(body, "the body")
    return _ox_as_sent(data) or _ox_checked(data)


def _uint32(value: Any) -> bool:
    return type(value) is int and 0 <= value <= UINT32


def _text_or_none(value: Any) -> bool:
    return value is None or type(value) is str


def _ox_as_sent(data: dict[str, Any]) -> list[PushEvent] | None:
    """The events of a body exactly as Dovecot's OX driver sends it; None for
    anything else, which :func:`_ox_checked` reads field by field.

    The hot path of every delivery: the same result as :func:`_ox_checked`
    for the bodies it takes (the hypothesis tests hold it to that), without
    collecting errors for each field.
    """
    get = data.get
    user: Any = get("user")
    folder: Any = get("folder")
    uid: Any = get("imap-uid")
    uid_validity: Any = get("imap-uidvalidity")
    unseen: Any = get("unseen")
    sender: Any = get("from")
    subject: Any = get("subject")
    snippet: Any = get("snippet")
    if not (type(user) is str and user.strip() and type(folder) is str and folder.strip()
            and data.get("event") == "messageNew"
            and _uint32(uid) and _uint32(uid_validity) and (unseen is None or _uint32(unseen))
            and _text_or_none(sender) and _text_or_none(subject) and _text_or_none(snippet)):
        return None
    return _ox_events(user, folder, uid_validity, [uid], unseen,
                      None if sender is None else decode_addresses(sender),
                      None if subject is None else decode_words(subject), snippet)


def _ox_checked(data: dict[str, Any]) -> list[PushEvent]:
    """The events of an OX body, every field checked, every error reported."""
    f = _Fields(data, "notification")
    user = f.text("user", required=True)
    raw_event = data.get("event")
    if not isinstance(raw_event, str):
        raise ValidationError("notification: field 'event' must be the text \"messageNew\"")
    if canonical_event(raw_event) != "message_new":
        raise ValidationError("notification: unsupported event %r (only messageNew)"
                              % raw_event[:80])
    folder = f.text("folder", required=True)
    uid_validity = f.integer("imap-uidvalidity", 0, UINT32, required=True)
    raw_uids = data.get("imap-uid")
    uids: list[int] = []
    if isinstance(raw_uids, list):
        if not raw_uids:
            f._error("imap-uid", "must not be an empty array")
        for index, item in enumerate(raw_uids):
            uid = _Fields({"imap-uid": item}, "notification").integer("imap-uid", 0, UINT32)
            if uid is None:
                f._error("imap-uid", "item %d must be a whole number from 0 to %d"
                         % (index, UINT32))
                break
            uids.append(uid)
    else:
        uid = f.integer("imap-uid", 0, UINT32, required=True)
        if uid is not None:
            uids.append(uid)
    unseen = f.integer("unseen", 0, UINT32)
    sender = f.text("from", words=True)
    subject = f.text("subject", words=True)
    snippet = f.text("snippet")
    f.done()
    assert user is not None
    return _ox_events(user, folder, uid_validity, uids, unseen, sender, subject, snippet)


def _ox_events(user: str, folder: str | None, uid_validity: int | None, uids: list[int],
               unseen: int | None, sender: str | None, subject: str | None,
               snippet: str | None) -> list[PushEvent]:
    events = []
    for uid in uids:
        payload = dict.fromkeys(MESSAGE_FIELDS)
        payload.update({
            "user": user, "event": "message_new", "driver": "ox", "mailbox": folder,
            "uid": uid, "uid_validity": uid_validity, "from": sender, "subject": subject,
            "snippet": snippet, "flags": [], "keywords": [], "unseen": unseen,
        })
        events.append(PushEvent("mail:new", payload))
    return events


def decode_lua(body: bytes) -> list[PushEvent]:
    """Events of one Lua-driver body, whatever its Content-Type.

    A body that starts with ``{`` is JSON: ``{"user", "events": [...]}`` or a
    single event object; anything else is read as a form
    (``user=...&name=...``), where a missing ``name`` means ``message_new``
    (Dovecot's example script sends no name, and hooks only new and
    appended messages). A flag change that names no flag and no keyword is
    left out.
    """
    text = decode_utf8(body, "the body")
    if text.lstrip().startswith("{"):
        data = decode_json_object(text, "the body")
        if "events" in data:
            events = data["events"]
            if isinstance(events, dict) and not events:
                events = []  # an empty Lua table encoded as an object
            if not isinstance(events, list):
                raise ValidationError("field 'events' must be an array of event objects")
            out = []
            for index, item in enumerate(events):
                if not isinstance(item, dict):
                    raise ValidationError("events[%d] must be an object" % index)
                out.append(_lua_event(item, data.get("user"), "events[%d]" % index, None))
            return [e for e in out if _changes_something(e)]
        found = [_lua_event(data, None, "event", None)]
    else:
        found = [_lua_event(_form(text), None, "form", "message_new")]
    return [e for e in found if _changes_something(e)]


def _changes_something(event: PushEvent) -> bool:
    """False for a flags_set or flags_clear that names no flag and no keyword.

    Dovecot reports both for every flag change, the one that did nothing
    with empty lists; publishing it would only be noise on ``mail:flags``.
    """
    data = event.data
    return not (data["event"] in ("flags_set", "flags_clear")
                and not data["flags"] and not data["keywords"])


def _form(text: str) -> dict[str, Any]:
    try:
        pairs = parse_qsl(text.strip(), keep_blank_values=True, strict_parsing=False,
                          errors="strict", max_num_fields=MAX_FORM_FIELDS)
    except UnicodeDecodeError as e:
        raise ValidationError("the form body is not valid UTF-8 after percent-decoding "
                              "(byte %d of a value)" % e.start)
    except ValueError as e:
        raise ValidationError("the body is neither JSON nor a valid form: %s" % e)
    if not pairs:
        raise ValidationError("the body is empty: expected JSON or a form")
    fields: dict[str, Any] = {}
    for key, value in pairs:
        fields[key] = value
    return fields


Decoder = Callable[[bytes], list[PushEvent]]
