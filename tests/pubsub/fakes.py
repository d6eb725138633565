"""In-memory stand-ins for the broker side of mailhub's pubsub."""

from __future__ import annotations

import os
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from mailhub.config import DEFAULT_SPEC
from mailhub.metrics import Metrics
from mailhub.pubsub.outbox import IPublishChannel, Outbox, Refused, Route
from mailhub.pubsub.workqueue import IDelivery


def require_spec(path: str = DEFAULT_SPEC) -> None:
    """Skip the test (a failure under CI=true) unless Debian's amqp-specs file is there."""
    if not os.path.isfile(path):
        pytest.skip("Debian's amqp-specs is not installed (%s)" % path)


@implementer(IPublishChannel)
class FakeChannel:
    """A confirm-mode channel that records what it was asked to do.

    ``refuse`` holds exchange names whose declaration the broker refuses;
    ``hold`` makes declarations wait until the test fires them.
    """

    def __init__(self) -> None:
        self.published: list[tuple[Route, bytes, dict[str, Any]]] = []
        self.declared: list[Route] = []
        self.refuse: set[str] = set()
        self.hold = False
        self.held: list[Deferred[None]] = []

    def declare(self, route: Route) -> Deferred[None]:
        self.declared.append(route)
        if route.exchange in self.refuse:
            return fail(Refused("406 PRECONDITION_FAILED"))
        if self.hold:
            d: Deferred[None] = Deferred()
            self.held.append(d)
            return d
        return succeed(None)

    def publish(self, route: Route, body: bytes, properties: dict[str, Any]) -> None:
        self.published.append((route, body, properties))

    @property
    def bodies(self) -> list[bytes]:
        return [body for _, body, _ in self.published]


@implementer(IDelivery)
class FakeDelivery:
    """A delivered message; ``kill()`` is its channel dying."""

    def __init__(self, body: bytes, properties: dict[str, Any] | None = None) -> None:
        self.body = body
        self.properties = properties or {}
        self.redelivered = False
        self.acks = 0
        self.requeues = 0
        self.settled = False
        self._alive = True

    def alive(self) -> bool:
        return self._alive

    def kill(self) -> None:
        self._alive = False

    def ack(self) -> Deferred[None]:
        if not self._alive:
            return fail(Exception("channel closed"))
        self.acks += 1
        self.settled = True
        return succeed(None)

    def requeue(self) -> Deferred[None]:
        if self.settled or not self._alive:
            return succeed(None)
        self.requeues += 1
        self.settled = True
        return succeed(None)


class FakeBroker:
    """What GlobalPubSub and WorkQueue need from a Broker, without a socket."""

    def __init__(self, limit: int = 100, prefetch: int = 4) -> None:
        self.metrics = Metrics()
        self.outbox = Outbox(limit, self.metrics)
        self.prefetch = prefetch
        self.reactor = Clock()
        self.users: list[Any] = []

    def add(self, user: Any) -> None:
        self.users.append(user)
