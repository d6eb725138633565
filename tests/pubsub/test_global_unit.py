"""The global pubsub's ESN format and subscriber isolation, without a broker."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
# A broker's HostnameEndpoint needs a reactor with a name resolver: a bare Clock
# is a deprecated use of it, which the suite's warning policy makes an error.
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from mailhub.config import DEFAULT_SPEC, AMQPSection, Config, MailhubSection
from mailhub.errors import ConfigError, Unavailable
from mailhub.metrics import Metrics
from mailhub.pubsub.connection import Broker, BrokerAddress, load_spec
from mailhub.pubsub.globalpubsub import GlobalPubSub, _Subscription
from mailhub.pubsub.local import LocalPubSub
from mailhub.pubsub.outbox import Route
from mailhub.pubsub.shared import LocalSharedSubscription
from mailhub.pubsub.spool import SpoolQueue
from mailhub.pubsub.wiring import make_hub, make_pubsub

from tests.pubsub.fakes import FakeBroker, FakeChannel, FakeDelivery, require_spec


class GlobalPubSubTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.broker = FakeBroker()
        self.channel = FakeChannel()
        self.broker.outbox.attach(self.channel)
        self.pubsub = GlobalPubSub(self.broker)  # type: ignore[arg-type]

    def test_publish_uses_esn_wire_format(self) -> None:
        d = self.pubsub.topic("contacts:contact:add").publish({"contactId": "c1"})
        [(route, body, properties)] = self.channel.published
        # One fanout exchange per topic, named as the topic, routing key ''.
        self.assertEqual(route, Route("contacts:contact:add", ""))
        self.assertEqual(json.loads(body.decode("utf-8")), {"contactId": "c1"})
        self.assertEqual(properties["delivery-mode"], 2)
        self.assertEqual(properties["content-type"], "application/json")
        self.assertNoResult(d)
        self.broker.outbox.ack(1, False)
        self.successResultOf(d)

    def test_unencodable_data_fails_at_once(self) -> None:
        self.failureResultOf(self.pubsub.topic("t").publish({"x": object()}), TypeError)
        self.assertEqual(self.channel.published, [])

    def test_a_failing_subscriber_is_logged_acked_and_others_still_run(self) -> None:
        seen = []

        def broken(data: object) -> None:
            raise RuntimeError("subscriber bug")

        first = _Subscription.to_topic("t", broken)
        second = _Subscription.to_topic("t", seen.append)
        one, two = FakeDelivery(b'{"a":1}'), FakeDelivery(b'{"a":1}')
        self.successResultOf(self.pubsub._deliver(first, one))
        self.successResultOf(self.pubsub._deliver(second, two))
        self.assertEqual(seen, [{"a": 1}])
        self.assertEqual((one.acks, two.acks), (1, 1))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(
            self.broker.metrics.value("mailhub_pubsub_subscriber_failures_total"), 1)

    def test_ack_waits_for_an_asynchronous_subscriber(self) -> None:
        pending: Deferred[None] = Deferred()
        delivery = FakeDelivery(b"[1]")
        d = self.pubsub._deliver(_Subscription.to_topic("t", lambda data: pending), delivery)
        self.assertEqual(delivery.acks, 0)
        pending.callback(None)
        self.successResultOf(d)
        self.assertEqual(delivery.acks, 1)

    def test_message_that_is_not_json_is_dropped_and_counted(self) -> None:
        seen = []
        delivery = FakeDelivery(b"\xff not json")
        self.successResultOf(self.pubsub._deliver(_Subscription.to_topic("t", seen.append), delivery))
        self.assertEqual(seen, [])
        self.assertEqual(delivery.acks, 1)
        self.assertEqual(self.broker.metrics.value("mailhub_pubsub_bad_messages_total"), 1)

    def test_json_nested_too_deep_to_decode_is_dropped_counted_and_acked(self) -> None:
        # json.loads raises RecursionError here, not ValueError.
        seen = []
        delivery = FakeDelivery(b"[" * 200000)
        self.successResultOf(self.pubsub._deliver(_Subscription.to_topic("t", seen.append), delivery))
        self.assertEqual(seen, [])
        self.assertEqual(delivery.acks, 1)
        self.assertEqual(self.broker.metrics.value("mailhub_pubsub_bad_messages_total"), 1)

    def test_utf16_nan_infinity_too_deep_and_too_large_are_dropped_counted_and_acked(
            self) -> None:
        from tests.test_decoding import REFUSED

        seen = []
        bodies = ('{"a": 1}'.encode("utf-16"), '{"a": 1}'.encode("utf-16-le"),
                  b'{"a": NaN}', b'{"a": Infinity}', b'[-Infinity]', *REFUSED)
        for body in bodies:
            delivery = FakeDelivery(body)
            self.successResultOf(self.pubsub._deliver(_Subscription.to_topic("t", seen.append),
                                                      delivery))
            self.assertEqual(delivery.acks, 1)
        self.assertEqual(seen, [])
        self.assertEqual(self.broker.metrics.value("mailhub_pubsub_bad_messages_total"),
                         len(bodies))

    def test_subscribe_waits_for_a_connection(self) -> None:
        d = self.pubsub.topic("t").subscribe(lambda data: None)
        self.assertNoResult(d)

    def test_unsubscribe_before_connection_releases_the_waiter(self) -> None:
        callback = lambda data: None  # noqa: E731
        d = self.pubsub.topic("t").subscribe(callback)
        self.pubsub.topic("t").unsubscribe(callback)
        self.successResultOf(d)
        self.assertEqual(self.pubsub._subscriptions, [])

    def test_forward_publishes_here_and_on_the_other_pubsub(self) -> None:
        local = LocalPubSub()
        seen = []
        local.topic("t").subscribe(seen.append)
        d = self.pubsub.topic("t").forward(local, {"n": 1})
        self.assertEqual(seen, [{"n": 1}])
        self.assertEqual(len(self.channel.published), 1)
        self.broker.outbox.ack(1, False)
        self.successResultOf(d)


class ConfigurationTests(SynchronousTestCase):
    def test_missing_spec_names_the_package_and_the_key(self) -> None:
        error = self.assertRaises(ConfigError, load_spec, "/nonexistent/amqp.xml")
        self.assertIn("amqp-specs", str(error))
        self.assertIn("[amqp] spec", str(error))
        self.assertEqual(len(str(error).splitlines()), 1)

    def test_debian_default_spec_gets_rabbitmq_confirms(self) -> None:
        require_spec()
        spec = load_spec(DEFAULT_SPEC)
        self.assertIn("confirm", spec.classes.byname)

    def test_spec_without_confirms_and_no_rabbitmq_file_is_refused(self) -> None:
        require_spec()
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        os.makedirs(os.path.join(folder, "0-9-1"))
        copy = os.path.join(folder, "0-9-1", "spec.xml")
        shutil.copy(DEFAULT_SPEC, copy)
        error = self.assertRaises(ConfigError, load_spec, copy)
        self.assertIn("confirm", str(error))

    def test_url_parsing(self) -> None:
        address = BrokerAddress.from_url("amqps://u%40x:p%3Aw@rabbit.example:5000/%2Fprod")
        self.assertEqual((address.host, address.port, address.username, address.password,
                          address.vhost, address.tls),
                         ("rabbit.example", 5000, "u@x", "p:w", "/prod", True))
        default = BrokerAddress.from_url("amqp://127.0.0.1")
        self.assertEqual((default.port, default.vhost, default.username), (5672, "/", "guest"))
        self.assertNotIn("p:w", repr(address))

    def test_without_broker_global_topics_are_local_and_work_queues_are_spools(self) -> None:
        data = tempfile.mkdtemp(prefix="mailhub-data-")
        self.addCleanup(shutil.rmtree, data, True)
        config = Config(mailhub=MailhubSection(data=data))
        made = make_pubsub(config, Clock(), Metrics())
        self.assertIs(made.hub.global_, made.hub.local)
        self.assertEqual(made.services, [])
        queue = made.work_queue("collector:email", spool="collector-spool")
        self.assertIsInstance(queue, SpoolQueue)
        self.assertIs(made.work_queue("collector:email"), queue)
        assert isinstance(queue, SpoolQueue)
        self.assertEqual(queue.spool.folder, Path(data) / "collector-spool")
        self.assertTrue((Path(data) / "collector-spool" / "dead").is_dir())
        self.assertEqual(made.health(), {"ok": True, "state": "disabled"})

    def test_missing_spec_stops_start_up(self) -> None:
        config = Config(amqp=AMQPSection(url="amqp://127.0.0.1", spec="/nonexistent.xml"))
        self.assertRaises(ConfigError, make_hub, config, Clock(), Metrics())

    def test_with_broker_one_named_service_and_shared_work_queues(self) -> None:
        require_spec()
        config = Config(amqp=AMQPSection(url="amqp://127.0.0.1", outbox=5, prefetch=3))
        made = make_pubsub(config, MemoryReactorClock(), Metrics())
        self.assertIsInstance(made.hub.global_, GlobalPubSub)
        [service] = made.services
        self.assertEqual(service.name, "amqp")
        queue = made.work_queue("collector:email")
        self.assertIs(made.work_queue("collector:email"), queue)
        self.assertEqual((queue.prefetch, queue.dead_letter), (3, "collector:email:dead"))
        self.assertEqual(made.broker.outbox.limit, 5)
        self.assertEqual(made.health(), {"ok": False, "state": "disconnected", "outbox": 0})

    def test_health_names_each_refused_declaration_with_the_brokers_reason(self) -> None:
        require_spec()
        made = make_pubsub(Config(amqp=AMQPSection(url="amqp://127.0.0.1")), MemoryReactorClock(), Metrics())
        assert made.broker is not None
        reason = "406 PRECONDITION_FAILED - inequivalent arg 'type'"
        made.broker.refusals.refused("exchange 'calendar:event:created'", reason)
        health = made.health()
        self.assertFalse(health["ok"])
        self.assertEqual(health["refused"], {"exchange 'calendar:event:created'": reason})
        self.assertEqual(health["state"], "disconnected; the broker refused exchange "
                         "'calendar:event:created': " + reason)
        made.broker.refusals.accepted("exchange 'calendar:event:created'")
        self.assertEqual(made.health(), {"ok": False, "state": "disconnected", "outbox": 0})

    def test_shared_subscription_is_one_named_queue_bound_to_the_topic(self) -> None:
        local = make_pubsub(Config(), Clock(), Metrics())
        without = local.shared_subscription("t")
        # Without a broker: the (local) global topic itself, with the retries.
        self.assertIsInstance(without, LocalSharedSubscription)
        self.assertIs(local.shared_subscription("t"), without)
        self.assertEqual((without.name, without.exchange), ("mailhub:t", "t"))
        require_spec()
        config = Config(amqp=AMQPSection(url="amqp://127.0.0.1", prefetch=3))
        made = make_pubsub(config, MemoryReactorClock(), Metrics())
        queue = made.shared_subscription("calendar:event:created", retry_initial=2)
        assert queue is not None
        self.assertIs(made.shared_subscription("calendar:event:created"), queue)
        # Durable queue mailhub:<topic>, bound with '' to the topic's own
        # fanout exchange (the one ESN publishes to).
        self.assertEqual(queue.route, Route("calendar:event:created", "",
                                            queue="mailhub:calendar:event:created"))
        self.assertEqual((queue.dead_letter, queue.prefetch, queue.retry_initial),
                         ("mailhub:calendar:event:created:dead", 3, 2))
        self.assertIn(queue, made.broker._users)
        self.assertRaises(ValueError, made.shared_subscription, "other",
                          queue="mailhub:calendar:event:created")

    def test_connections_ask_for_heartbeats_and_carry_a_name(self) -> None:
        require_spec()
        clock = MemoryReactorClock()
        broker = Broker(clock, "amqp://127.0.0.1", DEFAULT_SPEC, heartbeat=7,
                        connection_name="node-1")
        client = broker._factory.buildProtocol(None)
        self.assertEqual(client.heartbeatInterval, 7)
        self.assertIs(client.clock, clock)
        self.assertEqual(client.delegate.connection_name, "node-1")


class OwnPublicationTests(SynchronousTestCase):
    """A process's own publications reach its own subscribers at once, once."""

    def setUp(self) -> None:
        self.broker = FakeBroker(limit=3)
        self.pubsub = GlobalPubSub(self.broker)  # type: ignore[arg-type]
        self.seen: list[tuple[str, object]] = []
        for topic in ("mail:expunge", "mailbox:create", "mailbox:delete"):
            self.pubsub.topic(topic).subscribe(
                lambda data, topic=topic: self.seen.append((topic, data)))

    def test_at_once_and_in_publication_order_with_the_broker_away(self) -> None:
        for topic in ("mail:expunge", "mailbox:create", "mailbox:delete"):
            self.pubsub.topic(topic).publish({"user": "alice"})
        self.assertEqual([topic for topic, _ in self.seen],
                         ["mail:expunge", "mailbox:create", "mailbox:delete"])
        self.assertEqual(len(self.broker.outbox), 3)  # and on their way to the broker

    def test_the_copy_coming_back_from_the_broker_is_acked_not_delivered_again(self) -> None:
        channel = FakeChannel()
        self.broker.outbox.attach(channel)
        self.pubsub.topic("mail:expunge").publish({"n": 1})
        [(route, body, properties)] = channel.published
        self.assertEqual(properties["headers"], {"x-mailhub-instance": self.pubsub.instance})
        own = FakeDelivery(body, properties)
        subscription = _Subscription.to_topic("mail:expunge", self.seen.append)
        self.successResultOf(self.pubsub._deliver(subscription, own))
        self.assertEqual((own.acks, len(self.seen)), (1, 1))
        # Another mailhub's publication, and an ESN node's (no header), are delivered.
        other = FakeDelivery(body, {"headers": {"x-mailhub-instance": "another"}})
        esn = FakeDelivery(b'{"n": 2}')
        self.successResultOf(self.pubsub._deliver(subscription, other))
        self.successResultOf(self.pubsub._deliver(subscription, esn))
        self.assertEqual(self.seen[1:], [{"n": 1}, {"n": 2}])
        self.assertEqual((other.acks, esn.acks), (1, 1))

    def test_a_full_outbox_refuses_and_nobody_sees_the_publication(self) -> None:
        for n in range(3):
            self.pubsub.topic("mail:expunge").publish({"n": n})
        self.failureResultOf(self.pubsub.topic("mail:expunge").publish({"n": 3}), Unavailable)
        self.assertEqual([data for _, data in self.seen], [{"n": 0}, {"n": 1}, {"n": 2}])
        self.assertFalse(self.pubsub.has_room())
        room = self.pubsub.when_room()
        self.assertNoResult(room)
        self.broker.outbox.attach(FakeChannel())
        self.broker.outbox.ack(1, False)
        self.successResultOf(room)

    def test_unsubscribed_callbacks_see_no_more_own_publications(self) -> None:
        gone: list[object] = []
        self.pubsub.topic("t").subscribe(gone.append)
        self.pubsub.topic("t").unsubscribe(gone.append)
        self.pubsub.topic("t").publish({"n": 1})
        self.assertEqual(gone, [])
