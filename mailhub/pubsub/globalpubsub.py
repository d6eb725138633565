"""The global pubsub over RabbitMQ, ESN-compatible.

:class:`GlobalPubSub` speaks ESN's wire format: one durable fanout exchange per
topic, named as the topic; JSON text bodies; routing key ``''``; each
subscription has its own queue bound to that exchange. ESN's queues are
server-named, exclusive and auto-delete, so they die with the connection and
a subscriber misses what is published until it is back; mailhub's are named
per subscription and expire (``x-expires``) only after
:data:`SUBSCRIPTION_EXPIRES` without a consumer, so a subscription that comes
back after a cut connection gets what was published meanwhile. Exchanges are
declared exactly as OpenPaaS declares them
(amqplib's ``assertExchange(topic, 'fanout')``, whose default is
``durable: true``), so both can share a topic without PRECONDITION_FAILED.

A process's own publications reach its own subscribers at once, in
publication order, whether the broker is there or not: ``publish`` calls
them in process (through a :class:`~mailhub.pubsub.local.LocalPubSub`), and
marks the message with the process's :attr:`GlobalPubSub.instance` in the
``x-mailhub-instance`` header, so that the copy coming back from the broker
is acked and skipped: each subscriber sees each publication exactly once,
its own at once and other nodes' (mailhub or ESN) through RabbitMQ.
"""

from __future__ import annotations

import functools
import uuid
from typing import Any, Callable, Sequence

import attrs
from twisted.internet.defer import (
    Deferred, DeferredList, TimeoutError as DeferredTimeout, fail, succeed,
)
from twisted.logger import Logger
from zope.interface import implementer

from mailhub.decoding import decode_json
from mailhub.errors import ValidationError
from mailhub.metrics import Metrics
from mailhub.pubsub.connection import JSON_PROPERTIES, Broker, Session, encode_json
from mailhub.pubsub.consumer import Consumer, IDelivery
from mailhub.pubsub.interfaces import IPubSub, ITopic, Subscriber, TopicSubscriber
from mailhub.pubsub.local import LocalPubSub
from mailhub.pubsub.outbox import Refused, Route
from mailhub.pubsub.retry import call_handler

#: The header that names the mailhub process that published a message.
INSTANCE_HEADER = "x-mailhub-instance"

#: long enough to come back after a cut connection or a broker restart, short
#: enough that a node that died leaves nothing behind for long.
SUBSCRIPTION_EXPIRES = 300_000
#: Messages a subscription's queue keeps at most while its node is away
#: (``x-max-length``; the oldest go first).
SUBSCRIPTION_MAX_LENGTH = 100_000


def _queue_name(label: str) -> str:
    """A subscription's own queue: recognisable, unique, within AMQP's 255 bytes."""
    return "mailhub.sub.%s.%s" % (label.encode("utf-8")[:200].decode("utf-8", "ignore"),
                                  uuid.uuid4().hex)


@attrs.define(eq=False)
class _Subscription:
    """One subscription: one queue, bound to the exchange of each of its topics."""

    topics: tuple[str, ...]
    #: What the caller subscribed (to find it again on unsubscribe).
    callback: Any
    #: Called with (topic, data) for each message from the broker.
    deliver: Callable[[str, Any], Any]
    #: What was subscribed in process, for this process's own publications.
    here: list[tuple[str, Subscriber]]
    queue: str = attrs.field(default=attrs.Factory(
        lambda self: _queue_name(self.topics[0] if len(self.topics) == 1
                                 else "+".join(self.topics)), takes_self=True))
    consumer: Consumer | None = None
    #: Topics whose exchange the queue is bound to on the consumer's session.
    bound: set[str] = attrs.Factory(set)
    #: The session being set up now (a second set-up waits for the next retry).
    starting: Any = None
    active: bool = False
    waiting: list[Deferred[None]] = attrs.Factory(list)

    @classmethod
    def to_topic(cls, topic: str, callback: Subscriber) -> "_Subscription":
        """A subscription to one topic: ``callback(data)``."""
        return cls((topic,), callback, lambda _, data: callback(data), [(topic, callback)])

    def ready(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)


