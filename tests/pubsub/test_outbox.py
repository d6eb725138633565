"""The outbox: bounded, ordered, confirmed publications that survive reconnections."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailhub.errors import Unavailable
from mailhub.metrics import Metrics
from mailhub.pubsub.outbox import IPublishChannel, Outbox, Route

from tests.pubsub.fakes import FakeChannel

TOPIC = Route("mail:new")
PROPS = {"delivery-mode": 2}


class OutboxTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = Metrics()
        self.outbox = Outbox(3, self.metrics)
        self.channel = FakeChannel()

    def test_fake_channel_is_a_publish_channel(self) -> None:
        verifyObject(IPublishChannel, self.channel)

    def test_publication_fires_only_when_the_broker_confirms(self) -> None:
        self.outbox.attach(self.channel)
        d = self.outbox.put(TOPIC, b"1", PROPS)
        self.assertEqual(self.channel.published, [(TOPIC, b"1", PROPS)])
        self.assertNoResult(d)
        self.outbox.ack(1, False)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(self.outbox), 0)
        self.assertEqual(self.metrics.value("mailhub_pubsub_confirmed_total"), 1)

    def test_publications_wait_while_disconnected_and_go_in_order_on_attach(self) -> None:
        ds = [self.outbox.put(TOPIC, b"%d" % i, PROPS) for i in range(3)]
        self.assertEqual(self.metrics.value("mailhub_pubsub_outbox"), 3)
        self.outbox.attach(self.channel)
        self.assertEqual(self.channel.bodies, [b"0", b"1", b"2"])
        self.outbox.ack(3, True)
        for d in ds:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.metrics.value("mailhub_pubsub_outbox"), 0)

    def test_full_outbox_fails_loudly_and_counts(self) -> None:
        for i in range(3):
            self.outbox.put(TOPIC, b"x", PROPS)
        failure = self.failureResultOf(self.outbox.put(TOPIC, b"y", PROPS), Unavailable)
        self.assertIn("full", str(failure.value))
        self.assertEqual(self.metrics.value("mailhub_pubsub_outbox_full_total"), 1)
        self.assertEqual(len(self.outbox), 3)

    def test_unconfirmed_publications_are_sent_again_after_reconnection(self) -> None:
        self.outbox.attach(self.channel)
        first = self.outbox.put(TOPIC, b"a", PROPS)
        second = self.outbox.put(TOPIC, b"b", PROPS)
        self.outbox.ack(1, False)
        self.outbox.detach()
        third = self.outbox.put(TOPIC, b"c", PROPS)
        again = FakeChannel()
        self.outbox.attach(again)
        # b was never confirmed: it goes again, before c, with tags from 1.
        self.assertEqual(again.bodies, [b"b", b"c"])
        self.assertIsNone(self.successResultOf(first))
        self.assertNoResult(second)
        self.outbox.ack(1, False)
        self.assertIsNone(self.successResultOf(second))
        self.assertNoResult(third)
        self.outbox.ack(2, False)
        self.assertIsNone(self.successResultOf(third))

    def test_unconfirmed_publications_count_against_the_bound(self) -> None:
        self.outbox.attach(self.channel)
        for i in range(3):
            self.outbox.put(TOPIC, b"x", PROPS)
        self.failureResultOf(self.outbox.put(TOPIC, b"y", PROPS), Unavailable)
        self.outbox.ack(1, False)
        self.assertNoResult(self.outbox.put(TOPIC, b"z", PROPS))

    def test_multiple_ack_confirms_every_earlier_tag_only(self) -> None:
        self.outbox.attach(self.channel)
        ds = [self.outbox.put(TOPIC, b"%d" % i, PROPS) for i in range(3)]
        self.outbox.ack(2, True)
        self.successResultOf(ds[0])
        self.successResultOf(ds[1])
        self.assertNoResult(ds[2])

    def test_nack_fails_the_publication_and_counts(self) -> None:
        self.outbox.attach(self.channel)
        d = self.outbox.put(TOPIC, b"a", PROPS)
        self.outbox.nack(1, False)
        self.failureResultOf(d, Unavailable)
        self.assertEqual(self.metrics.value("mailhub_pubsub_refused_total"), 1)

    def test_exchange_declared_once_per_connection(self) -> None:
        self.outbox.attach(self.channel)
        self.outbox.put(TOPIC, b"a", PROPS)
        self.outbox.put(TOPIC, b"b", PROPS)
        self.assertEqual(self.channel.declared, [TOPIC])
        self.outbox.detach()
        again = FakeChannel()
        self.outbox.attach(again)
        self.outbox.put(TOPIC, b"c", PROPS)
        self.assertEqual(again.declared, [TOPIC])

    def test_refused_declaration_fails_that_publication_only(self) -> None:
        self.channel.refuse.add("bad")
        self.outbox.attach(self.channel)
        bad = self.outbox.put(Route("bad"), b"a", PROPS)
        good = self.outbox.put(TOPIC, b"b", PROPS)
        failure = self.failureResultOf(bad, Unavailable)
        self.assertIn("PRECONDITION_FAILED", str(failure.value))
        self.assertEqual(self.channel.bodies, [b"b"])
        self.outbox.ack(1, False)
        self.successResultOf(good)

    def test_connection_lost_during_declaration_keeps_the_publication(self) -> None:
        self.channel.hold = True
        self.outbox.attach(self.channel)
        d = self.outbox.put(TOPIC, b"a", PROPS)
        self.outbox.detach()
        self.channel.held[0].errback(Exception("connection lost"))
        again = FakeChannel()
        self.outbox.attach(again)
        self.assertEqual(again.bodies, [b"a"])
        self.outbox.ack(1, False)
        self.successResultOf(d)

    def test_reattach_while_a_declaration_waits_sends_on_the_new_channel(self) -> None:
        self.channel.hold = True
        self.outbox.attach(self.channel)
        d = self.outbox.put(TOPIC, b"a", PROPS)
        self.outbox.detach()
        again = FakeChannel()
        self.outbox.attach(again)
        self.assertEqual(again.bodies, [])
        self.channel.held[0].errback(Exception("connection lost"))
        self.assertEqual(again.bodies, [b"a"])
        self.outbox.ack(1, False)
        self.successResultOf(d)

    def test_shutdown_fails_every_waiting_publication(self) -> None:
        self.outbox.attach(self.channel)
        sent = self.outbox.put(TOPIC, b"a", PROPS)
        self.outbox.detach()
        queued = self.outbox.put(TOPIC, b"b", PROPS)
        self.outbox.fail_all("shutting down")
        self.failureResultOf(sent, Unavailable)
        self.failureResultOf(queued, Unavailable)
        self.assertEqual(len(self.outbox), 0)


class RoomTests(SynchronousTestCase):
    """``when_room``: a publisher waits for room instead of reading Deferred internals."""

    def setUp(self) -> None:
        self.outbox = Outbox(2, Metrics())
        self.channel = FakeChannel()

    def test_room_is_at_once_while_there_is_some(self) -> None:
        self.assertTrue(self.outbox.has_room())
        self.successResultOf(self.outbox.when_room())

    def test_a_full_outbox_makes_room_when_the_broker_confirms(self) -> None:
        puts = [self.outbox.put(TOPIC, b"%d" % i, PROPS) for i in range(2)]
        self.assertFalse(self.outbox.has_room())
        room = self.outbox.when_room()
        self.assertNoResult(room)
        self.outbox.attach(self.channel)
        self.assertNoResult(room)  # sent, not yet confirmed: still held
        self.outbox.ack(1, False)
        self.successResultOf(room)
        self.successResultOf(puts[0])

    def test_a_refusal_or_a_shutdown_makes_room_too(self) -> None:
        puts = [self.outbox.put(TOPIC, b"%d" % i, PROPS) for i in range(2)]
        self.outbox.attach(self.channel)
        room = self.outbox.when_room()
        self.outbox.nack(1, False)
        self.successResultOf(room)
        self.failureResultOf(puts[0], Unavailable)
        self.outbox.put(TOPIC, b"2", PROPS).addErrback(lambda _: None)
        again = self.outbox.when_room()
        self.outbox.fail_all("stopping")
        self.successResultOf(again)
        self.failureResultOf(puts[1], Unavailable)

    def test_a_cancelled_wait_is_forgotten(self) -> None:
        for i in range(2):
            self.outbox.put(TOPIC, b"%d" % i, PROPS)
        room = self.outbox.when_room()
        room.cancel()
        self.failureResultOf(room)
        self.outbox.attach(self.channel)
        self.outbox.ack(2, True)  # nothing left to wake, nothing fails
        self.assertTrue(self.outbox.has_room())
