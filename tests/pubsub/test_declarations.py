"""What mailhub declares on the real RabbitMQ, and what a refused declaration takes down.

Each test runs in a virtual host of its own (``collector:email`` and the
calendar topics have fixed names), where a peer (pika, another client
library than mailhub's txamqp) first declares things the way other systems
do: Apache James' ``AmqpForwardAttribute`` makes ``collector:email`` a
*direct* exchange, another tool may declare a queue with other arguments.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from mailhub.collector.sources import CALENDAR_TOPICS
from mailhub.errors import ValidationError
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.pubsub.connection import Broker
from mailhub.pubsub.globalpubsub import GlobalPubSub
from mailhub.pubsub.local import LocalPubSub
from mailhub.pubsub.wiring import PubSub
from mailhub.web.events import STREAM_TOPICS

from tests.pubsub.test_rabbitmq import SPEC, inline, wait_for
from tests.support.amqp_peer import VirtualHost, _pika
from tests.support.amqplib import SCRIPTS, require_amqplib
from tests.support.rabbitmq import HOST, PORT, _rabbitmqctl, require_rabbitmq, unique


class Peer:
    """A pika connection into the test's vhost: someone else on the broker."""

    def __init__(self, vhost: str) -> None:
        self.pika = _pika()
        parameters = self.pika.ConnectionParameters(
            host=HOST, port=PORT, virtual_host=vhost,
            credentials=self.pika.PlainCredentials("guest", "guest"), heartbeat=0)
        self.connection = self.pika.BlockingConnection(parameters)
        self.channel = self.connection.channel()

    def publish(self, exchange: str, body: Any, routing_key: str = "") -> None:
        self.channel.basic_publish(exchange=exchange, routing_key=routing_key,
                                   body=json.dumps(body).encode())

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


class InVirtualHost(TestCase):
    """A vhost of the test's own, a pika peer in it, and the log collected."""

    timeout = 90

    def setUp(self) -> None:
        require_rabbitmq()
        self.vhost = VirtualHost().create()
        self.addCleanup(self.vhost.delete)
        self.peer = Peer(self.vhost.name)
        self.addCleanup(self.peer.close)
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def pubsub(self) -> PubSub:
        """One mailhub instance's pubsub on the test's vhost, started."""
        broker = Broker(reactor, self.vhost.url, SPEC, heartbeat=5, metrics=Metrics(),
                        connection_name=unique("conn"), retry_policy=lambda n: 0.1)
        broker.refusal_retry = 0.2
        broker.startService()
        self.addCleanup(broker.stopService)
        return PubSub(Hub(LocalPubSub(), GlobalPubSub(broker)), [broker], broker,
                      reactor, broker.metrics)

    def collector(self, pubsub: PubSub, routing_key: str = "",
                  queue_type: str = "classic") -> tuple[Any, list[Any]]:
        """The collector's work queue, consumed; the list of what it handled."""
        handled: list[Any] = []
        queue = pubsub.work_queue("collector:email", retry_initial=0.05, retry_max=0.2,
                                  routing_key=routing_key, queue_type=queue_type)

        def handle(body: bytes) -> None:
            data = json.loads(body)
            if data.get("poison"):
                raise ValidationError("poison")
            handled.append(data)

        queue.consume(handle)
        self.addCleanup(queue.stop)
        return queue, handled



