"""The events push notifications become: Dovecot's event names, topics, payloads.

Dovecot names its events ``MessageNew`` (RFC 5423 style, as the Lua driver
passes them in ``name``), the Lua functions use ``message_new``, and the OX
driver sends ``messageNew``. :func:`canonical_event` reads any of these
spellings, in any case, into the snake_case name used in payloads.

Each event is published on one topic (see ``doc/push.rst`` for the payloads):

==================  ==========================================
Dovecot event       topic
==================  ==========================================
message_new         ``mail:new``
message_append      ``mail:append``
message_read        ``mail:flags`` (``event`` says which)
flags_set           ``mail:flags``
flags_clear         ``mail:flags``
message_trash       ``mail:expunge`` (``event`` says which)
message_expunge     ``mail:expunge``
mailbox_create      ``mailbox:create``
mailbox_delete      ``mailbox:delete``
mailbox_rename      ``mailbox:rename``
mailbox_subscribe   ``mailbox:subscribe``
mailbox_unsubscribe ``mailbox:unsubscribe``
==================  ==========================================
"""

from __future__ import annotations

from typing import Any

import attrs

EVENT_TOPICS: dict[str, str] = {
    "message_new": "mail:new",
    "message_append": "mail:append",
    "message_read": "mail:flags",
    "flags_set": "mail:flags",
    "flags_clear": "mail:flags",
    "message_trash": "mail:expunge",
    "message_expunge": "mail:expunge",
    "mailbox_create": "mailbox:create",
    "mailbox_delete": "mailbox:delete",
    "mailbox_rename": "mailbox:rename",
    "mailbox_subscribe": "mailbox:subscribe",
    "mailbox_unsubscribe": "mailbox:unsubscribe",
}

#: Every topic the push receiver publishes, in catalogue order.
TOPICS: tuple[str, ...] = tuple(dict.fromkeys(EVENT_TOPICS.values()))

#: Events whose payload describes one message (mailbox, uid, uid_validity).
MESSAGE_EVENTS = frozenset(e for e in EVENT_TOPICS if not e.startswith("mailbox_"))

#: Events that carry the message's headers, snippet, flags and keywords.
CONTENT_EVENTS = frozenset({"message_new", "message_append"})

_BY_KEY = {name.replace("_", ""): name for name in EVENT_TOPICS}


def canonical_event(name: str) -> str | None:
    """``message_new`` for ``MessageNew``, ``messageNew``, ``message_new``...; else None."""
    key = name.strip().lower().replace("_", "").replace("-", "")
    return _BY_KEY.get(key)


def topic_of(event: str) -> str:
    """The topic a canonical event name is published on."""
    return EVENT_TOPICS[event]


@attrs.frozen
class PushEvent:
    """One decoded notification: the topic and the JSON payload to publish on it.

    ``data`` always has ``user`` (whom the notification is about, as Dovecot
    named them), ``event`` (the canonical Dovecot event name) and ``driver``
    (``ox`` or ``lua``), plus the fields of its topic.
    """

    topic: str
    data: dict[str, Any]

    @property
    def user(self) -> str:
        return str(self.data["user"])
