"""A shared subscription without a broker: the local topic, with the work queue's retries."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailhub.errors import Unavailable, ValidationError
from mailhub.metrics import Metrics
from mailhub.pubsub.local import LocalPubSub
from mailhub.pubsub.retry import RetryPolicy
from mailhub.pubsub.shared import LocalSharedSubscription


class LocalSharedSubscriptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pubsub, self.clock, self.metrics = LocalPubSub(), Clock(), Metrics()
        self.queue = LocalSharedSubscription(self.pubsub, "t", "mailhub:t", self.clock,
                                             RetryPolicy(1, 4), self.metrics)

    def value(self, name: str) -> Any:
        return self.metrics.value(name, {"queue": "mailhub:t"})

    def test_each_publication_reaches_the_consumer_as_its_json_body(self) -> None:
        bodies: list[bytes] = []
        self.queue.consume(lambda body: succeed(bodies.append(body)))
        self.successResultOf(self.queue.publish({"n": 1}))
        self.successResultOf(self.pubsub.topic("t").publish({"n": 2}))
        self.assertEqual(bodies, [b'{"n":1}', b'{"n":2}'])
        self.assertEqual(self.value("mailhub_workqueue_acked_total"), 2)

    def test_transient_failures_are_retried_with_backoff_until_stopped(self) -> None:
        calls: list[bytes] = []

        def handler(body: bytes) -> Any:
            calls.append(body)
            return fail(Unavailable("full")) if len(calls) < 3 else succeed(None)

        self.queue.consume(handler)
        self.pubsub.topic("t").publish({"n": 1})
        self.clock.advance(1)
        self.assertEqual(len(calls), 2)
        self.clock.advance(1.5)
        self.assertEqual(len(calls), 2)
        self.clock.advance(0.5)
        self.assertEqual(len(calls), 3)
        self.assertEqual(self.value("mailhub_workqueue_retries_total"), 2)
        self.assertEqual(self.value("mailhub_workqueue_acked_total"), 1)

    def test_what_can_never_succeed_is_counted_and_stop_ends_everything(self) -> None:
        calls: list[bytes] = []

        def handler(body: bytes) -> Any:
            calls.append(body)
            if body == b'"poison"':
                raise ValidationError("not an event")
            return fail(Unavailable("down"))

        self.queue.consume(handler)
        self.pubsub.topic("t").publish("poison")
        self.assertEqual(self.value("mailhub_workqueue_dead_lettered_total"), 1)
        self.pubsub.topic("t").publish({"n": 1})
        self.queue.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.pubsub.topic("t").publish({"n": 2})  # unsubscribed: not handed over
        self.assertEqual(calls, [b'"poison"', b'{"n":1}'])
