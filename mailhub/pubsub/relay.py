"""Events a web surface accepted, published after its answer: bounded and in order.

A surface that must answer at once (the push receiver: Dovecot's delivery
waits for it) hands each request's events to a :class:`Relay` and answers;
the relay publishes them on the next reactor turns:

1. on ``hub.local`` first (in-process subscribers: the collector's mail
   source), never held up by the broker;
2. then on ``hub.global_`` (this process's event streams at once, other
   nodes through RabbitMQ), in order. While the broker's outbox is full the
   events wait here, and go on as soon as it has room
   (:meth:`~mailhub.pubsub.interfaces.IPubSub.when_room`). Without a broker
   ``global_`` is ``local`` and step 2 is skipped.

The relay holds at most ``limit`` requests' events (accepted and not yet
handed to the global pubsub); :meth:`Relay.has_room` tells the surface to
answer 503 + ``Retry-After`` instead, so overload never queues without
bound. Nothing accepted is dropped while mailhub runs; at shutdown the
outbox gets :data:`STOP_WAIT` seconds more to take what waits, and what it
cannot take is counted and logged as a publication error.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol, Sequence

from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailhub.metrics import Metrics
from mailhub.pubsub import Hub

#: In-process publications whose subscribers have not finished (a subscriber
#: may return a Deferred) before the relay stops taking more from its queue.
#: Publications to the broker are bounded by its outbox instead.
MAX_IN_FLIGHT = 256
#: Seconds a shutdown goes on offering waiting events to the outbox.
STOP_WAIT = 5.0
#: Requests taken from the queue per reactor turn, so answering new requests
#: interleaves with publishing.
DRAIN_BATCH = 100


class Event(Protocol):
    """What a relay publishes: a topic and its data (e.g. a push event)."""

    @property
    def topic(self) -> str: ...

    @property
    def data(self) -> Any: ...


class Relay:
    """Publishes handed-over events after the answer; see the module docstring.

    Metrics (``name`` is the surface, e.g. ``push``):
    ``mailhub_{name}_events_total{topic}`` (published: confirmed by the broker,
    or handed to the local subscribers without one),
    ``mailhub_{name}_publish_errors_total{topic}`` and
    ``mailhub_{name}_queue_length`` (requests accepted, not yet published).
    """

    log = Logger()

    def __init__(self, hub: Hub, clock: IReactorTime, limit: int, metrics: Metrics,
                 name: str = "push") -> None:
        self._hub = hub
        self._clock = clock
        self.limit = limit
        #: Accepted, not yet published in process.
        self._queue: deque[Sequence[Event]] = deque()
        #: Published in process, waiting for room in the global pubsub.
        self._outgoing: deque[list[Event]] = deque()
        self._drain_call: Any = None
        self._room: Deferred[None] | None = None
        self._emptied: Deferred[None] | None = None
        self._in_flight = 0
        self._local_only = hub.global_ is hub.local
        self._published = metrics.counter(
            "mailhub_%s_events_total" % name,
            "%s events published, by topic" % name.capitalize(), ["topic"])
        self._publish_errors = metrics.counter(
            "mailhub_%s_publish_errors_total" % name,
            "%s events whose publication failed" % name.capitalize(), ["topic"])
        metrics.gauge_callback("mailhub_%s_queue_length" % name,
                               "%s requests accepted and not yet published"
                               % name.capitalize(), self.pending)
        self._published_by_topic: dict[str, Any] = {}

    def pending(self) -> int:
        """Requests accepted whose events are not yet all handed to the pubsub."""
        return len(self._queue) + len(self._outgoing)

    def has_room(self) -> bool:
        """Whether :meth:`hand_over` may be called (else: answer 503, retry later)."""
        return len(self._queue) + len(self._outgoing) < self.limit

    def hand_over(self, events: Sequence[Event]) -> None:
        """Take one request's events, to publish after the answer (no waiting here)."""
        if events:
            self._queue.append(events)
            if self._drain_call is None:
                self._schedule()

    def stop(self) -> Deferred[None]:
        """Publish whatever is still queued (on shutdown) and stop draining.

        Events waiting for room in the broker's outbox are offered to it for
        up to :data:`STOP_WAIT` seconds more (the broker is still connected
        then); what it cannot take by then is counted and logged as a
        publication error.
        """
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        self._drain_call = None
        while self._queue:
            self._hand_over_one(self._queue.popleft())
        self._send_outgoing()
        return Deferred.fromCoroutine(self._flush())

    # -- publishing, after the answer --------------------------------------

    def _schedule(self) -> None:
        if self._drain_call is None and self._queue and self._in_flight < MAX_IN_FLIGHT:
            self._drain_call = self._clock.callLater(0, self._drain)

    def _drain(self) -> None:
        self._drain_call = None
        budget = DRAIN_BATCH
        while self._queue and budget and self._in_flight < MAX_IN_FLIGHT:
            budget -= 1
            self._hand_over_one(self._queue.popleft())
        self._send_outgoing()
        self._schedule()

    def _hand_over_one(self, events: Sequence[Event]) -> None:
        """Publish one request's events in process, and line them up for global_."""
        for event in events:
            self._publish_local(event)
        if not self._local_only:
            self._outgoing.append(list(events))

    def _publish_local(self, event: Event) -> None:
        """Publish in process; without a broker that is the whole publication."""
        try:
            d = self._hub.local.topic(event.topic).publish(event.data)
        except Exception:
            self._publish_failed(Failure(), event.topic)
            return
        if d.called:
            # Plain subscribers (the usual case): done already, and a local
            # publication never fails (subscribers' errors are logged there).
            if self._local_only:
                self._count_published(event.topic)
            return
        self._in_flight += 1

        def finished(result: object) -> None:
            self._in_flight -= 1
            if isinstance(result, Failure):
                self._publish_failed(result, event.topic)
            elif self._local_only:
                self._count_published(event.topic)
            self._schedule()

        d.addBoth(finished)

    def _send_outgoing(self) -> None:
        """Hand waiting events to the global pubsub, in order, while it has room."""
        if self._room is not None:
            return  # waiting for room already
        global_ = self._hub.global_
        while self._outgoing:
            events = self._outgoing[0]
            while events:
                if not global_.has_room():
                    # The outbox is full (the broker has been away long):
                    # keep the events here, in order, until it has room.
                    self._room = global_.when_room()
                    self._room.addCallbacks(self._room_made, lambda _: None)
                    return
                event = events.pop(0)
                try:
                    d = global_.topic(event.topic).publish(event.data)
                except Exception:
                    self._publish_failed(Failure(), event.topic)
                    continue
                d.addCallbacks(self._confirmed, self._publish_failed,
                               callbackArgs=(event.topic,), errbackArgs=(event.topic,))
            self._outgoing.popleft()
        if self._emptied is not None:
            emptied, self._emptied = self._emptied, None
            emptied.callback(None)

    def _room_made(self, _: object) -> None:
        self._room = None
        self._send_outgoing()

    def _confirmed(self, _: object, topic: str) -> None:
        self._count_published(topic)

    def _publish_failed(self, failure: Failure, topic: str) -> None:
        """Count and log a publication that failed (in process, or refused by the broker)."""
        self._publish_errors.labels(topic).inc()
        self.log.failure("publishing {topic} failed", failure, topic=topic)

    def _count_published(self, topic: str) -> None:
        counter = self._published_by_topic.get(topic)
        if counter is None:
            counter = self._published_by_topic[topic] = self._published.labels(topic)
        counter.inc()

    async def _flush(self) -> None:
        if self._outgoing:
            self._emptied = Deferred()
            self._emptied.addTimeout(STOP_WAIT, self._clock)
            try:
                await self._emptied
            except DeferredTimeout:
                pass
            self._emptied = None
        if self._room is not None:
            room, self._room = self._room, None
            room.cancel()
        if self._outgoing:
            lost = [event for events in self._outgoing for event in events]
            for event in lost:
                self._publish_errors.labels(event.topic).inc()
            self.log.error("stopping with the AMQP outbox full: {count} events were "
                           "not published", count=len(lost))
            self._outgoing.clear()
