"""The in-process pubsub: an event emitter with ESN's topic API.

Subscribers are called in subscription order; one that raises or fails is
logged and the others still run. ``publish`` returns a Deferred that fires
(with None) when every subscriber's result (a Deferred or coroutine, if any)
has finished, so a caller can wait for the work it started.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Sequence

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from zope.interface import implementer

from mailhub.pubsub.interfaces import IPubSub, ITopic, Subscriber, TopicSubscriber


@implementer(ITopic)
class LocalTopic:
    """One named topic of a :class:`LocalPubSub`."""

    log = Logger()

    def __init__(self, owner: IPubSub, name: str) -> None:
        self.owner = owner
        self.name = name
        self._subscribers: list[Subscriber] = []

    def subscribe(self, callback: Subscriber) -> Deferred[None]:
        """Call ``callback`` for every publication from now on (in place at once)."""
        self._subscribers.append(callback)
        return succeed(None)

    def unsubscribe(self, callback: Subscriber) -> None:
        """Stop calling ``callback``."""
        try:
            self._subscribers.remove(callback)
        except ValueError:
            pass

    def publish(self, data: Any) -> Deferred[None]:
        """Call every subscriber with ``data``; fire when their work is done.

        Subscribers that return plain values cost no Deferred: this is on the
        push receiver's path for every notification.
        """
        waits: list[Deferred[Any]] = []
        for callback in list(self._subscribers):
            try:
                result = callback(data)
            except Exception:
                self.log.failure("subscriber {subscriber!r} of {topic} failed",
                                 subscriber=callback, topic=self.name)
                continue
            if inspect.iscoroutine(result):
                result = Deferred.fromCoroutine(result)
            if isinstance(result, Deferred):
                waits.append(result.addErrback(self._failed, callback))
        if not waits:
            return succeed(None)
        if len(waits) == 1:
            return waits[0].addCallback(lambda _: None)
        return DeferredList(waits).addCallback(lambda _: None)

    def forward(self, other: IPubSub, data: Any) -> Deferred[None]:
        """Publish here, then on ``other`` under the same name."""
        here = self.publish(data)
        there = other.topic(self.name).publish(data) if other is not self.owner else succeed(None)
        return DeferredList([here, there], fireOnOneErrback=True, consumeErrors=True).addCallback(
            lambda _: None).addErrback(lambda f: f.value.subFailure)

    def _failed(self, failure: Any, callback: Subscriber) -> None:
        self.log.failure("subscriber {subscriber!r} of {topic} failed", failure,
                         subscriber=callback, topic=self.name)


@implementer(IPubSub)
class LocalPubSub:
    """Topics by name, created on first use."""

    def __init__(self) -> None:
        self._topics: dict[str, LocalTopic] = {}
        self._multi: dict[tuple[tuple[str, ...], TopicSubscriber], list[Subscriber]] = {}

    def topic(self, name: str) -> LocalTopic:
        """The topic called ``name``."""
        found = self._topics.get(name)
        if found is None:
            found = self._topics[name] = LocalTopic(self, name)
        return found

    def subscribe_topics(self, topics: Sequence[str],
                         callback: TopicSubscriber) -> Deferred[None]:
        """Call ``callback(topic, data)`` for every publication on ``topics``
        (in process, publication order is kept across topics anyway)."""
        parts: list[Subscriber] = self._multi.setdefault((tuple(topics), callback), [])
        for name in topics:
            part = functools.partial(callback, name)
            parts.append(part)
            self.topic(name).subscribe(part)
        return succeed(None)

    def unsubscribe_topics(self, topics: Sequence[str], callback: TopicSubscriber) -> None:
        """End what :meth:`subscribe_topics` started with the same arguments."""
        for part in self._multi.pop((tuple(topics), callback), []):
            self.topic(part.args[0]).unsubscribe(part)  # type: ignore[attr-defined]

    def has_room(self) -> bool:
        """Always: in process, a publication is handed over at once."""
        return True

    def when_room(self) -> Deferred[None]:
        """At once (see :meth:`has_room`)."""
        return succeed(None)
