"""The consume loop survives its handler: a bug ends neither the loop nor the message."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import Deferred, DeferredQueue, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from txamqp.content import Content

from mailhub.errors import ValidationError
from mailhub.metrics import Metrics
from mailhub.pubsub.consumer import Consumer, Delivery, IDelivery
from mailhub.pubsub.outbox import Outbox
from mailhub.pubsub.workqueue import WorkQueue


class ConsumerChannel:
    """The consumer's side of a channel: acks and rejects, recorded."""

    def __init__(self) -> None:
        self.closed = False
        self.acked: list[int] = []
        self.rejected: list[tuple[int, bool]] = []

    def basic_ack(self, delivery_tag: int, multiple: bool) -> Deferred[None]:
        self.acked.append(delivery_tag)
        return succeed(None)

    def basic_reject(self, delivery_tag: int, requeue: bool) -> Deferred[None]:
        self.rejected.append((delivery_tag, requeue))
        return succeed(None)


class ConsumerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.channel = ConsumerChannel()
        self.queue: DeferredQueue[Any] = DeferredQueue()
        self.consumer = Consumer(None, self.channel, "ctag", self.queue,  # type: ignore[arg-type]
                                 clock=self.clock)

    def deliver(self, tag: int, body: bytes) -> None:
        self.queue.put(SimpleNamespace(delivery_tag=tag, redelivered=False,
                                       content=Content(body)))

    def run_loop(self, handle: Any, sequential: bool) -> Deferred[None]:
        running = Deferred.fromCoroutine(self.consumer._run(handle, sequential))
        self.assertNoResult(running)
        return running

    def test_a_handler_that_raises_leaves_the_loop_running(self) -> None:
        for sequential in (True, False):
            self.setUp()
            handled: list[bytes] = []

            def handle(delivery: IDelivery) -> None:
                if delivery.body == b"bug":
                    raise RuntimeError("handler bug")
                handled.append(delivery.body)

            running = self.run_loop(handle, sequential)
            self.deliver(1, b"bug")
            self.deliver(2, b"fine")
            self.assertEqual(handled, [b"fine"], "sequential=%s" % sequential)
            self.assertNoResult(running)
            self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
            # The message that tripped the bug goes back to the broker, later
            # (no hot redelivery loop), not lost and not held forever.
            self.assertEqual(self.channel.rejected, [])
            self.clock.advance(Consumer.requeue_delay)
            self.assertEqual(self.channel.rejected, [(1, True)])

    def test_a_failed_handling_in_parallel_mode_is_requeued_not_held(self) -> None:
        self.run_loop(lambda delivery: fail(RuntimeError("async bug")), sequential=False)
        self.deliver(7, b"m")
        self.deliver(8, b"n")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertEqual(self.consumer.failures, 2)
        self.clock.advance(Consumer.requeue_delay)
        self.assertEqual(sorted(self.channel.rejected), [(7, True), (8, True)])

    def test_a_message_acked_before_the_failure_is_not_requeued(self) -> None:
        def handle(delivery: IDelivery) -> Deferred[None]:
            delivery.ack()
            return fail(RuntimeError("bug after the ack"))

        self.run_loop(handle, sequential=True)
        self.deliver(3, b"m")
        self.clock.advance(Consumer.requeue_delay)
        self.assertEqual((self.channel.acked, self.channel.rejected), ([3], []))
        self.flushLoggedErrors(RuntimeError)

    def test_nothing_is_requeued_on_a_closed_channel_or_after_cancel(self) -> None:
        self.run_loop(lambda delivery: fail(RuntimeError("bug")), sequential=False)
        self.deliver(4, b"m")
        self.channel.closed = True  # the broker took the message back itself
        self.clock.advance(Consumer.requeue_delay)
        self.assertEqual(self.channel.rejected, [])
        self.flushLoggedErrors(RuntimeError)

    def test_a_bug_inside_the_work_queue_does_not_end_the_loop(self) -> None:
        class BrokenOutbox(Outbox):
            def put(self, *args: Any, **kw: Any) -> Deferred[None]:
                raise RuntimeError("outbox bug")

        queue = WorkQueue(BrokenOutbox(10, Metrics()), "q", self.clock, retry_initial=1)
        handled: list[bytes] = []

        def handler(body: bytes) -> None:
            if body == b"poison":
                raise ValidationError("never")  # dead-lettering hits the bug
            handled.append(body)

        queue.consume(handler)
        running = self.run_loop(queue.handle, sequential=False)
        self.deliver(1, b"poison")
        self.deliver(2, b"good")
        self.assertEqual(handled, [b"good"])
        self.assertEqual(self.channel.acked, [2])
        self.assertNoResult(running)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(Consumer.requeue_delay)
        self.assertEqual(self.channel.rejected, [(1, True)])
        self.assertEqual(queue.in_progress, 0)

    def test_delivery_requeues_once_and_never_after_an_ack(self) -> None:
        message = SimpleNamespace(delivery_tag=9, redelivered=True, content=Content(b"x"))
        acked = Delivery(self.channel, message)
        acked.ack()
        acked.requeue()
        twice = Delivery(self.channel, SimpleNamespace(delivery_tag=10, redelivered=False,
                                                       content=Content(b"y")))
        twice.requeue()
        twice.requeue()
        self.assertEqual((self.channel.acked, self.channel.rejected), ([9], [(10, True)]))
