"""mailhub on a three-node RabbitMQ cluster (tests.support.rabbit_cluster).

- ``[amqp] url`` lists several nodes: a node that does not answer is skipped.
- With ``[collector] queue_type = quorum``, killing the node that leads
  ``collector:email`` while 10,000 collector messages stream through three
  instances loses no contact and writes none twice; global topics keep
  reaching every instance, and what an instance publishes during its
  failover is confirmed (published again if need be), never lost.

The collector messages come from pika (another client library than
mailhub's txamqp), with publisher confirms, as Apache James or OpenPaaS would
publish them; the contacts are written by the real collector engine into the
collector's in-memory CardDAV fake (tests.collector.fakes), shared by the
three instances as they would share one CardDAV server.
"""

from __future__ import annotations

import json
import time
from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailhub.collector.carddav import BookLayout, CardDAVClient
from mailhub.collector.engine import CollectorEngine
from mailhub.collector.vcard import parse_vcard
from mailhub.directory.model import User
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.pubsub.connection import Broker
from mailhub.pubsub.globalpubsub import GlobalPubSub
from mailhub.pubsub.local import LocalPubSub
from mailhub.pubsub.wiring import PubSub

from tests.collector.fakes import FakeCardDAV, FakeUsers
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


class Instance:
    """One mailhub instance: its broker connection, pubsub and collector."""

    def __init__(self, name: str, url: str, dav: FakeCardDAV, queue: str) -> None:
        self.name = name
        self.metrics = Metrics()
        self.broker = Broker(reactor, url, SPEC, heartbeat=5, metrics=self.metrics,
                             connection_name=unique(name), retry_policy=lambda n: 0.2)
        self.pubsub = PubSub(Hub(LocalPubSub(), GlobalPubSub(self.broker, self.metrics)),
                             [self.broker], self.broker, reactor, self.metrics)
        client = CardDAVClient(StubTreq(dav), reactor, credentials=("svc", "pw"),
                               metrics=self.metrics)
        self.engine = CollectorEngine(
            FakeUsers(USERS), client, BookLayout.from_config("http://dav.test/dav/", ""),
            Hub(), self.metrics, reactor)
        self.queue = self.pubsub.work_queue(queue, queue_type="quorum")
        self.queue.consume(self.engine.handle)
        self.seen: list[Any] = []

    @property
    def collected(self) -> float:
        return self.metrics.value("mailhub_collector_collected_total") or 0


class ClusterTestCase(TestCase):
    timeout = 600

    def setUp(self) -> None:
        require_spec()
        self.cluster = rabbit_cluster.shared()
        # A test that killed a node leaves it to the next one to restart it.
        for node in self.cluster.nodes:
            if not node.running:
                self.cluster.restart(node)

    def instance(self, name: str, url: str, dav: FakeCardDAV, queue: str) -> Instance:
        found = Instance(name, url, dav, queue)
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
        dav = FakeCardDAV()
        for user in USERS:
            home = "/dav/%s/" % user.login
            dav.homes.add(home)
            dav.books[home + "personal/"] = {}
        queue = unique("collector")
        topic = unique("topic")
        # Three instances, each on its own node first, each able to fail over.
        instances = [self.instance(
            "i%d" % i, " ".join(nodes[(i + k) % 3].url for k in range(3)), dav, queue)
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
            return sum(len(cards) for book, cards in dav.books.items()
                       if book.endswith("/collected/"))

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
            cards = dav.books["/dav/%s/collected/" % user.login]
            addresses = sorted(email for card in cards.values()
                               for email in parse_vcard(card).emails)
            self.assertEqual(addresses, ["c%05d@example.net" % n
                                         for n in range(i, MESSAGES, len(USERS))])
        # Each contact written once: a second write of one would count twice.
        self.assertEqual(sum(each.collected for each in instances), MESSAGES)
        print("\nquorum failover: %d messages; leader %s killed after %d contacts; "
              "seconds since the stream began: %s; cluster started in %.1f s %r" % (
                  MESSAGES, leader.name, collected_at_kill,
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


