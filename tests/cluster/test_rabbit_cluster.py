"""mailhub on a three-node RabbitMQ cluster (tests.support.rabbit_cluster).

- ``[amqp] url`` lists several nodes: a node that does not answer is skipped.
- With ``[collector] queue_type = quorum``, killing the node that leads
  ``collector:email`` while 10,000 collector messages stream through three
  instances loses no contact and writes none twice; global topics keep
  reaching every instance, and what an instance publishes during its
  failover is confirmed (published again if need be), never lost.

The collector messages come from pika (another client library than
mailhub's txamqp), with publisher confirms, as Apache James or OpenPaaS would
publish them. Each instance handles them with the collector's own message
decoding and address parsing and writes each contact into one shared
in-memory :class:`Store` the way the collector writes to CardDAV: under a
name derived from the address, created only when absent (``If-None-Match:
*``). (The whole engine over the CardDAV fake handles about 20 messages a
second on the shared test machine: too slow for 10,000 in a test.)
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailhub.collector.addresses import parse_entries
from mailhub.collector.engine import decode_message
from mailhub.collector.vcard import contact_uuid
from mailhub.directory.model import User
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.pubsub.connection import Broker
from mailhub.pubsub.globalpubsub import GlobalPubSub
from mailhub.pubsub.local import LocalPubSub
from mailhub.pubsub.wiring import PubSub

from tests.pubsub.fakes import require_spec
from tests.pubsub.test_rabbitmq import SPEC, inline, wait_for
from tests.support import rabbit_cluster
from tests.support.amqp_peer import _pika
from tests.support.rabbitmq import unique
from tests.support.require import free_port

MESSAGES = 10_000
USERS = [User(login="u%02d@example.org" % i, name="User %d" % i,
              emails=("u%02d@example.org" % i,), id="U%02d" % i) for i in range(100)]


def message(i: int) -> dict[str, Any]:
    """Collector message ``i``: one new address for one of the 100 users."""
    return {"userId": USERS[i % len(USERS)].id, "emails": ["Contact %d <c%05d@example.net>"
                                                           % (i, i)]}


class Store:
    """The contacts of every user, written as the collector writes them.

    ``put`` creates a contact only when no contact of that name exists (a
    PUT with ``If-None-Match: *``); ``writes`` counts the contacts created,
    ``exists`` the writes refused because the contact was there (a message
    handled a second time).
    """

    def __init__(self) -> None:
        self.books: dict[str, dict[str, str]] = {}
        self.writes = 0
        self.exists = 0

    def put(self, user: str, name: str, email: str) -> None:
        book = self.books.setdefault(user, {})
        if name in book:
            self.exists += 1
        else:
            book[name] = email
            self.writes += 1

    def __len__(self) -> int:
        return sum(len(book) for book in self.books.values())


class Collector:
    """The collector's handling of a message, writing into a :class:`Store`."""

    def __init__(self, store: Store, clock: Any) -> None:
        self.store = store
        self.clock = clock
        self.collected = 0

    async def handle(self, body: bytes) -> None:
        data = decode_message(body)
        # The CardDAV request takes a moment: messages are in progress when
        # the node dies.
        await deferLater(self.clock, 0.001, lambda: None)
        for recipient in parse_entries(data["emails"]).recipients:
            self.store.put(data["userId"], contact_uuid(recipient.key), recipient.email)
        self.collected += 1


class Instance:
    """One mailhub instance: its broker connection, pubsub and collector."""

    def __init__(self, name: str, url: str, store: Store, queue: str) -> None:
        self.name = name
        self.metrics = Metrics()
        self.broker = Broker(reactor, url, SPEC, heartbeat=5, metrics=self.metrics,
                             connection_name=unique(name), retry_policy=lambda n: 0.2)
        self.pubsub = PubSub(Hub(LocalPubSub(), GlobalPubSub(self.broker, self.metrics)),
                             [self.broker], self.broker, reactor, self.metrics)
        self.collector = Collector(store, reactor)
        self.queue = self.pubsub.work_queue(queue, queue_type="quorum")
        self.queue.consume(lambda body: Deferred.fromCoroutine(self.collector.handle(body)))
        self.seen: list[Any] = []


class ClusterTestCase(TestCase):
    timeout = 600

    def setUp(self) -> None:
        require_spec()
        self.cluster = rabbit_cluster.shared()
        # A test that killed a node leaves it to the next one to restart it.
        for node in self.cluster.nodes:
            if not node.running:
                self.cluster.restart(node)

    def instance(self, name: str, url: str, store: Store, queue: str) -> Instance:
        found = Instance(name, url, store, queue)
        found.broker.startService()
        self.addCleanup(found.broker.stopService)
        return found


class FailoverTests(ClusterTestCase):
    @inline
    async def test_a_node_that_does_not_answer_is_skipped(self) -> None:
        nodes = self.cluster.nodes
        url = "amqp://guest:guest@127.0.0.1:%d/, %s %s" % (free_port(), nodes[1].url,
                                                          nodes[2].url)
        broker = Broker(reactor, url, SPEC, heartbeat=5, connection_name=unique("skip"),
                        retry_policy=lambda n: 0.2)
        broker.startService()
        self.addCleanup(broker.stopService)
        await broker.when_connected()
        self.assertEqual(broker.address.port, nodes[1].port)


