"""Publications on their way to the broker: bounded, ordered, confirmed.

Every publication mailhub makes over AMQP (global topics, the collector
queue, dead letters) goes through one :class:`Outbox` per broker connection.
The outbox holds a publication from the moment ``put`` is called until the
broker confirms it (publisher confirms, ``confirm.select``):

- while the broker is connected, queued publications are declared (once per
  route and connection) and sent at once, in order;
- while it is away they wait, and are sent when the next connection is
  attached; publications that were sent but not yet confirmed when the
  connection died are sent again (at-least-once: a subscriber may see one
  twice, it never misses one that was confirmed or still waiting);
- the outbox is bounded: when ``limit`` publications are waiting, ``put``
  fails at once with :class:`~mailhub.errors.Unavailable` and a counter goes
  up. Nothing is ever dropped without the caller's Deferred failing. A
  publisher that would rather wait asks :meth:`Outbox.has_room` first and
  waits on :meth:`Outbox.when_room`, which fires as soon as the broker has
  confirmed (or refused) enough to make room.

The outbox knows nothing of txamqp: it talks to an :class:`IPublishChannel`
(the real one lives in :mod:`mailhub.pubsub.connection`, tests use a fake).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import Interface

from mailhub.errors import Unavailable
from mailhub.metrics import Metrics


@attrs.frozen
class Route:
    """Where a publication goes, and what must exist on the broker first.

    ``exchange`` is a durable fanout exchange declared before the first
    publication on each connection (``""``, the default exchange, is never
    declared). When ``queue`` is set, that durable queue is declared too and,
    for a named exchange, bound to it with ``''``, so a publication made before
    any consumer started is kept rather than routed nowhere.
    """

    exchange: str
    routing_key: str = ""
    queue: str | None = None
    #: Take the exchange as it is when it exists with another type (the
    #: queue is then bound with ``routing_key``): the collector's queue.
    adopt: bool = False
    #: The queue's declaration arguments, as ``(name, value)`` pairs
    #: (``x-queue-type``: see ``[collector] queue_type``); none by default,
    #: as OpenPaaS declares ``collector:email``.
    queue_arguments: tuple[tuple[str, Any], ...] = ()


class Refused(Exception):
    """The broker refused a declaration (for instance PRECONDITION_FAILED).

    Raised by :meth:`IPublishChannel.declare` only when the broker answered;
    a lost connection raises anything else, and the publication waits.
    """


class IPublishChannel(Interface):
    """A connected AMQP channel in confirm mode, as the outbox needs it."""

    def declare(route: Route) -> Deferred[None]:
        """Make sure the route's exchange (and queue) exist.

        Fails with :class:`Refused` when the broker says no; with anything
        else when the connection is going away.
        """

    def publish(route: Route, body: bytes, properties: dict[str, Any]) -> None:
        """Send one basic.publish; its confirmation arrives through
        :meth:`Outbox.ack` / :meth:`Outbox.nack` with the next delivery tag."""


@attrs.define
class _Pending:
    route: Route
    body: bytes
    properties: dict[str, Any]
    done: Deferred[None]


class Outbox:
    """Publications waiting to be sent or confirmed; see the module docstring."""

    log = Logger()

    def __init__(self, limit: int, metrics: Metrics | None = None) -> None:
        self.limit = limit
        self._queued: deque[_Pending] = deque()
        self._inflight: dict[int, _Pending] = {}
        self._channel: Any = None
        self._declared: set[Route] = set()
        self._tag = 0
        self._pumping = False
        self._full_logged = False
        self._room_waiters: list[Deferred[None]] = []
        metrics = metrics or Metrics()
        metrics.gauge_callback(
            "mailhub_pubsub_outbox",
            "AMQP publications waiting to be sent or confirmed by the broker",
            lambda: len(self))
        self._full = metrics.counter(
            "mailhub_pubsub_outbox_full_total",
            "AMQP publications refused because the outbox was full")
        self._confirmed = metrics.counter(
            "mailhub_pubsub_confirmed_total",
            "AMQP publications confirmed by the broker")
        self._refused = metrics.counter(
            "mailhub_pubsub_refused_total",
            "AMQP publications the broker refused (nack or failed declaration)")

    def __len__(self) -> int:
        return len(self._queued) + len(self._inflight)

    def has_room(self) -> bool:
        """Whether :meth:`put` would take a publication now."""
        return len(self) < self.limit

    def when_room(self) -> Deferred[None]:
        """Fires once :meth:`has_room` is true (at once when it is)."""
        if self.has_room():
            return succeed(None)
        waiter: Deferred[None] = Deferred(lambda d: self._forget_waiter(d))
        self._room_waiters.append(waiter)
        return waiter

    def _forget_waiter(self, waiter: Deferred[None]) -> None:
        if waiter in self._room_waiters:
            self._room_waiters.remove(waiter)

    def _room_made(self) -> None:
        """Publications left: wake those waiting for room, oldest first."""
        while self._room_waiters and self.has_room():
            self._room_waiters.pop(0).callback(None)

    @property
    def attached(self) -> bool:
        """Whether a confirm-mode channel is attached (the broker is reachable)."""
        return self._channel is not None

    def put(self, route: Route, body: bytes,
            properties: dict[str, Any]) -> Deferred[None]:
        """Queue one publication; the Deferred fires when the broker confirms it.

        Fails at once with :class:`Unavailable` when the outbox is full.
        """
        if len(self) >= self.limit:
            self._full.inc()
            if not self._full_logged:
                self._full_logged = True
                self.log.warn("AMQP outbox full ({limit} publications waiting): "
                              "refusing new publications until the broker catches up",
                              limit=self.limit)
            return fail(Unavailable("the AMQP outbox is full (%d publications waiting "
                                    "for the broker)" % self.limit))
        self._full_logged = False
        done: Deferred[None] = Deferred()
        self._queued.append(_Pending(route, body, properties, done))
        self._pump()
        return done

    def attach(self, channel: IPublishChannel) -> None:
        """A new connection's channel, in confirm mode: send what waits."""
        self._channel = channel
        self._declared = set()
        self._tag = 0
        self._pump()

    def detach(self) -> None:
        """The connection is gone: unconfirmed publications go back in line."""
        self._channel = None
        self._declared = set()
        if self._inflight:
            self._queued.extendleft(reversed(list(self._inflight.values())))
            self._inflight = {}

    def ack(self, tag: int, multiple: bool) -> None:
        """The broker confirmed ``tag`` (and every earlier one if ``multiple``)."""
        settled = self._settle(tag, multiple)
        if settled:
            self._confirmed.inc(len(settled))
        for pending in settled:
            pending.done.callback(None)
        if settled:
            self._room_made()

    def nack(self, tag: int, multiple: bool) -> None:
        """The broker could not take ``tag`` (and earlier ones if ``multiple``)."""
        settled = self._settle(tag, multiple)
        for pending in settled:
            self._refused.inc()
            self.log.error("the broker refused a publication to {exchange!r}",
                           exchange=pending.route.exchange)
            pending.done.errback(Unavailable(
                "the broker refused the publication to %r" % (pending.route.exchange,)))
        if settled:
            self._room_made()

    def fail_all(self, reason: str) -> None:
        """Fail every waiting publication (at shutdown): loudly, never silently."""
        waiting = list(self._inflight.values()) + list(self._queued)
        self._inflight = {}
        self._queued.clear()
        for pending in waiting:
            pending.done.errback(Unavailable(reason))
        self._room_made()

    def _settle(self, tag: int, multiple: bool) -> list[_Pending]:
        if not multiple:
            found = self._inflight.pop(tag, None)
            return [] if found is None else [found]
        # Tags are handed out in increasing order and dicts keep insertion
        # order: the settled ones are at the front.
        settled = []
        inflight = self._inflight
        while inflight:
            first = next(iter(inflight))
            if first > tag:
                break
            settled.append(inflight.pop(first))
        return settled

    def _pump(self) -> None:
        """Send what waits, synchronously while no declaration is needed."""
        if self._pumping:
            return
        while self._queued and self._channel is not None:
            channel = self._channel
            pending = self._queued[0]
            if pending.route not in self._declared:
                self._pumping = True
                d = Deferred.fromCoroutine(self._declare(channel, pending))
                d.addErrback(lambda f: self.log.failure("AMQP outbox stopped sending", f))
                return
            self._queued.popleft()
            self._tag += 1
            self._inflight[self._tag] = pending
            channel.publish(pending.route, pending.body, pending.properties)

    async def _declare(self, channel: IPublishChannel, pending: _Pending) -> None:
        """Declare ``pending``'s route on ``channel``, then carry on sending."""
        try:
            await channel.declare(pending.route)
        except Refused as e:
            if channel is self._channel and self._queued and self._queued[0] is pending:
                self._queued.popleft()
                self._refused.inc()
                self.log.error("the broker refused to declare {route!r}: {reason}",
                               route=pending.route, reason=str(e))
                pending.done.errback(Unavailable(
                    "the broker refused %r: %s" % (pending.route.exchange, e)))
                self._room_made()
        except Exception:
            # The connection is going away: the publication waits for the
            # next one. attach() starts sending again, or already did while
            # we waited (then go on with the new channel).
            self._pumping = False
            if channel is not self._channel:
                self._pump()
            return
        else:
            if channel is self._channel:
                self._declared.add(pending.route)
        finally:
            self._pumping = False
        self._pump()
