"""The work queue's message handling: ack, dead-letter, retry, never drop."""

from __future__ import annotations

import json

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailhub.errors import ValidationError
from mailhub.pubsub.outbox import Route
from mailhub.pubsub.workqueue import (
    AT_HEADER, ID_HEADER, REASON_HEADER, IDelivery, WorkQueue,
)

from tests.pubsub.fakes import FakeBroker, FakeChannel, FakeDelivery


class Flaky:
    """A handler that fails ``failures`` times, then succeeds."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or ConnectionRefusedError("CardDAV is down")
        self.calls: list[bytes] = []

    def __call__(self, body: bytes) -> Deferred[None]:
        self.calls.append(body)
        if len(self.calls) <= self.failures:
            return fail(self.error)
        return succeed(None)


class WorkQueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.broker = FakeBroker()
        self.channel = FakeChannel()
        self.broker.outbox.attach(self.channel)
        self.queue = WorkQueue(self.broker.outbox, "collector:email", self.clock,
                               retry_initial=1.0, retry_max=4.0,
                               metrics=self.broker.metrics, broker=self.broker)

    def count(self, name: str) -> float:
        return self.broker.metrics.value(name, {"queue": "collector:email"})

    def test_fake_delivery_is_a_delivery(self) -> None:
        verifyObject(IDelivery, FakeDelivery(b""))

    def test_registers_with_the_broker_and_names_the_dead_letter_queue(self) -> None:
        self.assertEqual(self.broker.users, [self.queue])
        self.assertEqual(self.queue.dead_letter, "collector:email:dead")

    def test_publish_is_persistent_json_on_the_shared_queue(self) -> None:
        d = self.queue.publish({"userEmail": "a@example.org", "emails": ["b@example.org"]})
        route, body, properties = self.channel.published[0]
        self.assertEqual(route, Route("collector:email", "", queue="collector:email", adopt=True))
        self.assertEqual(json.loads(body), {"userEmail": "a@example.org",
                                            "emails": ["b@example.org"]})
        self.assertEqual(properties["delivery-mode"], 2)
        self.assertNoResult(d)
        self.broker.outbox.ack(1, False)
        self.successResultOf(d)

    def test_success_acks_once(self) -> None:
        handler = Flaky(0)
        self.queue.consume(handler)
        delivery = FakeDelivery(b'{"x":1}')
        self.successResultOf(self.queue.handle(delivery))
        self.assertEqual(handler.calls, [b'{"x":1}'])
        self.assertEqual(delivery.acks, 1)
        self.assertEqual(self.count("mailhub_workqueue_acked_total"), 1)

    def test_coroutine_handlers_work(self) -> None:
        seen = []

        async def handler(body: bytes) -> None:
            seen.append(body)

        self.queue.consume(handler)
        delivery = FakeDelivery(b"m")
        self.successResultOf(self.queue.handle(delivery))
        self.assertEqual((seen, delivery.acks), ([b"m"], 1))

    def test_poison_goes_to_dead_letter_with_reason_and_properties_then_acks(self) -> None:
        def handler(body: bytes) -> None:
            raise ValidationError(["no user", "no emails"])

        self.queue.consume(handler)
        self.clock.advance(1700000000)
        delivery = FakeDelivery(b"{}", {"content-type": "application/json",
                                        "headers": {"origin": "james"}, "message-id": "m1"})
        d = self.queue.handle(delivery)
        route, body, properties = self.channel.published[0]
        self.assertEqual(route, Route("", "collector:email:dead", queue="collector:email:dead"))
        self.assertEqual(body, b"{}")
        # The id `mailhub dead` names the letter by, and when it died.
        headers = dict(properties["headers"])
        self.assertRegex(headers.pop(ID_HEADER), "^[0-9a-f]{12}$")
        self.assertEqual(headers.pop(AT_HEADER), 1700000000)
        self.assertEqual(headers,
                         {"origin": "james", REASON_HEADER: "no user; no emails",
                          "x-mailhub-queue": "collector:email"})
        self.assertEqual(properties["content-type"], "application/json")
        self.assertEqual(properties["message-id"], "m1")
        self.assertEqual(properties["delivery-mode"], 2)
        # Not acked before the dead letter is confirmed: a crash now keeps it.
        self.assertEqual(delivery.acks, 0)
        self.assertNoResult(d)
        self.broker.outbox.ack(1, False)
        self.successResultOf(d)
        self.assertEqual(delivery.acks, 1)
        self.assertEqual(self.count("mailhub_workqueue_dead_lettered_total"), 1)

    def test_transient_failure_retries_with_growing_delays_and_keeps_the_message(self) -> None:
        handler = Flaky(4)
        self.queue.consume(handler)
        delivery = FakeDelivery(b"m")
        d = self.queue.handle(delivery)
        self.assertEqual(len(handler.calls), 1)
        for delay, calls in [(1.0, 2), (2.0, 3), (4.0, 4), (4.0, 5)]:
            self.clock.advance(delay - 0.001)
            self.assertEqual(len(handler.calls), calls - 1, "retried too early")
            self.assertEqual(delivery.acks, 0)
            self.clock.advance(0.001)
            self.assertEqual(len(handler.calls), calls)
        self.successResultOf(d)
        self.assertEqual(delivery.acks, 1)
        self.assertEqual(self.count("mailhub_workqueue_retries_total"), 4)
        self.assertEqual(len(self.flushLoggedErrors(ConnectionRefusedError)), 4)
        self.assertEqual(self.channel.published, [])

    def test_retries_stop_when_the_channel_dies_and_the_message_is_not_acked(self) -> None:
        handler = Flaky(100)
        self.queue.consume(handler)
        delivery = FakeDelivery(b"m")
        d = self.queue.handle(delivery)
        delivery.kill()
        self.queue.disconnected(session=object())
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1000)
        self.assertEqual(len(handler.calls), 1)
        self.assertEqual(delivery.acks, 0)
        self.assertEqual(self.count("mailhub_workqueue_abandoned_total"), 1)
        self.flushLoggedErrors(ConnectionRefusedError)

    def test_handler_finishing_after_the_channel_died_does_not_ack(self) -> None:
        pending: Deferred[None] = Deferred()
        self.queue.consume(lambda body: pending)
        delivery = FakeDelivery(b"m")
        d = self.queue.handle(delivery)
        delivery.kill()
        pending.callback(None)
        self.successResultOf(d)
        self.assertEqual(delivery.acks, 0)
        self.assertEqual(self.count("mailhub_workqueue_acked_total"), 0)

    def test_dead_letter_waits_for_room_when_the_outbox_is_full(self) -> None:
        small = FakeBroker(limit=1)
        queue = WorkQueue(small.outbox, "q", self.clock, retry_initial=1.0, retry_max=4.0,
                          metrics=small.metrics)
        queue.publish(b"filler")

        def handler(body: bytes) -> None:
            raise ValidationError("bad")

        queue.consume(handler)
        delivery = FakeDelivery(b"poison")
        d = queue.handle(delivery)
        self.assertEqual(len(small.outbox), 1)
        channel = FakeChannel()
        small.outbox.attach(channel)
        small.outbox.ack(1, False)
        self.clock.advance(1.0)
        self.assertEqual(channel.bodies, [b"filler", b"poison"])
        small.outbox.ack(2, False)
        self.successResultOf(d)
        self.assertEqual(delivery.acks, 1)

    def test_stop_cancels_pending_retries(self) -> None:
        self.queue.consume(Flaky(100))
        d = self.queue.handle(FakeDelivery(b"m"))
        self.queue.stop()
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.flushLoggedErrors(ConnectionRefusedError)

    def test_one_consumer_per_queue(self) -> None:
        self.queue.consume(Flaky(0))
        self.assertRaises(ValueError, self.queue.consume, Flaky(0))


class DrainTests(SynchronousTestCase):
    """At shutdown, messages in hand finish; waiting retries go back to the broker."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.broker = FakeBroker()
        self.queue = WorkQueue(self.broker.outbox, "collector:email", self.clock,
                               retry_initial=1.0, retry_max=4.0,
                               metrics=self.broker.metrics, broker=self.broker)

    def test_drain_waits_for_messages_in_progress(self) -> None:
        held: Deferred[None] = Deferred()
        self.queue.consume(lambda body: held)
        delivery = FakeDelivery(b"{}")
        handling = self.queue.handle(delivery)
        drained = Deferred.fromCoroutine(self.queue.drain(10.0))
        self.clock.advance(1)
        self.assertNoResult(drained)
        held.callback(None)
        self.successResultOf(handling)
        self.clock.advance(0.05)
        self.successResultOf(drained)
        self.assertEqual(delivery.acks, 1)

    def test_drain_gives_up_after_its_timeout_without_acking(self) -> None:
        self.queue.consume(lambda body: Deferred())
        delivery = FakeDelivery(b"{}")
        self.queue.handle(delivery)
        drained = Deferred.fromCoroutine(self.queue.drain(2.0))
        self.clock.pump([0.05] * 41)
        self.successResultOf(drained)
        self.assertEqual(delivery.acks, 0)

    def test_drain_cancels_waiting_retries(self) -> None:
        self.queue.consume(Flaky(100))
        delivery = FakeDelivery(b"{}")
        handling = self.queue.handle(delivery)
        drained = Deferred.fromCoroutine(self.queue.drain(10.0))
        self.clock.advance(0.05)
        self.successResultOf(drained)
        self.successResultOf(handling)
        self.assertEqual(delivery.acks, 0)
        self.flushLoggedErrors(ConnectionRefusedError)