class QuorumTests(ClusterTestCase):
    @inline
    async def test_killing_the_leader_of_a_quorum_collector_queue_mid_stream(self) -> None:
        cluster = self.cluster
        nodes = cluster.nodes
        store = Store()
        queue = unique("collector")
        topic = unique("topic")
        # Three instances, each on its own node first, each able to fail over.
        instances = [self.instance(
            "i%d" % i, " ".join(nodes[(i + k) % 3].url for k in range(3)), store, queue)
            for i in range(3)]
        for each in instances:
            await each.broker.when_connected()
            await each.pubsub.hub.global_.topic(topic).subscribe(each.seen.append)
        self.assertEqual([each.broker.address.port for each in instances],
                         [node.port for node in nodes])
        await wait_for(lambda: all(each.queue._consumer is not None for each in instances),
                       what="every instance consuming")

        started = time.monotonic()
        phases: dict[str, float] = {}
        leader = await deferToThread(cluster.queue_leader, queue)
        phases["leader known"] = time.monotonic() - started
        # The instance on the leader's node: it fails over when the node dies.
        (failing,) = [each for each in instances if each.broker.address.port == leader.port]
        survivors = [each for each in instances if each is not failing]
        publisher_node = survivors[0].broker.address.port

        # pika publishes the 10,000 messages, with confirms, to a surviving
        # node, while the instances collect them.
        publishing = Deferred.fromCoroutine(self.publish(publisher_node, queue))

        def written() -> int:
            return len(store)

        await wait_for(lambda: written() >= MESSAGES // 5, timeout=300,
                       what="a fifth of the contacts collected")
        phases["a fifth collected"] = time.monotonic() - started
        # Publications of the failing instance before, during and after its
        # failover; the kill comes while they go on.
        confirmations: list[Deferred[None]] = []
        sent: list[int] = []

        async def publish_during_failover() -> None:
            for n in range(150):
                sent.append(n)
                confirmations.append(
                    failing.pubsub.hub.global_.topic(topic).publish({"n": n}))
                await deferLater(reactor, 0.02, lambda: None)

        during = Deferred.fromCoroutine(publish_during_failover())
        await deferLater(reactor, 0.3, lambda: None)
        collected_at_kill = written()
        leader.kill()
        phases["killed"] = time.monotonic() - started
        await during
        results = await DeferredList(confirmations, consumeErrors=True)
        failed = [result for ok, result in results if not ok]
        self.assertEqual(failed, [], "publications during the failover were lost")

        phases["failover publications confirmed"] = time.monotonic() - started
        await wait_for(lambda: failing.broker.connected, timeout=60, what="failover")
        self.assertNotEqual(failing.broker.address.port, leader.port)
        await publishing
        phases["published"] = time.monotonic() - started
        await wait_for(lambda: written() >= MESSAGES, timeout=300, what="every contact")
        phases["collected"] = time.monotonic() - started
        # Every instance's subscription still works after the failover
        # (the failing one's queue was on the dead node: it takes a new one).
        await survivors[0].pubsub.hub.global_.topic(topic).publish({"n": "after"})
        await wait_for(lambda: all({"n": "after"} in each.seen for each in instances),
                       timeout=60, what="the publication after the failover on %s" % [
                           each.name for each in instances if {"n": "after"} not in each.seen])
        for each in survivors:
            self.assertEqual(sorted({m["n"] for m in each.seen if m["n"] != "after"}),
                             sent, "%s missed publications of the failover" % each.name)

        # Wait until the queue is empty and nothing is unacked, then count.
        ready, unacked = await deferToThread(cluster.queue_counts, queue)
        deadline = time.monotonic() + 60
        while (ready, unacked) != (0, 0) and time.monotonic() < deadline:
            await deferLater(reactor, 0.5, lambda: None)
            ready, unacked = await deferToThread(cluster.queue_counts, queue)
        self.assertEqual((ready, unacked), (0, 0))
        phases["queue settled"] = time.monotonic() - started
        for i, user in enumerate(USERS):
            self.assertEqual(sorted(store.books[user.id].values()),
                             ["c%05d@example.net" % n for n in range(i, MESSAGES, len(USERS))])
        # Each contact written once; what was handled twice found it there.
        self.assertEqual(store.writes, MESSAGES)
        handled = sum(each.collector.collected for each in instances)
        self.assertEqual(handled, MESSAGES + store.exists)
        print("\nquorum failover: %d messages, %d handled twice; leader %s killed after %d "
              "contacts; "
              "seconds since the stream began: %s; cluster started in %.1f s %r" % (
                  MESSAGES, store.exists, leader.name, collected_at_kill,
                  ", ".join("%s %.1f" % item for item in phases.items()),
                  cluster.started_in, cluster.phases))

    async def publish(self, port: int, exchange: str) -> None:
        """pika publishes the collector messages to ``exchange``, confirmed,
        a window at a time; what the broker nacks is published again."""
        pika = _pika()
        from pika.adapters.twisted_connection import TwistedProtocolConnection

        parameters = pika.ConnectionParameters(
            credentials=pika.PlainCredentials("guest", "guest"), heartbeat=0)
        connection = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                                           TwistedProtocolConnection(parameters))
        await connection.ready
        self.addCleanup(lambda: connection.close() if connection.is_open else None)
        channel = await connection.channel()
        await channel.confirm_delivery()
        properties = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        left = list(range(MESSAGES))
        while left:
            window, left = left[:500], left[500:]
            results = await DeferredList(
                [channel.basic_publish(exchange, "", json.dumps(message(i)).encode(),
                                       properties) for i in window], consumeErrors=True)
            left += [i for i, (ok, _) in zip(window, results) if not ok]


