"""The decoders: every documented shape, and any bytes at all."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailhub.decoding import decode_json_object
from mailhub.errors import ValidationError
from mailhub.push import TOPICS, PushEvent, decode_lua, decode_ox, decode_words
from mailhub.push.decode import decode_addresses

OX = {"user": "alice", "event": "messageNew", "folder": "INBOX",
      "imap-uidvalidity": 1, "imap-uid": 2}


def ox(**fields: Any) -> list[PushEvent]:
    return decode_ox(json.dumps({**OX, **fields}).encode("utf-8"))


def lua(body: Any) -> list[PushEvent]:
    return decode_lua(body if isinstance(body, bytes) else json.dumps(body).encode("utf-8"))


MESSAGE_KEYS = {"user", "event", "driver", "mailbox", "uid", "uid_validity", "date", "tz",
                "from", "to", "from_address", "from_display_name", "to_address",
                "to_display_name", "subject", "snippet", "message_id", "flags", "keywords",
                "unseen"}


def test_ox_event_is_accepted_in_any_case() -> None:
    for name in ("messageNew", "MessageNew", "MESSAGENEW", "message_new"):
        [event] = ox(event=name)
        assert event.topic == "mail:new"
        assert event.data["event"] == "message_new"


def test_ox_payload_has_every_field_of_mail_new() -> None:
    [event] = ox(**{"from": "a@x", "subject": "s", "snippet": "t", "unseen": 4})
    assert set(event.data) == MESSAGE_KEYS
    assert event.user == "alice"
    assert (event.data["from"], event.data["subject"], event.data["unseen"]) == ("a@x", "s", 4)


def test_ox_imap_uid_array_gives_one_event_per_uid() -> None:
    assert [e.data["uid"] for e in ox(**{"imap-uid": [5, 6]})] == [5, 6]
    with pytest.raises(ValidationError):
        ox(**{"imap-uid": []})
    with pytest.raises(ValidationError):
        ox(**{"imap-uid": [1, "x"]})


def test_ox_missing_fields_are_each_named() -> None:
    with pytest.raises(ValidationError) as raised:
        decode_ox(b'{"event": "messageNew"}')
    text = " ".join(raised.value.messages)
    for key in ("user", "folder", "imap-uidvalidity", "imap-uid"):
        assert repr(key) in text


def test_ox_rejects_nan_and_out_of_range_numbers() -> None:
    with pytest.raises(ValidationError):
        decode_ox(b'{"user":"a","event":"messageNew","folder":"INBOX",'
                  b'"imap-uidvalidity":NaN,"imap-uid":1}')
    with pytest.raises(ValidationError):
        ox(**{"imap-uid": 2**32})
    with pytest.raises(ValidationError):
        ox(**{"imap-uid": -1})


def test_encoded_words_are_decoded() -> None:
    assert decode_words("=?utf-8?q?Andr=C3=A9?= =?utf-8?b?TsOzcmE=?=") == "AndréNóra"
    assert decode_words("Re: =?ISO-8859-1?Q?caf=E9?= ok") == "Re: café ok"
    assert decode_words("=?x-unknown?q?abc?=") == "abc"
    assert decode_words("no words") == "no words"
    decode_words("=?unicode-escape?q?\\ud800?=").encode("utf-8")  # no lone surrogate


def test_lua_events_map_to_their_topics() -> None:
    names = {
        "MessageNew": "mail:new", "message_append": "mail:append",
        "MessageRead": "mail:flags", "FlagsSet": "mail:flags", "FlagsClear": "mail:flags",
        "MessageTrash": "mail:expunge", "MessageExpunge": "mail:expunge",
        "MailboxCreate": "mailbox:create", "MailboxDelete": "mailbox:delete",
        "MailboxRename": "mailbox:rename", "MailboxSubscribe": "mailbox:subscribe",
        "MailboxUnsubscribe": "mailbox:unsubscribe",
    }
    events = lua({"user": "bob", "events": [
        {"name": name, "mailbox": "INBOX", "uid": 1, "uid_validity": 2, "flags": ["\\Seen"]}
        for name in names]})
    assert [e.topic for e in events] == list(names.values())
    assert set(names.values()) == set(TOPICS)
    assert all(e.data["user"] == "bob" and e.data["driver"] == "lua" for e in events)


def test_message_read_says_seen_and_flags_clear_keeps_old_values() -> None:
    read, clear = lua({"user": "bob", "events": [
        {"name": "MessageRead", "mailbox": "INBOX", "uid": 1, "uid_validity": 2},
        {"name": "FlagsClear", "mailbox": "INBOX", "uid": 1, "uid_validity": 2,
         "flags": 8, "flags_old": ["\\Seen", "\\Answered"], "keywords": ["x"],
         "keywords_old": ["x", "y"]},
    ]})
    assert read.data["flags"] == ["\\Seen"]
    assert clear.data["flags"] == ["\\Seen"]  # the bitmask form, read as names
    assert clear.data["flags_old"] == ["\\Seen", "\\Answered"]
    assert clear.data["keywords_old"] == ["x", "y"]


def test_a_flag_change_that_names_nothing_is_left_out() -> None:
    # Dovecot reports a FlagsClear with nothing in it beside every FlagsSet.
    events = lua({"user": "bob", "events": [
        {"name": "FlagsSet", "mailbox": "INBOX", "uid": 1, "uid_validity": 2, "flags": 8,
         "keywords": {}},
        {"name": "FlagsClear", "mailbox": "INBOX", "uid": 1, "uid_validity": 2, "flags": 0,
         "keywords": {}},
        {"name": "FlagsClear", "mailbox": "INBOX", "uid": 1, "uid_validity": 2,
         "keywords": ["$Junk"]},
    ]})
    assert [(e.data["event"], e.data["flags"], e.data["keywords"]) for e in events] == [
        ("flags_set", ["\\Seen"], []), ("flags_clear", [], ["$Junk"])]
    assert lua(b"user=bob&name=FlagsSet&mailbox=INBOX&uid=1") == []


def test_single_event_body_and_per_event_user() -> None:
    [event] = lua({"user": "carol", "name": "MailboxCreate", "mailbox": "Archive"})
    assert event.data == {"user": "carol", "event": "mailbox_create", "driver": "lua",
                          "mailbox": "Archive"}
    [event] = lua({"user": "top", "events": [{"name": "MailboxDelete", "mailbox": "X",
                                               "user": "own"}]})
    assert event.user == "own"


def test_form_body_reads_numbers_from_text() -> None:
    [event] = lua(b"user=bob&name=MessageAppend&mailbox=Sent&uid=12&uid_validity=3.0"
                  b"&flags=%5CSeen+%5CDraft")
    assert (event.topic, event.data["uid"], event.data["uid_validity"]) == ("mail:append", 12, 3)
    assert event.data["flags"] == ["\\Seen", "\\Draft"]


def test_mailbox_events_need_a_mailbox() -> None:
    with pytest.raises(ValidationError):
        lua({"user": "bob", "name": "MailboxCreate"})


def test_lone_surrogates_are_refused() -> None:
    with pytest.raises(ValidationError):
        decode_ox(b'{"user":"\\ud800","event":"messageNew","folder":"INBOX",'
                  b'"imap-uidvalidity":1,"imap-uid":1}')


def test_deep_nesting_is_a_validation_error() -> None:
    with pytest.raises(ValidationError):
        decode_lua(b"{" + b'"a":[' * 100000 + b"]" * 100000 + b"}")


def _accepted(events: list[PushEvent]) -> None:
    for event in events:
        assert event.topic in TOPICS
        assert isinstance(event.user, str) and event.user
        json.dumps(event.data, ensure_ascii=False).encode("utf-8")  # publishable


def _either(decode: Any, body: bytes) -> None:
    try:
        events = decode(body)
    except ValidationError as e:
        assert e.messages and all(isinstance(m, str) for m in e.messages)
    else:
        _accepted(events)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from([
    "user", "event", "name", "folder", "imap-uidvalidity", "imap-uid", "from", "subject",
    "snippet", "unseen", "mailbox", "mailbox_old", "uid", "uid_validity", "date", "tz",
    "flags", "keywords", "flags_old", "keywords_old", "to", "message_id", "events",
]) | st.text(max_size=6)
event_names = st.sampled_from(["messageNew", "MessageAppend", "FlagsSet", "flags_clear",
                               "MailboxRename", "MessageRead", "bogus"])
shaped = st.dictionaries(field_names, json_values | event_names | st.integers(-5, 2**33),
                         max_size=12)
words = st.text(alphabet="=?qQbB_ abc0123456789ABCDEFutf-8iso+/\u00e9\ud800", max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_give_events_or_a_validation_error(body: bytes) -> None:
    _either(decode_ox, body)
    _either(decode_lua, body)


@settings(max_examples=300, deadline=None)
@given(shaped, st.lists(shaped, max_size=3))
def test_any_json_object_gives_events_or_a_validation_error(
        obj: dict[str, Any], events: list[dict[str, Any]]) -> None:
    body = json.dumps(obj).encode("utf-8")
    _either(decode_ox, body)
    _either(decode_lua, body)
    batch = json.dumps({"user": obj.get("user", "u"), "events": events}).encode("utf-8")
    _either(decode_lua, batch)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(field_names, st.text(max_size=20), max_size=8))
def test_any_form_gives_events_or_a_validation_error(fields: dict[str, str]) -> None:
    from urllib.parse import urlencode

    body = urlencode(fields, encoding="utf-8", errors="surrogatepass").encode("ascii")
    _either(decode_lua, body)


@settings(max_examples=500, deadline=None)
@given(words)
def test_decode_words_never_raises(text: str) -> None:
    assert isinstance(decode_words(text), str)


def test_decoded_address_lists_still_parse_as_the_same_addresses() -> None:
    body = json.dumps({"user": "alice", "events": [{
        "name": "message_append", "mailbox": "Sent", "uid": 1, "uid_validity": 1,
        "to": "=?utf-8?q?Doe=2C_John?= <j@x.org>, =?utf-8?q?Zo=C3=AB?= <z@x.org>, b@y.org",
    }]}).encode()
    (event,) = decode_lua(body)
    assert event.data["to"] == '"Doe, John" <j@x.org>, Zoë <z@x.org>, b@y.org'
    assert decode_addresses("plain <p@x.org>") == "plain <p@x.org>"
    assert decode_addresses('=?utf-8?q?Say_=22hi=22?= <s@x.org>') == '"Say \\"hi\\"" <s@x.org>'


ox_texts = st.text(alphabet="=?qQ_ <>@.,\"abcé\u00e9\ud800\udc00\U0001f600", max_size=30)
ox_bodies = st.fixed_dictionaries(
    {"user": ox_texts | st.just("alice@example.org"), "event": event_names,
     "folder": ox_texts | st.just("INBOX"),
     "imap-uidvalidity": st.integers(-1, 2**32) | json_values,
     "imap-uid": st.integers(-1, 2**32) | st.lists(st.integers(0, 9), max_size=2) | json_values},
    optional={"from": ox_texts | json_values, "subject": ox_texts | json_values,
              "snippet": ox_texts | json_values,
              "unseen": st.integers(-1, 2**32) | st.just("") | json_values})


@settings(max_examples=1000, deadline=None)
@given(ox_bodies)
def test_the_ox_fast_path_agrees_with_the_checked_path(data: dict[str, Any]) -> None:
    from mailhub.push.decode import _ox_as_sent, _ox_checked

    text = json.dumps(data)
    try:
        decoded = decode_json_object(text)
    except ValidationError:
        # Lone surrogates: the shared decoder refuses them before either path.
        with pytest.raises(ValidationError):
            decode_ox(text.encode("utf-8"))
        return
    fast = _ox_as_sent(decoded)
    try:
        checked = _ox_checked(decode_json_object(text))
    except ValidationError:
        assert fast is None  # whatever the checks refuse, the fast path leaves to them
    else:
        assert fast is None or fast == checked


def test_the_ox_fast_path_takes_what_dovecot_sends() -> None:
    from mailhub.push.decode import _ox_as_sent

    text = json.dumps({**OX, "from": "=?utf-8?q?Bj=C3=B6rn?= <b@x.org>", "subject": "Hi",
                       "snippet": "Hello", "unseen": 3})
    (event,) = _ox_as_sent(json.loads(text)) or []
    assert event.data["from"] == "Björn <b@x.org>" and event.data["unseen"] == 3
