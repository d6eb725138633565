"""Events mailhub publishes about itself, in one shape wherever they come from.

``login:success`` and ``login:failure`` are published by
:meth:`mailhub.auth.Auth.login`, the one password login of every surface
(MailStore ``cmd=auth``, the event stream, ``/dav/``), always as
``{"user", "source", "client", "at"}``, never with the password.
"""

from __future__ import annotations

import datetime
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailhub.push.events import TOPICS as PUSH_TOPICS

log = Logger(namespace="mailhub.events")

#: Every topic mailhub publishes on the global pubsub: doc/pubsub.rst's
#: topic catalogue, in its order. With a broker, each one's exchange is
#: declared as soon as a connection is set up (``mailhub.pubsub.wiring``),
#: so a client outside can bind to any of them before mailhub first
#: publishes on it.
PUBLISHED_TOPICS: tuple[str, ...] = PUSH_TOPICS + (
    "contacts:contact:add",
    "member:added", "member:left", "profile:created",
    "login:success", "login:failure",
    "token:rotated",
)

#: Logins longer than this are cut in published events.
MAX_PUBLISHED_LOGIN = 256


def login_event(succeeded: bool, login: str, source: str, client: str | None,
                seconds: float) -> tuple[str, dict[str, Any]]:
    """(topic, payload) of a checked login; ``seconds`` is the POSIX time."""
    at = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return ("login:success" if succeeded else "login:failure", {
        "user": login[:MAX_PUBLISHED_LOGIN],
        "source": source,
        "client": client,
        "at": at.isoformat().replace("+00:00", "Z"),
    })


def publish(hub: Any, topic: str, payload: dict[str, Any]) -> "Deferred[None]":
    """Publish locally, forward to the global pubsub; failures are logged, not raised."""
    d: Deferred[None] = hub.local.topic(topic).forward(hub.global_, payload)
    d.addErrback(lambda f: log.failure("publishing {topic} failed", f, topic=topic))
    return d