class DeclarationTests(InVirtualHost):
    @inline
    async def test_quorum_collector_queue_and_dead_letter_queue(self) -> None:
        pubsub = self.pubsub()
        queue, handled = self.collector(pubsub, queue_type="quorum")
        await wait_for(lambda: queue._consumer is not None, what="the collector's consumer")
        self.peer.publish("collector:email", {"userEmail": "a@example.org", "emails": ["b@x"]})
        self.peer.publish("collector:email", {"poison": True})
        await wait_for(lambda: handled, what="the message")
        self.assertEqual(handled, [{"userEmail": "a@example.org", "emails": ["b@x"]}])
        # Both queues are quorum queues: a passive look says so through a
        # declaration with the type (accepted) and without it (refused).
        self.peer.channel.queue_declare("collector:email", durable=True,
                                        arguments={"x-queue-type": "quorum"})
        self.peer.channel.queue_declare("collector:email:dead", durable=True, arguments={
            "x-queue-type": "quorum", "x-delivery-limit": 1_000_000})
        channel = self.peer.connection.channel()
        error = self.assertRaises(Exception, channel.queue_declare, "collector:email:dead",
                                  durable=True)
        self.assertIn("x-queue-type", str(error))
        await wait_for(lambda: self.peer.channel.queue_declare(
            "collector:email:dead", passive=True).method.message_count == 1,
            what="the poison in the quorum dead-letter queue")

    @inline
    async def test_a_queue_of_the_other_type_is_refused_with_what_to_do(self) -> None:
        # An OpenPaaS node declared collector:email first, classic (no arguments).
        self.peer.channel.queue_declare("collector:email", durable=True)
        pubsub = self.pubsub()
        queue, handled = self.collector(pubsub, queue_type="quorum")
        seen: list[Any] = []
        await pubsub.hub.global_.topic("mail:new").subscribe(seen.append)
        await wait_for(lambda: "refused" in pubsub.health(), what="the refusal")
        reason = pubsub.health()["refused"]["queue 'collector:email'"]
        self.assertIn("406 PRECONDITION_FAILED", reason)
        self.assertIn("x-queue-type", reason)
        self.assertIn("set [collector] queue_type to the existing queue's type", reason)
        self.assertIn("rabbitmqctl delete_queue collector:email", reason)
        self.assertIsNone(queue._consumer)
        logged = [e for e in self.logged if e.get("what") == "queue 'collector:email'"]
        self.assertIn("[collector] queue_type", logged[0]["reason"])
        # Topics still work.
        self.peer.publish("mail:new", {"user": "a@example.org"})
        await wait_for(lambda: seen, what="a topic's message")

    @inline
    async def test_a_direct_collector_exchange_is_adopted_and_the_rest_works(self) -> None:
        # James' AmqpForwardAttribute got there first, with its default type.
        self.peer.channel.exchange_declare("collector:email", exchange_type="direct",
                                           durable=True)
        pubsub = self.pubsub()
        queue, handled = self.collector(pubsub, routing_key="contacts")
        seen: list[Any] = []
        await pubsub.hub.global_.topic("mail:new").subscribe(seen.append)
        await wait_for(lambda: queue._consumer is not None, what="the collector's consumer")

        # James publishes with its routing key; mailhub collects it.
        self.peer.publish("collector:email", {"userEmail": "a@example.org", "emails": ["b@x"]},
                          routing_key="contacts")
        await wait_for(lambda: handled, what="the James message")
        self.assertEqual(handled, [{"userEmail": "a@example.org", "emails": ["b@x"]}])
        # mailhub's own publications to the queue take the same way.
        await queue.publish({"userEmail": "c@example.org", "emails": ["d@x"]})
        await wait_for(lambda: len(handled) == 2, what="mailhub's own message")
        # Topics work, and nothing is refused.
        self.peer.publish("mail:new", {"user": "a@example.org"})
        await wait_for(lambda: seen, what="a topic's message")
        self.assertEqual(pubsub.health()["ok"], True)
        self.assertNotIn("refused", pubsub.health())
        # The adoption is said once, with the exchange's type and the key.
        adopted = [e for e in self.logged if "exists as a" in e.get("log_format", "")]
        self.assertEqual(len(adopted), 1)
        self.assertEqual((adopted[0]["exchange"], adopted[0]["kind"], adopted[0]["key"]),
                         ("collector:email", "direct", "contacts"))

    @inline
    async def test_a_refused_exchange_takes_down_only_what_depends_on_it(self) -> None:
        # Someone declared a calendar topic as a direct exchange: mailhub's
        # shared subscription to it cannot be set up; nothing else depends on it.
        refused = CALENDAR_TOPICS[0]
        self.peer.channel.exchange_declare(refused, exchange_type="direct", durable=True)
        pubsub = self.pubsub()
        queue, handled = self.collector(pubsub)
        calendar: list[bytes] = []
        shared = pubsub.shared_subscription(refused, retry_initial=0.05, retry_max=0.2)
        shared.consume(calendar.append)
        other = pubsub.shared_subscription(CALENDAR_TOPICS[1], retry_initial=0.05,
                                           retry_max=0.2)
        updated: list[bytes] = []
        other.consume(updated.append)
        seen: list[Any] = []
        await pubsub.hub.global_.topic("mail:new").subscribe(seen.append)
        assert pubsub.broker is not None
        await wait_for(lambda: pubsub.broker is not None and pubsub.broker.connected,
                       what="the connection")
        await wait_for(lambda: queue._consumer is not None and other._consumer is not None,
                       what="the consumers that do not depend on the refused exchange")

        # The rest works: the collector, the other calendar topic, topics.
        self.peer.publish("collector:email", {"userEmail": "a@example.org", "emails": ["b@x"]})
        self.peer.publish(CALENDAR_TOPICS[1], {"eventPath": "/calendars/u/c/e.ics"})
        self.peer.publish("mail:new", {"user": "a@example.org"})
        await wait_for(lambda: handled and updated and seen, what="the working parts")
        connections = pubsub.broker.metrics.counter(
            "mailhub_amqp_connections_total", "AMQP connections made")
        self.assertEqual(connections._value.get(), 1)  # never reconnected

        # /healthz names the refused exchange and the broker's reason.
        health = pubsub.health()
        self.assertFalse(health["ok"])
        what = "exchange %r" % refused
        self.assertEqual(list(health["refused"]), [what])
        self.assertIn("406", health["refused"][what])
        self.assertIn("PRECONDITION_FAILED", health["refused"][what])
        self.assertIn("the broker refused %s: 406" % what, health["state"])
        self.assertTrue(health["state"].startswith("connected; "))

        # Once the conflict is gone, mailhub sets it up by itself.
        self.peer.channel.exchange_delete(refused)
        await wait_for(lambda: shared._consumer is not None, timeout=20,
                       what="the shared subscription after the fix")
        self.assertEqual(pubsub.health()["ok"], True)
        self.peer.publish(refused, {"eventPath": "/calendars/u/c/f.ics"})
        await wait_for(lambda: calendar, what="the healed topic's message")

    @inline
    async def test_a_refused_queue_is_named_and_the_topics_still_work(self) -> None:
        # A queue declared with other arguments than mailhub's (none).
        self.peer.channel.queue_declare("collector:email", durable=True,
                                        arguments={"x-message-ttl": 60000})
        pubsub = self.pubsub()
        queue, handled = self.collector(pubsub)
        seen: list[Any] = []
        await pubsub.hub.global_.topic("mail:new").subscribe(seen.append)
        self.peer.publish("mail:new", {"user": "a@example.org"})
        await wait_for(lambda: seen, what="a topic's message")
        await wait_for(lambda: "refused" in pubsub.health(), what="the refusal")
        health = pubsub.health()
        self.assertFalse(health["ok"])
        self.assertIn("queue 'collector:email'", health["refused"])
        self.assertIn("x-message-ttl", health["refused"]["queue 'collector:email'"])
        self.assertIsNone(queue._consumer)
        # Own publications on topics still go out and come back to others.
        d: Deferred[None] = pubsub.hub.global_.topic("mail:new").publish({"n": 2})
        await d


