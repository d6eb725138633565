"""The in-process pubsub: ESN's topic API, with failures kept to their subscriber."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase

from mailhub.pubsub import Hub
from mailhub.pubsub.local import LocalPubSub


class LocalPubSubTests(SynchronousTestCase):
    def test_subscribers_get_publications_in_order(self) -> None:
        pubsub = LocalPubSub()
        seen: list[tuple[str, Any]] = []
        pubsub.topic("mail:new").subscribe(lambda d: seen.append(("a", d)))
        pubsub.topic("mail:new").subscribe(lambda d: seen.append(("b", d)))
        pubsub.topic("other").subscribe(lambda d: seen.append(("other", d)))
        self.assertIsNone(self.successResultOf(pubsub.topic("mail:new").publish({"uid": 1})))
        self.assertEqual(seen, [("a", {"uid": 1}), ("b", {"uid": 1})])

    def test_a_failing_subscriber_does_not_stop_the_others(self) -> None:
        pubsub = LocalPubSub()
        seen: list[Any] = []

        def broken(data: Any) -> None:
            raise RuntimeError("boom")

        pubsub.topic("t").subscribe(broken)
        pubsub.topic("t").subscribe(lambda d: fail(RuntimeError("async boom")))
        pubsub.topic("t").subscribe(seen.append)
        self.successResultOf(pubsub.topic("t").publish(1))
        self.assertEqual(seen, [1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_publish_waits_for_asynchronous_subscribers(self) -> None:
        pubsub = LocalPubSub()
        pending: Deferred[None] = Deferred()
        pubsub.topic("t").subscribe(lambda d: pending)

        async def coroutine(data: Any) -> None:
            await pending

        pubsub.topic("t").subscribe(coroutine)
        done = pubsub.topic("t").publish(1)
        self.assertNoResult(done)
        pending.callback(None)
        self.successResultOf(done)

    def test_unsubscribe(self) -> None:
        pubsub = LocalPubSub()
        seen: list[Any] = []
        pubsub.topic("t").subscribe(seen.append)
        pubsub.topic("t").unsubscribe(seen.append)
        pubsub.topic("t").unsubscribe(seen.append)
        self.successResultOf(pubsub.topic("t").publish(1))
        self.assertEqual(seen, [])

    def test_forward_publishes_here_then_on_the_other_pubsub(self) -> None:
        local, other = LocalPubSub(), LocalPubSub()
        seen: list[str] = []
        local.topic("t").subscribe(lambda d: seen.append("local"))
        other.topic("t").subscribe(lambda d: seen.append("other"))
        self.successResultOf(local.topic("t").forward(other, 1))
        self.assertEqual(seen, ["local", "other"])

    def test_without_a_broker_global_is_local_and_forward_publishes_once(self) -> None:
        hub = Hub()
        self.assertIs(hub.global_, hub.local)
        seen: list[Any] = []
        hub.global_.topic("t").subscribe(seen.append)
        self.successResultOf(hub.local.topic("t").forward(hub.global_, 1))
        self.assertEqual(seen, [1])


class SubscribeTopicsTests(SynchronousTestCase):
    def test_one_callback_gets_every_topic_with_its_name_until_unsubscribed(self) -> None:
        pubsub = LocalPubSub()
        seen: list[tuple[str, Any]] = []

        def callback(topic: str, data: Any) -> None:
            seen.append((topic, data))

        self.successResultOf(pubsub.subscribe_topics(("a", "b"), callback))
        pubsub.topic("b").publish(1)
        pubsub.topic("c").publish(2)
        pubsub.topic("a").publish(3)
        self.assertEqual(seen, [("b", 1), ("a", 3)])
        pubsub.unsubscribe_topics(("a", "b"), callback)
        pubsub.topic("a").publish(4)
        self.assertEqual(seen, [("b", 1), ("a", 3)])
