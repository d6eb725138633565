"""A process's own push events reach its event streams at once, in order, exactly once.

The push receiver and ``/api/v1/events`` (through StubTreq) over the real
GlobalPubSub on the real RabbitMQ at 127.0.0.1:5672: with the broker away
(its connections closed), a Dovecot delivery still reaches the stream at
once; the events of one Dovecot session arrive in the order Dovecot sent
them, on the instance that received them and on another one (whose stream
has one queue bound to every topic); and the copy of an own event that
comes back from the broker is not streamed a second time (a sentinel from
another instance, published after it on the same topic, proves that the
broker has handed everything before it over).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from mailhub.config import Config, PushSection
from mailhub.directory.model import User
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.pubsub.connection import Broker
from mailhub.pubsub.globalpubsub import GlobalPubSub
from mailhub.pubsub.local import LocalPubSub
from mailhub.web.events import STREAM_TOPICS, EventStream
from mailhub.web.push import PushReceiver

from tests.pubsub.test_rabbitmq import SPEC, inline, wait_for
from tests.push.fakes import FakeUserSource
from tests.push.test_events import Collector
from tests.support.rabbitmq import URL, close_connections, require_rabbitmq, unique

OX_URL = "http://mailhub.test/preliminary/http-notify/v1/notify"
LUA_URL = "http://mailhub.test/push/v1/notify"
EVENTS_URL = "http://mailhub.test/api/v1/events"
DOVECOT = ("dovecot", "s3cret")


class OwnEventsTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        require_rabbitmq()
        # A login of its own: other tests on the same broker publish on the
        # same topics, and the stream only carries this user's events.
        self.login = "alice-" + uuid.uuid4().hex[:12]
        self.users = FakeUserSource()
        self.users.add(User(login=self.login, name="Alice", emails=(), id=self.login),
                       "wonderland")
        self.brokers: list[Broker] = []

    async def instance(self, reconnect: float = 0.1) -> tuple[Broker, GlobalPubSub,
                                                              StubTreq, StubTreq]:
        """One mailhub process's pubsub, push receiver and event stream."""
        broker = Broker(reactor, URL, SPEC, heartbeat=5, metrics=Metrics(),
                        retry_policy=lambda n: reconnect, connection_name=unique("conn"))
        broker.startService()
        self.addCleanup(broker.stopService)
        self.brokers.append(broker)
        pubsub = GlobalPubSub(broker)
        hub = Hub(LocalPubSub(), pubsub)
        config = Config(push=PushSection(username=DOVECOT[0], password=DOVECOT[1]))
        metrics = Metrics()
        stream = EventStream(config, hub, metrics, self.users, reactor)
        self.addCleanup(stream.close)
        receiver = PushReceiver(config, hub, metrics, reactor)
        self.addCleanup(receiver.stop)
        await wait_for(lambda: bool(pubsub._subscriptions) and all(
            s.active for s in pubsub._subscriptions), what="the stream's subscriptions")
        return broker, pubsub, StubTreq(receiver.resource()), StubTreq(stream.resource())

    def open(self, events: StubTreq) -> Collector:
        d = events.get(EVENTS_URL, auth=(self.login, "wonderland"))
        events.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        body = Collector()
        response.deliverBody(body)
        events.flush()
        return body

    async def post(self, push: StubTreq, url: str, body: Any) -> None:
        d = push.request("POST" if url == LUA_URL else "PUT", url,
                         data=json.dumps(body).encode("utf-8"), auth=DOVECOT,
                         headers={"Content-Type": "application/json"})
        push.flush()
        response = await d
        self.assertEqual(response.code, 200)
        await deferLater(reactor, 0, lambda: None)  # the receiver publishes on the next turn

    @inline
    async def test_with_the_broker_away_a_delivery_still_reaches_the_stream_at_once(
            self) -> None:
        broker, _, push, events = await self.instance(reconnect=3.0)
        stream = self.open(events)
        self.assertEqual(await close_connections(broker.connection_name), 1)
        await wait_for(lambda: not broker.connected, what="the broker to be away")
        await self.post(push, OX_URL, {"user": self.login, "event": "messageNew",
                                       "folder": "INBOX", "imap-uidvalidity": 1,
                                       "imap-uid": 7})
        events.flush()
        self.assertFalse(broker.connected, "the broker came back too soon to prove anything")
        [frame] = stream.frames()
        self.assertEqual(frame["event"], "mail:new")
        self.assertEqual(json.loads(frame["data"])["uid"], 7)
        # Then the broker comes back and takes the publication (confirmed, so
        # nothing fails at the end of the test).
        await wait_for(lambda: broker.connected and len(broker.outbox) == 0, timeout=15,
                       what="the reconnection")

    @inline
    async def test_a_sessions_expunge_create_and_delete_reach_the_stream_in_order(
            self) -> None:
        _, _, push, events = await self.instance()
        stream = self.open(events)
        for name, extra in (("MessageExpunge", {"mailbox": "INBOX", "uid": 4,
                                                "uid_validity": 9}),
                            ("MailboxCreate", {"mailbox": "Projects"}),
                            ("MailboxDelete", {"mailbox": "Old"})):
            # One request per transaction, as the Lua script sends them.
            await self.post(push, LUA_URL, {"user": self.login,
                                            "events": [dict(extra, name=name)]})
        events.flush()
        self.assertEqual([f["event"] for f in stream.frames()],
                         ["mail:expunge", "mailbox:create", "mailbox:delete"])

    @inline
    async def test_own_events_are_streamed_exactly_once_with_a_broker(self) -> None:
        _, _, push, events = await self.instance()
        _, other, _, _ = await self.instance()
        stream = self.open(events)
        await self.post(push, OX_URL, {"user": self.login, "event": "messageNew",
                                       "folder": "INBOX", "imap-uidvalidity": 1,
                                       "imap-uid": 1})
        def frames() -> list[dict[str, str]]:
            events.flush()
            return stream.frames()

        await wait_for(lambda: len(frames()) == 1, what="the own event")
        # Wait until the broker has confirmed the own event, so that its copy
        # is in this instance's queue before the sentinel.
        await wait_for(lambda: all(len(b.outbox) == 0 for b in self.brokers),
                       what="the confirmation")
        await other.topic("mail:new").publish({"user": self.login, "uid": "sentinel"})
        await wait_for(lambda: any("sentinel" in f["data"] for f in frames()),
                       what="the sentinel from the other instance")
        self.assertEqual([json.loads(f["data"])["uid"] for f in frames()], [1, "sentinel"])

    @inline
    async def test_another_instances_events_reach_the_stream_in_publication_order(
            self) -> None:
        # Instance A receives Dovecot's notifications; the user's stream is on B.
        _, _, push_a, _ = await self.instance()
        _, b, _, events_b = await self.instance()
        # B's stream has one queue, bound to every topic it carries.
        [subscription] = b._subscriptions
        self.assertEqual(subscription.bound, set(STREAM_TOPICS))
        stream = self.open(events_b)
        sent: list[str] = []
        for round in range(3):
            for name, extra in (("MessageExpunge", {"mailbox": "INBOX", "uid": round,
                                                    "uid_validity": 9}),
                                ("MailboxCreate", {"mailbox": "Projects%d" % round}),
                                ("MailboxDelete", {"mailbox": "Old%d" % round})):
                await self.post(push_a, LUA_URL, {"user": self.login,
                                                  "events": [dict(extra, name=name)]})
                sent.append(name)

        def frames() -> list[dict[str, str]]:
            events_b.flush()
            return stream.frames()

        await wait_for(lambda: len(frames()) == len(sent), what="A's events on B's stream")
        self.assertEqual([f["event"] for f in frames()],
                         ["mail:expunge", "mailbox:create", "mailbox:delete"] * 3)
        self.assertEqual([json.loads(f["data"]).get("mailbox") for f in frames()][1::3],
                         ["Projects0", "Projects1", "Projects2"])