@implementer(ITopic)
class GlobalTopic:
    """One topic of the :class:`GlobalPubSub`: ESN's topic API over AMQP."""

    def __init__(self, owner: "GlobalPubSub", name: str) -> None:
        self.owner = owner
        self.name = name
        self._route = Route(name)
        self._here = owner._here.topic(name)

    def subscribe(self, callback: Subscriber) -> Deferred[None]:
        """Call ``callback(data)`` for every publication on this topic, from any node.

        The returned Deferred fires once the subscription's queue is bound on
        the broker (later if the broker is away now); callers may ignore it.
        """
        return self.owner._subscribe(self.name, callback)

    def unsubscribe(self, callback: Subscriber) -> None:
        """Stop calling ``callback`` for this topic (each of its subscriptions)."""
        self.owner._unsubscribe(self.name, callback)

    def publish(self, data: Any) -> Deferred[None]:
        """Publish ``data`` as JSON: to this process's subscribers at once, and
        to the broker; fires when the broker has confirmed it (and this
        process's subscribers have finished).

        Fails with :class:`~mailhub.errors.Unavailable` when the outbox is
        full (the broker has been away too long; then nobody saw it) or the
        broker refused it.
        """
        try:
            body = encode_json(data).encode("utf-8")
        except (TypeError, ValueError) as e:
            return fail(TypeError("cannot publish %r on %s as JSON: %s" % (data, self.name, e)))
        outbox = self.owner.outbox
        if not outbox.has_room():
            return outbox.put(self._route, body, self.owner.properties)  # fails: full
        confirmed = outbox.put(self._route, body, self.owner.properties)
        here = self._here.publish(data)
        if here.called:  # plain subscribers (the usual case): nothing to wait for
            return confirmed
        return DeferredList([confirmed, here], fireOnOneErrback=True, consumeErrors=True
                            ).addCallback(lambda _: None).addErrback(
                                lambda f: f.value.subFailure)

    def forward(self, other: IPubSub, data: Any) -> Deferred[None]:
        """Publish here, then on ``other`` under the same name (ESN's forward)."""
        here = self.publish(data)
        if other is self.owner:
            return here
        there = other.topic(self.name).publish(data)
        return DeferredList([here, there], fireOnOneErrback=True, consumeErrors=True
                            ).addCallback(lambda _: None).addErrback(
                                lambda f: f.value.subFailure)


