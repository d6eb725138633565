"""Point-to-point work queues (the collector's ``collector:email``).

The wire layout is OpenPaaS's (REFERENCE.md section 1): a durable fanout
exchange and a durable, non-exclusive queue with the same name, bound with
``''``. Every mailhub process consuming the queue competes with the others,
so each message is handled once. What mailhub adds:

- publications are persistent and confirmed (through the broker's outbox);
- a message is acked only after its handler succeeded;
- a handler that raises :class:`~mailhub.errors.ValidationError` (the message
  can never succeed) sends the message, properties kept, to a durable
  dead-letter queue with the reason in the ``x-mailhub-reason`` header (and
  an id and the time in ``x-mailhub-dead-id`` and ``x-mailhub-dead-at``, for
  ``mailhub dead``: :mod:`mailhub.pubsub.deadletters`), and only then acks
  the original;
- any other failure is transient: the handler is tried again with exponential
  backoff while the message stays unacked, so it is never dropped. If the
  connection dies meanwhile, the retries stop and the broker redelivers the
  message to whichever consumer is alive;
- ``basic.qos`` prefetch bounds how many messages one process holds;
- ``queue_type="quorum"`` declares the queue and its dead-letter queue as
  RabbitMQ quorum queues (``x-queue-type``), replicated on the nodes of a
  cluster, so that they survive the loss of a node; the default declares
  them with no arguments, as OpenPaaS does.

With ``exchange`` set, the queue is instead a *shared subscription* to a
global topic: the durable, non-exclusive queue ``name`` is bound with ``''``
to the topic's fanout exchange ``exchange`` (declared as
:class:`~mailhub.pubsub.globalpubsub.GlobalPubSub` declares it, durable fanout, so
ESN nodes can share it). Every publication on the topic reaches that queue
once, next to each ordinary subscriber's own queue, and the mailhub
instances consuming it compete for it: each publication is handled by one of
them, with the same ack, retry and dead-letter rules.
"""

from __future__ import annotations

import uuid
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailhub.errors import Unavailable
from mailhub.logs import printable
from mailhub.metrics import Metrics
from mailhub.pubsub.connection import JSON_PROPERTIES, encode_json
from mailhub.pubsub.consumer import Consumer, IDelivery
from mailhub.pubsub.interfaces import Handler, IWorkQueue
from mailhub.pubsub.outbox import Outbox, Route
from mailhub.pubsub.retry import Outcome, RetryPolicy, attempt, queue_counters

#: The values of ``[collector] queue_type``: RabbitMQ's queue types.
QUEUE_TYPES = ("classic", "quorum")

#: ``x-delivery-limit`` of a quorum dead-letter queue (see ``WorkQueue.dead_route``).
DEAD_LETTER_DELIVERY_LIMIT = 1_000_000

REASON_HEADER = "x-mailhub-reason"
QUEUE_HEADER = "x-mailhub-queue"
ID_HEADER = "x-mailhub-dead-id"
AT_HEADER = "x-mailhub-dead-at"

__all__ = ["IDelivery", "WorkQueue", "QUEUE_TYPES", "REASON_HEADER", "QUEUE_HEADER",
           "ID_HEADER", "AT_HEADER"]


