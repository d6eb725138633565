"""The global pubsub and the work queue against the real RabbitMQ on 127.0.0.1:5672.

Every test uses its own exchange, queue and connection names, deletes what it
declared, and cuts only its own connections (rabbitmqctl close_connection),
so tests run next to other users of the broker.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Awaitable, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from mailhub.collector.sources import CALENDAR_TOPICS, CalendarSource
from mailhub.errors import Unavailable, ValidationError
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.pubsub.connection import Broker
from mailhub.pubsub.globalpubsub import GlobalPubSub
from mailhub.pubsub.local import LocalPubSub
from mailhub.pubsub.wiring import PubSub
from mailhub.pubsub.workqueue import AT_HEADER, ID_HEADER, REASON_HEADER, WorkQueue

from tests.support.rabbitmq import (URL, RawClient, bound_queues, close_connections,
                                    require_rabbitmq, settled, unique)

SPEC = "/usr/share/amqp/specs/0-9-1/amqp0-9-1.stripped.xml"


def inline(test: Callable[..., Awaitable[None]]) -> Callable[..., Deferred[None]]:
    @functools.wraps(test)
    def run(self: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(test(self))
    return run


async def wait_for(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    waited = 0.0
    while not check():
        if waited >= timeout:
            raise AssertionError("timed out waiting for " + (what or repr(check)))
        await deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


class RabbitMQTestCase(TestCase):
    timeout = 60

    def setUp(self) -> None:
        require_rabbitmq()
        self.exchanges: list[str] = []
        self.queues: list[str] = []

    async def broker(self, **kw: Any) -> Broker:
        """A started Broker with its own connection name, stopped after the test."""
        kw.setdefault("connection_name", unique("conn"))
        broker = Broker(reactor, URL, SPEC, heartbeat=5, metrics=Metrics(),
                        retry_policy=lambda n: 0.1, **kw)
        broker.startService()
        self.addCleanup(broker.stopService)
        return broker

    async def raw(self) -> RawClient:
        raw = await RawClient.connect(reactor)
        self.addCleanup(raw.close)
        self.addCleanup(lambda: Deferred.fromCoroutine(
            raw.delete(exchanges=self.exchanges, queues=self.queues)))
        return raw

    def topic_name(self) -> str:
        name = unique("topic")
        self.exchanges.append(name)
        return name


class GlobalPubSubTests(RabbitMQTestCase):
    @inline
    async def test_two_nodes_see_each_others_topics(self) -> None:
        await self.raw()
        topic = self.topic_name()
        a, b = GlobalPubSub(await self.broker()), GlobalPubSub(await self.broker())
        seen_a: list[Any] = []
        seen_b: list[Any] = []
        await a.topic(topic).subscribe(seen_a.append)
        await b.topic(topic).subscribe(seen_b.append)
        await a.topic(topic).publish({"from": "a"})
        await b.topic(topic).publish({"from": "b"})
        await wait_for(lambda: len(seen_a) == 2 and len(seen_b) == 2)
        expected = [{"from": "a"}, {"from": "b"}]
        self.assertEqual(sorted(seen_a, key=str), expected)
        self.assertEqual(sorted(seen_b, key=str), expected)

    @inline
    async def test_an_esn_peer_and_mailhub_share_a_topic(self) -> None:
        raw = await self.raw()
        topic = self.topic_name()
        pubsub = GlobalPubSub(await self.broker())
        # The peer declares the exchange first, as OpenPaaS does (durable
        # fanout); mailhub's own declaration must agree with it.
        peer_inbox = await raw.subscribe_like_esn(topic)
        seen: list[Any] = []
        await pubsub.topic(topic).subscribe(seen.append)

        await pubsub.topic(topic).publish({"contactId": "c1", "bookName": "collected"})
        message = await peer_inbox.get(timeout=5)
        self.assertEqual((message.exchange, message.routing_key), (topic, ""))
        body = message.content.body
        body = body if isinstance(body, bytes) else body.encode()
        self.assertEqual(json.loads(body), {"contactId": "c1", "bookName": "collected"})
        self.assertEqual(message.content.properties.get("delivery-mode"), 2)

        await raw.publish_like_esn(topic, json.dumps({"from": "openpaas"}).encode())
        await wait_for(lambda: {"from": "openpaas"} in seen, what="the peer's message")

    @inline
    async def test_confirmed_publications_survive_a_cut_connection(self) -> None:
        await self.raw()
        topic = self.topic_name()
        publisher_broker = await self.broker()
        publisher = GlobalPubSub(publisher_broker)
        # The other node's connection carries the same name: the broker cuts
        # both, as rabbitmqctl close_all_connections would.
        listener_broker = await self.broker(connection_name=publisher_broker.connection_name)
        listener = GlobalPubSub(listener_broker)
        heard: list[int] = []
        own: list[int] = []
        await listener.topic(topic).subscribe(lambda data: heard.append(data["n"]))
        await publisher.topic(topic).subscribe(lambda data: own.append(data["n"]))

        sent: list[Deferred[None]] = []
        outage: list[int] = []
        cutting = True

        async def keep_publishing() -> None:
            # Publish all the time, before, during and after the cut.
            n = 0
            while cutting or n < 200:
                if not publisher_broker.connected:
                    outage.append(n)
                sent.append(publisher.topic(topic).publish({"n": n}))
                n += 1
                await deferLater(reactor, 0.002, lambda: None)

        publishing = Deferred.fromCoroutine(keep_publishing())
        await wait_for(lambda: len(sent) > 20)
        self.assertEqual(await close_connections(publisher_broker.connection_name), 2)
        for broker in (publisher_broker, listener_broker):
            await wait_for(lambda: broker.metrics.value(
                "mailhub_amqp_connections_total") == 2, what="the reconnection")
        cutting = False
        await publishing
        results = await DeferredList(sent, consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True] * len(sent),
                         "every publication confirmed")
        self.assertTrue(outage, "no publication was made while the broker was away")
        await wait_for(lambda: set(heard) == set(range(len(sent))), what="every message")

        # The publisher's own subscription came back with the new connection.
        await publisher_broker.when_connected()
        await publisher.topic(topic).publish({"n": 1000})
        await wait_for(lambda: 1000 in own, what="the subscription after reconnection")

    @inline
    async def test_a_body_nested_too_deep_does_not_stop_the_subscription(self) -> None:
        raw = await self.raw()
        topic = self.topic_name()
        broker = await self.broker()
        pubsub = GlobalPubSub(broker)
        seen: list[Any] = []
        await pubsub.topic(topic).subscribe(seen.append)
        await raw.publish_like_esn(topic, b"[" * 200000)  # RecursionError in json
        await raw.publish_like_esn(topic, b'{"after": 1}')
        await wait_for(lambda: seen == [{"after": 1}], what="the message after the bad one")
        self.assertEqual(broker.metrics.value("mailhub_pubsub_bad_messages_total"), 1)

    @inline
    async def test_utf16_and_nan_bodies_are_refused_and_the_subscription_goes_on(
            self) -> None:
        raw = await self.raw()
        topic = self.topic_name()
        broker = await self.broker()
        pubsub = GlobalPubSub(broker)
        seen: list[Any] = []
        await pubsub.topic(topic).subscribe(seen.append)
        refused = ('{"a": 1}'.encode("utf-16"), '{"a": 1}'.encode("utf-16-le"),
                   b'{"a": NaN}', b'{"a": -Infinity}')
        for body in refused:
            await raw.publish_like_esn(topic, body)
        await raw.publish_like_esn(topic, b'{"after": 1}')
        await wait_for(lambda: seen == [{"after": 1}], what="the message after the bad ones")
        self.assertEqual(broker.metrics.value("mailhub_pubsub_bad_messages_total"),
                         len(refused))

    @inline
    async def test_unsubscribe_stops_delivery(self) -> None:
        await self.raw()
        topic = self.topic_name()
        pubsub = GlobalPubSub(await self.broker())
        gone: list[Any] = []
        kept: list[Any] = []
        await pubsub.topic(topic).subscribe(gone.append)
        await pubsub.topic(topic).subscribe(kept.append)
        self.assertEqual(len(await bound_queues(topic)), 2)
        pubsub.topic(topic).unsubscribe(gone.append)
        # The broker routes the topic to kept's queue alone: a publication
        # now can reach no one else (no waiting to see that nothing came).
        while len(await bound_queues(topic)) != 1:
            await deferLater(reactor, 0.02, lambda: None)
        await pubsub.topic(topic).publish({"n": 1})
        await wait_for(lambda: kept == [{"n": 1}])
        self.assertEqual(gone, [])


class ConnectionTests(RabbitMQTestCase):
    @inline
    async def test_refused_login_keeps_publications_and_backs_off(self) -> None:
        attempts: list[int] = []

        def policy(n: int) -> float:
            attempts.append(n)
            return 0.05

        broker = Broker(reactor, URL.replace("guest:guest", "guest:wrong"), SPEC,
                        metrics=Metrics(), connection_name=unique("conn"), retry_policy=policy)
        broker.startService()
        pending = GlobalPubSub(broker).topic(self.topic_name()).publish({"n": 1})
        await wait_for(lambda: len(attempts) >= 3, what="three attempts")
        self.assertFalse(broker.connected)
        self.assertEqual(broker.health()["state"], "disconnected")
        # Failed logins count as failures: the delay grows.
        self.assertEqual(attempts[:3], sorted(attempts[:3]))
        self.assertGreater(attempts[2], attempts[0])
        self.assertNoResult(pending)
        await broker.stopService()
        self.failureResultOf(pending, Unavailable)


class WorkQueueTests(RabbitMQTestCase):
    def queue_name(self) -> str:
        name = unique("queue")
        self.exchanges.append(name)
        self.queues += [name, name + ":dead"]
        return name

    async def work_queue(self, name: str, broker: Broker | None = None, **kw: Any) -> WorkQueue:
        broker = broker or await self.broker()
        queue = WorkQueue(broker.outbox, name, reactor, retry_initial=0.05, retry_max=0.2,
                          prefetch=4, metrics=broker.metrics, broker=broker, **kw)
        self.addCleanup(queue.stop)
        return queue

    async def ready_count(self, raw: RawClient, queue: str) -> int:
        reply = await raw.channel.queue_declare(queue=queue, passive=True)
        return int(reply.message_count)

    @inline
    async def test_poison_goes_to_the_dead_letter_queue_with_its_reason(self) -> None:
        raw = await self.raw()
        name = self.queue_name()
        broker = await self.broker()
        queue = await self.work_queue(name, broker)
        handled: list[bytes] = []

        def handler(body: bytes) -> None:
            if body == b'{"emails":[]}':
                raise ValidationError(["no user", "no emails"])
            handled.append(body)

        queue.consume(handler)
        await broker.when_connected()
        await queue.publish({"emails": []})
        await queue.publish({"userEmail": "a@example.org", "emails": ["b@example.org"]})
        await wait_for(lambda: len(handled) == 1)
        dead = None
        for _ in range(250):
            dead = await raw.get(name + ":dead")
            if dead is not None:
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertIsNotNone(dead, "nothing in the dead-letter queue")
        body = dead.content.body
        self.assertEqual(body if isinstance(body, bytes) else body.encode(), b'{"emails":[]}')
        headers = dead.content.properties["headers"]
        self.assertEqual(headers[REASON_HEADER], "no user; no emails")
        self.assertEqual(dead.content.properties["delivery-mode"], 2)
        self.assertEqual(dead.content.properties["content-type"], "application/json")
        await wait_for(lambda: broker.metrics.value(
            "mailhub_workqueue_dead_lettered_total", {"queue": name}) == 1)
        await broker.stopService()
        self.assertEqual(await self.ready_count(raw, name), 0, "the poison was acked")

    @inline
    async def test_transient_failure_is_retried_until_it_succeeds(self) -> None:
        raw = await self.raw()
        name = self.queue_name()
        broker = await self.broker()
        queue = await self.work_queue(name, broker)
        calls: list[bytes] = []

        def handler(body: bytes) -> Deferred[None]:
            calls.append(body)
            if len(calls) < 3:
                return fail(Unavailable("CardDAV is down"))
            return succeed(None)

        queue.consume(handler)
        await queue.publish(b'{"userId":"u1","emails":["x@example.org"]}')
        await wait_for(lambda: broker.metrics.value(
            "mailhub_workqueue_acked_total", {"queue": name}) == 1)
        self.assertEqual(len(calls), 3)
        self.assertEqual(len(self.flushLoggedErrors(Unavailable)), 2)
        await broker.stopService()
        self.assertEqual(await self.ready_count(raw, name), 0)

    @inline
    async def test_competing_consumers_each_get_distinct_messages(self) -> None:
        await self.raw()
        name = self.queue_name()
        got: dict[str, list[int]] = {"a": [], "b": []}
        brokers = {}
        for who in ("a", "b"):
            brokers[who] = await self.broker()
            queue = await self.work_queue(name, brokers[who])

            def handler(body: bytes, who: str = who) -> Deferred[None]:
                got[who].append(json.loads(body)["n"])
                # Hold each message a little so both consumers take part.
                return deferLater(reactor, 0.01, lambda: None)

            queue.consume(handler)
            await brokers[who].when_connected()
        await wait_for(lambda: all(b.connected for b in brokers.values()))
        publisher = await self.work_queue(name)
        await DeferredList([publisher.publish({"n": n}) for n in range(40)])
        await wait_for(lambda: len(got["a"]) + len(got["b"]) >= 40)
        # Every message acknowledged: none can be delivered again.
        await settled(name)
        self.assertEqual(sorted(got["a"] + got["b"]), list(range(40)), "each message once")
        self.assertTrue(got["a"] and got["b"], "both consumers took part: %r" % (got,))

    @inline
    async def test_message_in_progress_is_redelivered_after_a_cut_connection(self) -> None:
        raw = await self.raw()
        name = self.queue_name()
        broker = await self.broker()
        queue = await self.work_queue(name, broker)
        calls: list[bytes] = []
        stuck: Deferred[None] = Deferred()

        def handler(body: bytes) -> Deferred[None]:
            calls.append(body)
            if len(calls) == 1:
                return stuck  # the process "crashes" while handling it
            return succeed(None)

        queue.consume(handler)
        await broker.when_connected()
        await queue.publish(b"m")
        await wait_for(lambda: len(calls) == 1)
        self.assertEqual(await close_connections(broker.connection_name), 1)
        await wait_for(lambda: len(calls) == 2, what="redelivery")
        await wait_for(lambda: broker.metrics.value(
            "mailhub_workqueue_acked_total", {"queue": name}) == 1)
        # The first attempt finishing late must not ack on a dead channel.
        stuck.callback(None)
        self.assertEqual(broker.metrics.value(
            "mailhub_workqueue_acked_total", {"queue": name}), 1)
        await broker.stopService()
        self.assertEqual(await self.ready_count(raw, name), 0)

    @inline
    async def test_foreign_headers_and_large_text_bodies_reach_the_dead_letter_intact(self) -> None:
        await self.raw()
        name = self.queue_name()
        broker = await self.broker()
        queue = await self.work_queue(name, broker)
        received: list[bytes] = []

        def handler(body: bytes) -> None:
            received.append(body)
            raise ValidationError("unknown user")

        queue.consume(handler)
        session = await broker.when_connected()
        # Bigger than RabbitMQ's frame size, full of two-byte characters, so
        # frame borders cut characters; headers of types other clients write.
        body = ("é" * 200_000).encode("utf-8")
        headers = {"origin": "james", "big": 2 ** 40, "flag": True, "ratio": 0.25,
                   "list": [1, "two"], "raw": b"\x00\xff"}
        await broker.outbox.put(queue.route, body, {"headers": headers, "delivery-mode": 2,
                                                    "message-id": "m-42"})
        await wait_for(lambda: broker.metrics.value(
            "mailhub_workqueue_dead_lettered_total", {"queue": name}) == 1)
        self.assertEqual(received, [body])
        channel = await session.open_channel()
        dead = await channel.basic_get(queue=name + ":dead", no_ack=True)
        self.assertEqual(dead.content.body, body)
        kept = dead.content.properties
        self.assertEqual(kept["message-id"], "m-42")
        dead_headers = dict(kept["headers"])
        # The id and time `mailhub dead` shows (tests/test_cli_dead_rabbitmq.py).
        self.assertRegex(dead_headers.pop(ID_HEADER), "^[0-9a-f]{12}$")
        self.assertIsInstance(dead_headers.pop(AT_HEADER), int)
        self.assertEqual(dead_headers, dict(headers, **{
            REASON_HEADER: "unknown user", "x-mailhub-queue": name}))

    @inline
    async def test_consumption_comes_back_when_the_queue_is_deleted_under_it(self) -> None:
        raw = await self.raw()
        name = self.queue_name()
        broker = await self.broker()
        queue = await self.work_queue(name, broker)
        got: list[bytes] = []
        queue.consume(got.append)
        await broker.when_connected()
        await raw.channel.queue_delete(queue=name)
        # The broker cancels our consumer; mailhub reconnects, declares the
        # queue again and consumes from it.
        await wait_for(lambda: broker.metrics.value("mailhub_amqp_connections_total") == 2,
                       what="the reconnection")
        await broker.when_connected()
        await queue.publish(b"after")
        await wait_for(lambda: got == [b"after"])


class SharedSubscriptionTests(RabbitMQTestCase):
    """A global topic consumed through one queue shared by every mailhub instance."""

    async def instance(self, topics: dict[str, str], dispatcher: Any,
                       **kw: Any) -> tuple[Broker, CalendarSource]:
        """One mailhub instance's calendar source on its own connection."""
        broker = await self.broker()
        pubsub = PubSub(Hub(LocalPubSub(), GlobalPubSub(broker)), [broker], broker,
                        reactor, broker.metrics)

        def shared(topic: str) -> Any:
            return pubsub.shared_subscription(topics[topic], queue=topics[topic] + ":shared",
                                              retry_initial=0.05, retry_max=0.2, **kw)

        source = CalendarSource(dispatcher, shared, broker.metrics)
        source.start()
        self.addCleanup(source.stop)
        queues = [pubsub.shared_subscription(topic, queue=topic + ":shared")
                  for topic in topics.values()]
        # Consuming (so the queues are declared and bound) before anyone publishes.
        await wait_for(lambda: all(q is not None and q._consumer is not None for q in queues),
                       what="the shared consumers")
        return broker, source

    def calendar_topics(self) -> dict[str, str]:
        topics = {name: self.topic_name() for name in CALENDAR_TOPICS}
        for topic in topics.values():
            self.queues += [topic + ":shared", topic + ":shared:dead"]
        return topics

    async def consumers(self, raw: RawClient, queue: str) -> int:
        reply = await raw.channel.queue_declare(queue=queue, passive=True)
        return int(reply.consumer_count)

    @staticmethod
    def event(user: str) -> bytes:
        return json.dumps({"eventPath": "/calendars/%s/cal/1.ics" % user, "import": False,
                           "event": ["vcalendar", [], [["vevent", [
                               ["organizer", {}, "cal-address", "mailto:o@example.org"],
                               ["attendee", {}, "cal-address", "mailto:a@example.org"]],
                               []]]]}).encode()

    @inline
    async def test_two_instances_collect_each_calendar_event_once_in_total(self) -> None:
        raw = await self.raw()
        topics = self.calendar_topics()
        submitted: dict[str, list[str]] = {"a": [], "b": []}

        class Dispatcher:
            def __init__(self, who: str) -> None:
                self.who = who

            def publish(self, body: bytes) -> Deferred[None]:
                submitted[self.who].append(json.loads(body)["userId"])
                return deferLater(reactor, 0.01, lambda: None)

        for who in ("a", "b"):
            await self.instance(topics, Dispatcher(who))
        for topic in topics.values():
            self.assertEqual(await self.consumers(raw, topic + ":shared"), 2)
        # An ordinary (ESN) subscriber of the topic still gets its own copy.
        esn_inbox = await raw.subscribe_like_esn(topics["calendar:event:created"])

        expected = []
        for n in range(30):
            topic = topics[CALENDAR_TOPICS[n % 2]]
            await raw.publish_like_esn(topic, self.event("u%d" % n))
            expected.append("u%d" % n)
        await wait_for(lambda: len(submitted["a"]) + len(submitted["b"]) >= 30)
        # Every event acknowledged: none can be submitted again.
        for topic in topics.values():
            await settled(topic + ":shared")
        self.assertEqual(sorted(submitted["a"] + submitted["b"]), sorted(expected),
                         "each event submitted exactly once across the two instances")
        self.assertTrue(submitted["a"] and submitted["b"],
                        "both instances took part: %r" % (submitted,))
        for _ in range(15):
            await esn_inbox.get(timeout=5)

    @inline
    async def test_an_event_whose_submit_fails_transiently_is_retried_not_dropped(self) -> None:
        raw = await self.raw()
        topics = self.calendar_topics()
        attempts: list[str] = []

        class FullOutbox:
            def publish(self, body: bytes) -> Deferred[None]:
                attempts.append(json.loads(body)["userId"])
                if len(attempts) < 3:
                    return fail(Unavailable("the outbox is full"))
                return succeed(None)

        broker, _ = await self.instance(topics, FullOutbox())
        queue = topics["calendar:event:updated"] + ":shared"
        self.assertEqual(await self.consumers(raw, queue), 1)
        await raw.publish_like_esn(topics["calendar:event:updated"], self.event("u1"))
        await wait_for(lambda: broker.metrics.value(
            "mailhub_workqueue_acked_total", {"queue": queue}) == 1, what="the ack")
        self.assertEqual(attempts, ["u1", "u1", "u1"])
        self.assertEqual(len(self.flushLoggedErrors(Unavailable)), 2)
        await broker.stopService()
        reply = await raw.channel.queue_declare(queue=queue, passive=True)
        self.assertEqual(int(reply.message_count), 0, "acked once submitted")