@implementer(IPubSub)
class GlobalPubSub:
    """ESN's global pubsub: topics shared by every node on the broker.

    Subscriptions outlive connections: each is set up again on every new
    connection. A subscriber that raises or fails is logged and the others
    (on this topic and every other) still run. Messages that are not JSON (or
    nest too deep to decode) are logged, counted and acked (a raw
    publisher's mistake cannot stop a topic). This process's own
    publications are delivered in process (see the module docstring).
    """

    log = Logger()

    def __init__(self, broker: Broker, metrics: Metrics | None = None) -> None:
        self.broker = broker
        self.outbox = broker.outbox
        self.prefetch = broker.prefetch
        #: This process's mark on its publications (``x-mailhub-instance``).
        self.instance = uuid.uuid4().hex
        #: The AMQP properties of every publication: persistent JSON, marked.
        self.properties: dict[str, Any] = dict(
            JSON_PROPERTIES, headers={INSTANCE_HEADER: self.instance})
        #: This process's subscribers, called at once by its own publications.
        self._here = LocalPubSub()
        self._topics: dict[str, GlobalTopic] = {}
        self._subscriptions: list[_Subscription] = []
        self._ending: set[Deferred[None]] = set()
        self._session: Session | None = None
        metrics = metrics or broker.metrics
        self._received = metrics.counter(
            "mailhub_pubsub_received_total", "global pubsub messages received")
        self._bad = metrics.counter(
            "mailhub_pubsub_bad_messages_total",
            "global pubsub messages dropped because they were not JSON")
        self._subscriber_failures = metrics.counter(
            "mailhub_pubsub_subscriber_failures_total", "global pubsub subscribers that failed")
        broker.add(self)

    def topic(self, name: str) -> GlobalTopic:
        """The topic called ``name`` (an exchange of the same name)."""
        found = self._topics.get(name)
        if found is None:
            found = self._topics[name] = GlobalTopic(self, name)
        return found

    def has_room(self) -> bool:
        """Whether the outbox takes a publication now."""
        return self.outbox.has_room()

    def when_room(self) -> Deferred[None]:
        """Fires once the outbox has room (see :meth:`Outbox.when_room`)."""
        return self.outbox.when_room()

    def subscribe_topics(self, topics: Sequence[str],
                         callback: TopicSubscriber) -> Deferred[None]:
        """Call ``callback(topic, data)`` for every publication on ``topics``.

        One queue bound to every topic's exchange, so other nodes'
        publications keep their order across topics; this process's own are
        delivered at once. A topic whose exchange the broker refuses is left
        out (see :meth:`Broker.health`) and bound when the broker accepts it.
        """
        topics = tuple(topics)
        here: list[tuple[str, Subscriber]] = [
            (topic, functools.partial(callback, topic)) for topic in topics]
        return self._add(_Subscription(topics, callback, callback, here))

    def unsubscribe_topics(self, topics: Sequence[str], callback: TopicSubscriber) -> None:
        """End the subscription :meth:`subscribe_topics` made with the same arguments."""
        self._remove(tuple(topics), callback)

    def _subscribe(self, topic: str, callback: Subscriber) -> Deferred[None]:
        return self._add(_Subscription.to_topic(topic, callback))

    def _add(self, subscription: _Subscription) -> Deferred[None]:
        for topic, callback in subscription.here:
            self._here.topic(topic).subscribe(callback)
        self._subscriptions.append(subscription)
        ready: Deferred[None] = Deferred()
        subscription.waiting.append(ready)
        if self._session is not None:
            self._start_soon(self._session, subscription)
        return ready

    def _unsubscribe(self, topic: str, callback: Subscriber) -> None:
        self._remove((topic,), callback)

    def _remove(self, topics: tuple[str, ...], callback: Any) -> None:
        for subscription in [s for s in self._subscriptions
                             if s.topics == topics and s.callback == callback]:
            for topic, here in subscription.here:
                self._here.topic(topic).unsubscribe(here)
            self._subscriptions.remove(subscription)
            subscription.active = False
            subscription.ready()
            consumer, subscription.consumer = subscription.consumer, None
            if consumer is not None:
                self._end_soon(consumer, subscription.queue)

    def _end_soon(self, consumer: Consumer, queue: str) -> None:
        """:meth:`_end` in the background; :meth:`drain` waits for it."""
        d = Deferred.fromCoroutine(self._end(consumer, queue))
        d.addErrback(lambda f: self.log.failure("cannot delete the queue {queue}", f,
                                                queue=queue))
        self._ending.add(d)
        d.addBoth(lambda _: self._ending.discard(d))

    async def _end(self, consumer: Consumer, queue: str) -> None:
        """Stop consuming and delete the subscription's queue (it would expire anyway)."""
        await consumer.cancel()
        if not consumer.session.lost:
            await consumer.session.delete_queue(queue)

    async def drain(self, timeout: float) -> None:
        """On shutdown: delete every subscription's queue, as nothing will come back
        for it (within ``timeout`` seconds; what is left expires on the broker)."""
        for subscription in list(self._subscriptions):
            consumer, subscription.consumer = subscription.consumer, None
            if consumer is not None:
                self._end_soon(consumer, subscription.queue)
        if not self._ending:
            return
        waiting = DeferredList(list(self._ending), consumeErrors=True)
        waiting.addTimeout(timeout, self.broker.reactor)
        try:
            await waiting
        except DeferredTimeout:
            self.log.warn("the broker did not delete {count} subscription queues in {timeout} s;"
                          " they expire by themselves", count=len(self._ending), timeout=timeout)

    async def connected(self, session: Session) -> None:
        """Set every subscription up on a new connection (or what is missing
        of them, when called again after a refusal)."""
        self._session = session
        for subscription in list(self._subscriptions):
            try:
                await self._start(session, subscription)
            except Refused:
                pass  # recorded in the broker's refusals; the others go on

    def disconnected(self, session: Session) -> None:
        if self._session is session:
            self._session = None
        for subscription in self._subscriptions:
            if subscription.consumer is not None and subscription.consumer.session is session:
                subscription.consumer = None

    def _start_soon(self, session: Session, subscription: _Subscription) -> None:
        d = Deferred.fromCoroutine(self._start(session, subscription))
        d.addErrback(lambda f: f.trap(Refused))  # recorded in the broker's refusals
        d.addErrback(lambda f: self.log.failure(
            "cannot subscribe to {topics}", f, topics=", ".join(subscription.topics)))

    async def _start(self, session: Session, subscription: _Subscription) -> None:
        """Set ``subscription`` up on ``session``: what is missing of it.

        Declarations go through the session's control channel, so one the
        broker refuses (a topic's exchange declared otherwise by someone
        else) leaves the other topics and subscriptions working; it is
        recorded (``/healthz``) and tried again later (called again then).
        """
        if subscription.starting is session:
            return
        fresh = subscription.consumer is None or subscription.consumer.session is not session
        if not fresh and subscription.bound >= set(subscription.topics):
            return
        subscription.starting = session
        try:
            await self._set_up(session, subscription, fresh)
        finally:
            subscription.starting = None

    async def _set_up(self, session: Session, subscription: _Subscription,
                      fresh: bool) -> None:
        if fresh:
            subscription.bound = set()
            await self._declare_queue(session, subscription)
        for topic in subscription.topics:
            if topic in subscription.bound:
                continue
            try:
                await session.declare_exchange(topic)
                await session.bind_queue(subscription.queue, topic)
            except Refused:
                continue  # recorded; the other topics work meanwhile
            subscription.bound.add(topic)
        if not subscription.bound:
            return
        if fresh:
            def handle(delivery: IDelivery) -> Deferred[None]:
                return self._deliver(subscription, delivery)

            consumer = await Consumer.start(session, subscription.queue, self.prefetch,
                                            handle, sequential=True,
                                            clock=self.broker.reactor)
            if subscription not in self._subscriptions:
                # Unsubscribed while we were setting up.
                self._end_soon(consumer, subscription.queue)
                return
            subscription.consumer = consumer
        subscription.active = True
        subscription.ready()

    async def _declare_queue(self, session: Session, subscription: _Subscription) -> None:
        """Declare the subscription's queue; on a cluster, a new one when the
        node holding it is down.

        Durable: RabbitMQ 4 deprecates transient queues that are not
        exclusive (and will refuse them); ``x-expires`` removes it all the
        same. A classic queue lives on the node it was declared on: when that
        node is down, the broker refuses it (``404 NOT_FOUND - home node ...
        is down or inaccessible``) until the node is back. The subscription
        then takes a new queue on the node it is connected to now, so its
        topics keep flowing (what was waiting in the old queue is lost with
        its node, as it would be with a restart; the old queue expires).
        """
        arguments = {"x-expires": SUBSCRIPTION_EXPIRES, "x-max-length": SUBSCRIPTION_MAX_LENGTH}
        try:
            await session.declare_queue(subscription.queue, arguments=arguments)
            return
        except Refused as e:
            if "home node" not in str(e):
                raise
            old = subscription.queue
        subscription.queue = _queue_name("+".join(subscription.topics))
        session.refusals.accepted("queue %r" % old)
        self.log.warn("the queue {old} of the subscription to {topics} is on a cluster node "
                      "that is down: subscribing with a new queue, {new}", old=old,
                      topics=", ".join(subscription.topics), new=subscription.queue)
        await session.declare_queue(subscription.queue, arguments=arguments)

    def _deliver(self, subscription: _Subscription, delivery: Any) -> Deferred[None]:
        """Hand one message to its subscriber, then ack it (failure or not).

        This process's own publications were delivered when they were made:
        their copy is only acked.
        """
        self._received.inc()
        headers = delivery.properties.get("headers")
        if isinstance(headers, dict) and headers.get(INSTANCE_HEADER) == self.instance:
            return self._ack(delivery)
        try:
            data = decode_json(delivery.body, "the message")
        except ValidationError as e:
            # Never decodable (not UTF-8 JSON, NaN, too deep, too large): drop it.
            self._bad.inc()
            self.log.warn("dropping a message on {topic}: {reason} ({size} bytes)",
                          topic=delivery.exchange or subscription.topics[0],
                          reason=e.messages[0],
                          size=len(delivery.body))
            return self._ack(delivery)
        topic = delivery.exchange or subscription.topics[0]
        d = call_handler(functools.partial(subscription.deliver, topic), data)

        def failed(failure: Any) -> None:
            self._subscriber_failures.inc()
            self.log.failure("subscriber {subscriber!r} of {topic} failed", failure,
                             subscriber=subscription.callback, topic=topic)

        d.addErrback(failed)
        d.addCallback(lambda _: self._ack(delivery))
        return d

    def _ack(self, delivery: Any) -> Deferred[None]:
        if not delivery.alive():
            return succeed(None)
        d = delivery.ack()
        d.addErrback(lambda f: None)
        return d