def encode_body(data: Any) -> bytes:
    """A work queue message's body: bytes as they are, str as UTF-8, else JSON."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    return encode_json(data).encode("utf-8")


@implementer(IWorkQueue)
class WorkQueue:
    """A durable queue that mailhub processes share; see the module docstring.

    Built by :meth:`mailhub.pubsub.wiring.PubSub.work_queue`; registers itself
    with the broker connection when given one (``broker.add``).
    """

    log = Logger()

    def __init__(self, outbox: Outbox, name: str, clock: Any,
                 dead_letter: str | None = None, retry_initial: float = 1.0,
                 retry_max: float = 300.0, prefetch: int = 16,
                 metrics: Metrics | None = None, broker: Any = None,
                 exchange: str | None = None, routing_key: str = "",
                 queue_type: str = "classic") -> None:
        if queue_type not in QUEUE_TYPES:
            raise ValueError("queue type %r: expected %s" % (queue_type, " or ".join(QUEUE_TYPES)))
        self.outbox = outbox
        #: ``classic`` (declared with no arguments, as OpenPaaS declares
        #: ``collector:email``) or ``quorum`` (the queue and its dead-letter
        #: queue replicated on the nodes of a RabbitMQ cluster).
        self.queue_type = queue_type
        self.name = name
        #: The fanout exchange the queue is bound to: its own name for a
        #: point-to-point queue, a topic's for a shared subscription.
        self.exchange = exchange or name
        #: A point-to-point queue takes its exchange as it is when it exists
        #: with another type (Apache James makes ``collector:email`` a direct
        #: exchange): the queue is then bound, and publications are sent,
        #: with ``routing_key``, the key its other publishers use.
        self.adopt = exchange is None
        self.routing_key = routing_key
        self._setting_up: Any = None
        self.dead_letter = dead_letter or name + ":dead"
        self.clock = clock
        self.policy = RetryPolicy(retry_initial, retry_max)
        self.prefetch = prefetch
        self._handler: Handler | None = None
        self._consumer: Any = None
        self._sleeping: dict[Deferred[None], Any] = {}
        metrics = metrics or Metrics()
        self._acked, self._dead, self._retries = queue_counters(metrics, name)
        self._abandoned = metrics.counter(
            "mailhub_workqueue_abandoned_total",
            "work queue messages left to the broker to redeliver (connection lost)",
            ["queue"]).labels(name)
        self.in_progress = 0
        if broker is not None:
            broker.add(self)

    @property
    def retry_initial(self) -> float:
        """Seconds before the first retry of a failed message."""
        return self.policy.initial

    @property
    def retry_max(self) -> float:
        """The longest wait between two tries."""
        return self.policy.maximum

    @property
    def queue_arguments(self) -> tuple[tuple[str, Any], ...]:
        """The queues' declaration arguments: none for classic queues."""
        if self.queue_type == "classic":
            return ()
        return (("x-queue-type", self.queue_type),)

    @property
    def route(self) -> Route:
        """Publish to the exchange; the queue and its binding are declared first."""
        return Route(self.exchange, self.routing_key, queue=self.name, adopt=self.adopt,
                     queue_arguments=self.queue_arguments)

    @property
    def dead_route(self) -> Route:
        """The dead-letter queue, of the same type as the queue.

        A quorum dead-letter queue gets a delivery limit no one reaches:
        ``mailhub dead list`` reads letters with ``basic.get`` and puts them
        back, which a quorum queue counts as deliveries, and RabbitMQ 4 drops
        a message after 20 of them by default.
        """
        arguments = self.queue_arguments
        if self.queue_type == "quorum":
            arguments += (("x-delivery-limit", DEAD_LETTER_DELIVERY_LIMIT),)
        return Route("", self.dead_letter, queue=self.dead_letter, queue_arguments=arguments)

    def publish(self, data: Any) -> Deferred[None]:
        """Publish one message (bytes as they are, anything else as JSON).

        For a shared subscription this publishes on the topic: every
        subscriber of the topic gets it, and this queue once.

        Persistent; fires when the broker confirmed it; fails with
        :class:`~mailhub.errors.Unavailable` when the outbox is full.
        """
        return self.outbox.put(self.route, encode_body(data), JSON_PROPERTIES)

    def consume(self, handler: Handler) -> None:
        """Hand every message's body to ``handler`` (value, Deferred or coroutine).

        Consumption starts on the current connection, if any, and on each new one.
        """
        if self._handler is not None:
            raise ValueError("work queue %s already has a consumer" % self.name)
        self._handler = handler

    def resume(self) -> None:
        """Nothing to do: the broker redelivers what an earlier run left unacked."""

    # Broker connection life cycle -------------------------------------

    async def connected(self, session: Any) -> None:
        """Declare the queues; start consuming when a handler is set.

        Called again while the broker refuses a declaration (see
        :meth:`~mailhub.pubsub.connection.Broker.health`): does nothing when
        the queue is already consumed on ``session``. A refusal raises
        :class:`~mailhub.pubsub.outbox.Refused`; only this queue waits.
        """
        if self._setting_up is session or (
                self._consumer is not None and self._consumer.session is session):
            return
        self._setting_up = session
        try:
            await session.declare_route(self.route)
            await session.declare_route(self.dead_route)
            if self._handler is not None:
                self._consumer = await Consumer.start(session, self.name, self.prefetch,
                                                      self.handle, sequential=False,
                                                      clock=self.clock)
        finally:
            self._setting_up = None

    def disconnected(self, session: Any) -> None:
        """Stop retrying messages whose channel died: the broker redelivers them."""
        if self._consumer is not None and self._consumer.session is session:
            self._consumer = None
        for sleep, delivery in list(self._sleeping.items()):
            if not delivery.alive():
                sleep.cancel()

    def stop(self) -> None:
        """Cancel every pending retry (at shutdown)."""
        for sleep in list(self._sleeping):
            sleep.cancel()

    async def drain(self, timeout: float) -> None:
        """At shutdown: take no new message, let those being handled finish.

        Messages waiting for a retry are left to the broker (unacked, so it
        redelivers them to another instance); messages being handled get up
        to ``timeout`` seconds to finish, so that the work they started (a
        contact written, its announcement published) is not cut in half.
        """
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                await consumer.cancel()
            except Exception:
                self.log.failure("cancelling the consumer of {queue} failed", queue=self.name)
        self.stop()
        waited = 0.0
        while self.in_progress and waited < timeout:
            await deferLater(self.clock, 0.05, lambda: None)
            waited += 0.05
        if self.in_progress:
            self.log.warn("{count} message(s) from {queue} still in progress at shutdown; "
                          "the broker will redeliver them", count=self.in_progress,
                          queue=self.name)

    # One message ------------------------------------------------------

    def handle(self, delivery: IDelivery) -> Deferred[None]:
        """Handle one delivery until it is acked, dead-lettered or abandoned."""
        return Deferred.fromCoroutine(self._handle(delivery))

    async def _handle(self, delivery: IDelivery) -> None:
        assert self._handler is not None
        self.in_progress += 1
        try:
            settled = await attempt(self._handler, delivery.body, self.policy,
                                    lambda delay: self._sleep(delivery, delay),
                                    self._retrying, delivery.alive)
            if settled.outcome is Outcome.DONE:
                if await self._ack(delivery):
                    self._acked.inc()
            elif settled.outcome is Outcome.DEAD:
                await self._send_to_dead_letter(delivery, settled.reason)
            else:
                self._abandon()
        finally:
            self.in_progress -= 1

    def _retrying(self, failure: Failure, delay: float) -> None:
        self._retries.inc()
        self.log.failure("handling a message from {queue} failed; retrying in {delay} s",
                         failure, queue=self.name, delay=delay)

    async def _send_to_dead_letter(self, delivery: IDelivery, reason: str) -> None:
        self.log.warn("message from {queue} can never succeed, dead-lettered to "
                      "{dead}: {reason}", queue=self.name, dead=self.dead_letter,
                      reason=printable(reason))
        properties = dict(delivery.properties)
        headers = dict(properties.get("headers") or {})
        headers[REASON_HEADER] = reason
        headers[QUEUE_HEADER] = self.name
        # What `mailhub dead` names and dates the letter by (a queue's
        # messages have no address of their own); a new one each time the
        # message dies.
        headers[ID_HEADER] = uuid.uuid4().hex[:12]
        headers[AT_HEADER] = int(self.clock.seconds())
        properties["headers"] = headers
        properties["delivery-mode"] = 2
        delay = self.policy.initial
        while True:
            try:
                await self.outbox.put(self.dead_route, delivery.body, properties)
                break
            except Unavailable as e:
                self.log.warn("cannot dead-letter a message from {queue} yet: {error}",
                              queue=self.name, error=str(e))
                if not await self._sleep(delivery, delay):
                    self._abandon()
                    return
                delay = self.policy.after(delay)
        if await self._ack(delivery):
            self._dead.inc()

    async def _sleep(self, delivery: IDelivery, delay: float) -> bool:
        """Wait ``delay`` seconds; False when cancelled (connection lost, shutdown)."""
        sleep: Deferred[None] = deferLater(self.clock, delay, lambda: None)
        self._sleeping[sleep] = delivery
        try:
            await sleep
        except CancelledError:
            return False
        finally:
            self._sleeping.pop(sleep, None)
        return delivery.alive()

    async def _ack(self, delivery: IDelivery) -> bool:
        if not delivery.alive():
            self._abandon()
            return False
        try:
            await delivery.ack()
        except Exception:
            self._abandon()
            return False
        return True

    def _abandon(self) -> None:
        self._abandoned.inc()
        self.log.info("a message from {queue} was left to the broker to redeliver "
                      "(its connection is gone)", queue=self.name)