class OpenPaaSDeclarationTests(TestCase):
    """OpenPaaS's own declarations, made by node's amqplib, before and after mailhub's."""

    timeout = 120

    def setUp(self) -> None:
        require_rabbitmq()
        self.node, self.env = require_amqplib()
        self.vhost = VirtualHost().create()
        self.addCleanup(self.vhost.delete)

    async def openpaas(self, *args: str) -> dict[str, Any]:
        out, err, code = await getProcessOutputAndValue(
            self.node, [str(SCRIPTS / "openpaas.js"), self.vhost.url, *args], env=self.env)
        self.assertEqual(code, 0, (out, err))
        return json.loads(out.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]

    @inline
    async def test_openpaas_declarations_never_meet_a_406_and_messages_flow_both_ways(
            self) -> None:
        topics = list(STREAM_TOPICS) + list(CALENDAR_TOPICS)
        # OpenPaaS first.
        before = await self.openpaas("declare", json.dumps(topics))
        self.assertEqual(before, {"errors": []})

        # Then a mailhub instance with everything that declares on the broker:
        # the collector's queue, the calendar's shared subscriptions, an
        # event stream's subscription and a plain topic subscription.
        broker = Broker(reactor, self.vhost.url, SPEC, heartbeat=5, metrics=Metrics(),
                        connection_name=unique("conn"), retry_policy=lambda n: 0.1)
        broker.startService()
        self.addCleanup(broker.stopService)
        pubsub = PubSub(Hub(LocalPubSub(), GlobalPubSub(broker)), [broker], broker,
                        reactor, broker.metrics)
        queue = pubsub.work_queue("collector:email", retry_initial=0.05, retry_max=0.2)
        collected: list[Any] = []

        def collect(body: bytes) -> Deferred[None]:
            data = json.loads(body)
            if "emails" not in data:
                raise ValidationError("no emails")
            collected.append(data)
            return pubsub.hub.global_.topic("contacts:contact:add").publish(
                {"contactId": "c1", "bookName": "collected", "user": data["userEmail"]})

        queue.consume(collect)
        self.addCleanup(queue.stop)
        shared = [pubsub.shared_subscription(topic) for topic in CALENDAR_TOPICS]
        for subscription in shared:
            subscription.consume(lambda body: None)
        streamed: list[tuple[str, Any]] = []
        await pubsub.hub.global_.subscribe_topics(STREAM_TOPICS,
                                                  lambda t, d: streamed.append((t, d)))
        await pubsub.hub.global_.topic("mail:new").subscribe(lambda data: None)
        await wait_for(lambda: queue._consumer is not None and all(
            s._consumer is not None for s in shared), what="mailhub's consumers")
        self.assertEqual(pubsub.health()["ok"], True)
        # pika (another client, as a Python ESN peer would) declares the same,
        # exactly as OpenPaaS does: a refusal would raise ChannelClosedByBroker.
        pika_peer = Peer(self.vhost.name)
        self.addCleanup(pika_peer.close)
        for topic in topics + ["collector:email"]:
            pika_peer.channel.exchange_declare(topic, exchange_type="fanout", durable=True)
        pika_peer.channel.queue_declare("collector:email", durable=True)
        pika_peer.channel.queue_bind("collector:email", "collector:email", routing_key="")

        # OpenPaaS again, after mailhub: the same declarations, a subscriber
        # to a topic mailhub publishes, and collector messages (one that can
        # never be collected).
        after = await self.openpaas(
            "exchange", json.dumps(topics), "contacts:contact:add",
            json.dumps([{"userEmail": "nobody@example.org"},
                        {"userEmail": "a@example.org", "emails": ["b@example.org"]}]),
            "20000")
        self.assertEqual(after["errors"], [])
        self.assertEqual(collected, [{"userEmail": "a@example.org", "emails": ["b@example.org"]}])
        self.assertEqual(after["received"], {"contactId": "c1", "bookName": "collected",
                                             "user": "a@example.org"})
        self.assertIn(("contacts:contact:add", after["received"]), streamed)
        self.assertEqual(pubsub.health()["ok"], True)

        # The dead letter went to mailhub's own queue: collector:email is
        # still exactly what OpenPaaS declares (durable, not exclusive, not
        # auto-delete, no arguments).
        peer = Peer(self.vhost.name)
        self.addCleanup(peer.close)
        dead = peer.channel.queue_declare("collector:email:dead", passive=True)
        self.assertEqual(dead.method.message_count, 1)
        described = await self.queues()
        self.assertEqual(described["collector:email"], ("true", "false", "false", "[]"))

    async def queues(self) -> dict[str, tuple[str, ...]]:
        """name -> (durable, exclusive, auto_delete, arguments), from rabbitmqctl."""
        out, err, code = await getProcessOutputAndValue(
            _rabbitmqctl(), ["list_queues", "-q", "--no-table-headers", "-p", self.vhost.name,
                             "name", "durable", "exclusive", "auto_delete", "arguments"],
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                 "HOME": os.environ.get("HOME", "/root")})
        self.assertEqual(code, 0, err)
        found = {}
        for line in out.decode().splitlines():
            name, *rest = line.split("\t")
            found[name] = tuple(rest)
        return found

