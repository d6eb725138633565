"""``[amqp] url`` with several nodes, and the queue types, without a broker.

The real three-node cluster is in ``tests/cluster/``; here fakes stand for
the nodes' endpoints.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectError, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailhub.config import ConfigError, parse
from mailhub.logs import startup_summary
from mailhub.pubsub.connection import (FailoverEndpoint, Refusals, _explain_queue_type,
                                       parse_urls)
from mailhub.pubsub.globalpubsub import GlobalPubSub, _Subscription
from mailhub.pubsub.outbox import Outbox, Refused
from mailhub.pubsub.workqueue import WorkQueue

from tests.pubsub.fakes import FakeBroker


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """A node: refuses connections while ``down``, else hands out a protocol."""

    def __init__(self, name: str, down: bool = False) -> None:
        self.name = name
        self.down = down
        self.attempts = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        self.attempts += 1
        if self.down:
            return fail(ConnectionRefusedError("%s is down" % self.name))
        return succeed(factory.buildProtocol(None))


class Factory:
    """Records the virtual host each protocol was built for."""

    def __init__(self, endpoint: list[FailoverEndpoint]) -> None:
        self.endpoint = endpoint
        self.vhosts: list[str] = []

    def buildProtocol(self, addr: Any) -> str:
        vhost = self.endpoint[0].trying.vhost
        self.vhosts.append(vhost)
        return "protocol on " + vhost


URLS = "amqp://u:p@a:5672/one, amqp://u:p@b:5673/two amqp://u:p@c:5674/three"


class ParseTests(SynchronousTestCase):
    def test_commas_and_spaces_separate_the_nodes_of_a_cluster(self) -> None:
        nodes = parse_urls(URLS)
        self.assertEqual([(n.host, n.port, n.vhost) for n in nodes],
                         [("a", 5672, "one"), ("b", 5673, "two"), ("c", 5674, "three")])
        self.assertEqual([n.where for n in parse_urls(" amqp://x/ ")], ["x:5672"])

    def test_nothing_or_a_foreign_scheme_is_refused(self) -> None:
        self.assertRaises(ConfigError, parse_urls, " , ")
        self.assertRaises(ConfigError, parse_urls, "amqp://a/,http://b/")

    def test_config_accepts_several_nodes_and_names_the_bad_one_without_its_password(
            self) -> None:
        config = parse("[amqp]\nurl = %s\n" % URLS)
        self.assertEqual(config.amqp.url, URLS)
        error = self.assertRaises(ConfigError, parse,
                                  "[amqp]\nurl = amqp://a/, ftp://u:secret@b/\n")
        self.assertIn("ftp://u:***@b/", str(error))
        self.assertNotIn("secret", str(error))

    def test_the_start_up_line_hides_every_nodes_password(self) -> None:
        config = parse("[amqp]\nurl = amqp://u:s1@a/,amqp://u:s2@b/\n")
        broker = startup_summary(config, "tcp:8080")["broker"]
        self.assertEqual(broker, "amqp://u:***@a/ amqp://u:***@b/")


class FailoverEndpointTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.nodes = [FakeEndpoint("a"), FakeEndpoint("b"), FakeEndpoint("c")]
        self.endpoint = FailoverEndpoint(parse_urls(URLS), list(self.nodes))
        self.factory = Factory([self.endpoint])

    def connect(self) -> Any:
        return self.successResultOf(self.endpoint.connect(self.factory))

    def test_the_first_node_that_answers_is_used_and_stays_current(self) -> None:
        self.nodes[0].down = True
        self.assertEqual(self.connect(), "protocol on two")
        self.assertEqual(self.endpoint.address.host, "b")
        self.nodes[0].down = False
        self.assertEqual(self.connect(), "protocol on two")  # b again, not back to a
        self.assertEqual([n.attempts for n in self.nodes], [1, 2, 0])

    def test_advance_starts_the_next_attempt_with_the_next_node_wrapping_round(
            self) -> None:
        self.connect()
        self.endpoint.advance()
        self.assertEqual(self.connect(), "protocol on two")
        self.endpoint.advance()
        self.nodes[2].down = True
        self.assertEqual(self.connect(), "protocol on one")  # c down: round to a
        self.assertEqual(self.endpoint.current, 0)

    def test_it_fails_only_when_no_node_answers_naming_each(self) -> None:
        for node in self.nodes:
            node.down = True
        self.endpoint.advance()
        failure = self.failureResultOf(self.endpoint.connect(self.factory), ConnectError)
        message = failure.getErrorMessage()
        self.assertLess(message.index("b:5673: "), message.index("c:5674: "))
        self.assertLess(message.index("c:5674: "), message.index("a:5672: "))
        self.assertIn("a is down", message)
        self.assertEqual(self.endpoint.current, 1)  # where the next attempt starts
        self.assertEqual(self.endpoint.trying.host, "b")


class QueueTypeTests(SynchronousTestCase):
    def queue(self, queue_type: str) -> WorkQueue:
        return WorkQueue(Outbox(10), "collector:email", Clock(), queue_type=queue_type)

    def test_classic_queues_are_declared_with_no_arguments_as_openpaas_does(self) -> None:
        queue = self.queue("classic")
        self.assertEqual(queue.route.queue_arguments, ())
        self.assertEqual(queue.dead_route.queue_arguments, ())

    def test_quorum_makes_the_queue_and_its_dead_letter_queue_quorum_queues(self) -> None:
        queue = self.queue("quorum")
        self.assertEqual(dict(queue.route.queue_arguments), {"x-queue-type": "quorum"})
        # mailhub dead's listings must never reach RabbitMQ 4's default limit (20).
        self.assertEqual(dict(queue.dead_route.queue_arguments),
                         {"x-queue-type": "quorum", "x-delivery-limit": 1_000_000})
        self.assertEqual(queue.dead_route.queue, "collector:email:dead")

    def test_an_unknown_type_is_refused_in_the_configuration(self) -> None:
        self.assertRaises(ValueError, self.queue, "stream")
        error = self.assertRaises(ConfigError, parse, "[collector]\nqueue_type = stream\n")
        self.assertIn("classic or quorum", str(error))
        self.assertEqual(parse("").collector.queue_type, "classic")
        self.assertEqual(parse("[collector]\nqueue_type = quorum\n").collector.queue_type,
                         "quorum")

    def test_a_queue_of_the_other_type_is_explained(self) -> None:
        reason = ("406 PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue "
                  "'collector:email' in vhost '/': received the value 'quorum' of type "
                  "'longstr' but current is none")
        explained = _explain_queue_type("collector:email", {"x-queue-type": "quorum"}, reason)
        self.assertTrue(explained.startswith(reason))
        self.assertIn("[collector] queue_type", explained)
        self.assertIn("rabbitmqctl delete_queue collector:email", explained)
        other = "406 PRECONDITION_FAILED - inequivalent arg 'durable'"
        self.assertEqual(_explain_queue_type("q", {}, other), other)


class FakeSession:
    """Declares queues; the queues in ``down`` are on a cluster node that is down."""

    def __init__(self) -> None:
        self.refusals = Refusals()
        self.down: set[str] = set()
        self.declared: list[tuple[str, dict[str, Any]]] = []

    async def declare_queue(self, name: str, arguments: dict[str, Any]) -> None:
        if name in self.down:
            reason = ("404 NOT_FOUND - home node 'rabbit@n1' of durable queue '%s' in vhost "
                      "'/' is down or inaccessible" % name)
            self.refusals.refused("queue %r" % name, reason)
            raise Refused("queue %r: %s" % (name, reason))
        self.declared.append((name, arguments))


class SubscriptionQueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pubsub = GlobalPubSub(FakeBroker())  # type: ignore[arg-type]
        self.session = FakeSession()
        self.subscription = _Subscription.to_topic("mail:new", lambda data: None)

    def declare(self) -> None:
        self.successResultOf(Deferred.fromCoroutine(
            self.pubsub._declare_queue(self.session, self.subscription)))  # type: ignore[arg-type]

    def test_a_queue_whose_node_is_down_is_replaced_by_a_new_one(self) -> None:
        old = self.subscription.queue
        self.session.down.add(old)
        self.declare()
        [(new, arguments)] = self.session.declared
        self.assertNotEqual(new, old)
        self.assertTrue(new.startswith("mailhub.sub.mail:new."))
        self.assertEqual(self.subscription.queue, new)
        self.assertIn("x-expires", arguments)
        self.assertEqual(self.session.refusals.current, {})  # nothing left refused

    def test_other_refusals_are_left_to_the_usual_retries(self) -> None:
        async def refuse(name: str, arguments: dict[str, Any]) -> None:
            raise Refused("queue %r: 406 PRECONDITION_FAILED - inequivalent arg" % name)

        self.session.declare_queue = refuse  # type: ignore[method-assign]
        old = self.subscription.queue
        self.failureResultOf(Deferred.fromCoroutine(
            self.pubsub._declare_queue(self.session, self.subscription)),  # type: ignore[arg-type]
            Refused)
        self.assertEqual(self.subscription.queue, old)
