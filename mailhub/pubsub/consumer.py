"""AMQP consumers: one ``basic.consume`` on its own channel, and its deliveries.

:class:`Consumer` feeds :class:`Delivery` objects to a function, in order or
up to the prefetch at once; both the global pubsub's subscriptions and the
work queues consume through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from txamqp.client import ChannelClosed, Closed
from txamqp.queue import Closed as QueueClosed
from zope.interface import Attribute, Interface, implementer

if TYPE_CHECKING:
    from mailhub.pubsub.connection import Session


class IDelivery(Interface):
    """One message handed to a consumer."""

    body = Attribute("the message body (bytes)")
    properties = Attribute("its AMQP properties (dict, txamqp names: 'headers', ...)")
    redelivered = Attribute("whether the broker delivered it before")
    exchange = Attribute("the exchange it was published to (str; '' for the default one)")

    def alive() -> bool:
        """Whether it can still be acked (its channel is open)."""

    def ack() -> Deferred[None]:
        """Acknowledge it: the broker forgets it."""

    def requeue() -> Deferred[None]:
        """Give it back to the broker (``basic.reject``, requeue): redelivered later.

        Does nothing once it was acked or requeued, or when its channel is
        closed (the broker has taken it back already).
        """


@implementer(IDelivery)
class Delivery:
    """One message delivered to one of our consumers (pubsub or work queue)."""

    def __init__(self, channel: Any, message: Any) -> None:
        self._channel = channel
        self.tag = message.delivery_tag
        self.redelivered = bool(message.redelivered)
        self.exchange: str = getattr(message, "exchange", "") or ""
        content = message.content
        body = content.body if content is not None else b""
        self.body: bytes = body if isinstance(body, bytes) else body.encode("utf-8")
        self.properties: dict[str, Any] = dict(content.properties) if content is not None else {}

        self.settled = False

    def alive(self) -> bool:
        """Whether it can still be acked (its channel is open)."""
        return not self._channel.closed

    def ack(self) -> Deferred[None]:
        self.settled = True
        return self._channel.basic_ack(delivery_tag=self.tag, multiple=False)

    def requeue(self) -> Deferred[None]:
        if self.settled or not self.alive():
            return succeed(None)
        self.settled = True
        return self._channel.basic_reject(delivery_tag=self.tag, requeue=True)


class _Unreadable(Delivery):
    """A message :class:`Delivery` could not read: it can only be requeued."""

    def __init__(self, channel: Any, message: Any) -> None:
        self._channel = channel
        self.tag = getattr(message, "delivery_tag", None)
        self.redelivered = True
        self.exchange = ""
        self.body = b""
        self.properties = {}
        self.settled = False


class Consumer:
    """A basic.consume on its own channel, feeding deliveries to a function.

    ``sequential``: wait for each delivery's handling before taking the next
    (pubsub subscriptions keep order); otherwise up to ``prefetch`` messages
    are handled at once (work queues). The loop ends when the connection
    closes; the owner starts a new Consumer on the next session.

    ``handle`` is expected to settle every delivery itself (ack, dead-letter
    or leave it to a lost connection). When it raises or its Deferred fails
    anyway (a bug), the failure is logged, the loop goes on with the next
    message, and the delivery is given back to the broker after
    :attr:`requeue_delay` seconds (so it is neither lost nor held unacked
    until the connection ends, and a message that always trips the bug is
    not redelivered in a hot loop).
    """

    log = Logger()

    #: Seconds before a delivery whose handling failed unexpectedly is
    #: requeued.
    requeue_delay = 5.0

    def __init__(self, session: Session, channel: Any, tag: str, queue: Any,
                 clock: Any = None) -> None:
        self.session = session
        self.channel = channel
        self.tag = tag
        self._queue = queue
        self._clock = clock
        self._requeues: set[Any] = set()
        self.cancelled = False
        self.failures = 0

    @classmethod
    async def start(cls, session: Session, queue_name: str, prefetch: int,
                    handle: Callable[[IDelivery], Any], sequential: bool,
                    channel: Any = None, clock: Any = None) -> "Consumer":
        if channel is None:
            channel = await session.open_channel()
        # A refusal here (the queue is exclusive to another connection, or
        # gone) fails this consumer only, not the connection.
        session.refusable(channel)
        try:
            await channel.basic_qos(prefetch_size=0, prefetch_count=prefetch, global_=False)
            reply = await channel.basic_consume(queue=queue_name, no_ack=False)
        except ChannelClosed as e:
            raise session.refusal(channel, "consuming from queue %r" % queue_name, e)
        session.set_up(channel)
        queue = await session.client.queue(reply.consumer_tag)
        consumer = cls(session, channel, reply.consumer_tag, queue, clock)
        d = Deferred.fromCoroutine(consumer._run(handle, sequential))
        d.addErrback(lambda f: cls.log.failure("AMQP consumer {tag} stopped", f,
                                               tag=consumer.tag))
        return consumer

    async def _run(self, handle: Callable[[IDelivery], Any], sequential: bool) -> None:
        while True:
            try:
                message = await self._queue.get()
            except (QueueClosed, Closed):
                return
            try:
                delivery = Delivery(self.channel, message)
            except Exception:
                # Not expected of txamqp's messages; if it happens, the
                # message still goes back to the broker, unseen.
                self._handling_failed(Failure(), _Unreadable(self.channel, message))
                continue
            try:
                result = handle(delivery)
            except Exception:
                self._handling_failed(Failure(), delivery)
                continue
            if isinstance(result, Deferred):
                result.addErrback(self._handling_failed, delivery)
                if sequential:
                    await result

    def _handling_failed(self, failure: Failure, delivery: IDelivery) -> None:
        self.failures += 1
        self.log.failure("handling a message on AMQP consumer {tag} failed; it goes back "
                         "to the queue in {delay} s", failure, tag=self.tag,
                         delay=self.requeue_delay)
        if self._clock is None:
            self._requeue(delivery)
            return
        call = self._clock.callLater(self.requeue_delay, self._requeue, delivery)
        self._requeues.add(call)

    def _requeue(self, delivery: IDelivery) -> None:
        self._requeues = {c for c in self._requeues if c.active()}
        d = delivery.requeue()
        d.addErrback(lambda f: None)  # channel gone: the broker requeued it already

    async def cancel(self) -> None:
        """Stop consuming; unacked messages go back to the queue."""
        if self.cancelled:
            return
        self.cancelled = True
        for call in self._requeues:
            if call.active():
                call.cancel()
        self._requeues.clear()
        try:
            await self.channel.basic_cancel(consumer_tag=self.tag)
        except Closed:
            pass
        self._queue.close()
        self.session.client.queues.pop(self.tag, None)
        await self.session.close_channel(self.channel)
