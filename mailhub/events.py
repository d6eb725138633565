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

log = Logger(namespace="mailhub.events")

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
