"""The relay: events a web surface accepted, published after its answer, in order."""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.pubsub.globalpubsub import GlobalPubSub
from mailhub.pubsub.local import LocalPubSub
from mailhub.pubsub.relay import Relay

from tests.pubsub.fakes import FakeBroker, FakeChannel


@attrs.frozen
class Event:
    topic: str
    data: Any


class RelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.broker = FakeBroker(limit=1)
        self.global_ = GlobalPubSub(self.broker)  # type: ignore[arg-type]
        self.hub = Hub(LocalPubSub(), self.global_)
        self.clock, self.metrics = Clock(), Metrics()
        self.relay = Relay(self.hub, self.clock, 10, self.metrics, "push")
        self.streamed: list[int] = []
        self.global_.topic("mail:new").subscribe(lambda data: self.streamed.append(data["n"]))

    def test_waiting_events_go_on_as_soon_as_the_outbox_has_room_without_polling(
            self) -> None:
        for n in range(3):
            self.relay.hand_over([Event("mail:new", {"n": n})])
        self.clock.advance(0)
        # One in the outbox; the others wait here, and nothing polls.
        self.assertEqual((len(self.broker.outbox), self.relay.pending()), (1, 2))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.streamed, [0])
        channel = FakeChannel()
        self.broker.outbox.attach(channel)
        self.broker.outbox.ack(1, False)
        self.assertEqual(self.streamed, [0, 1])  # at once, by the confirmation
        self.broker.outbox.ack(2, False)
        self.broker.outbox.ack(3, False)
        self.assertEqual([json.loads(body)["n"] for body in channel.bodies], [0, 1, 2])
        self.assertEqual(self.streamed, [0, 1, 2])
        self.assertEqual(self.relay.pending(), 0)
        self.assertEqual(self.metrics.value("mailhub_push_events_total",
                                            {"topic": "mail:new"}), 3)

    def test_a_full_relay_says_so_before_anything_is_handed_over(self) -> None:
        relay = Relay(self.hub, self.clock, 2, Metrics(), "push")
        for n in range(2):
            self.assertTrue(relay.has_room())
            relay.hand_over([Event("mail:new", {"n": n})])
        self.assertFalse(relay.has_room())
        self.clock.advance(0)  # one goes to the outbox, one waits for room
        self.assertTrue(relay.has_room())
