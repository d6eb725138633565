"""``/api/v1/events`` through StubTreq over the real Klein resource."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailhub.config import Config, PushSection
from mailhub.directory.interfaces import IUserSource
from mailhub.directory.model import User
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.web.events import MAX_STREAMS_PER_USER, EventStream
from tests.push.fakes import FakeUserSource
from tests.support.auth import auth_failures

URL = "http://mailhub.test/api/v1/events"
ALICE = User(login="alice", name="Alice", emails=("alice@example.org", "a.liddell@example.org"),
             id="aliceid")
BOB = User(login="bob", name="Bob", emails=("bob@example.org",), id="bobid")


class Collector(Protocol):
    """Keeps every chunk of a streamed body, and can hang up."""

    def __init__(self) -> None:
        self.data = b""
        self.ended: Any = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        self.data += data

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.ended = reason

    def frames(self) -> list[dict[str, str]]:
        out = []
        for block in self.data.decode("utf-8").split("\n\n"):
            fields: dict[str, str] = {}
            for line in block.split("\n"):
                name, _, value = line.partition(": ")
                if name in ("id", "event", "data"):
                    fields[name] = value
            if "event" in fields:
                out.append(fields)
        return out


class StreamCase(SynchronousTestCase):
    """An event stream over fakes, driven by a Clock."""

    def setUp(self) -> None:
        self.users = FakeUserSource()
        self.users.add(ALICE, "wonderland")
        self.users.add(BOB, "builder")
        self.hub, self.clock, self.metrics = Hub(), Clock(), Metrics()
        config = Config(push=PushSection(keepalive=15.0, sse_buffer=3))
        self.stream = EventStream(config, self.hub, self.metrics, self.users, self.clock)
        self.stub = StubTreq(self.stream.resource())

    def tearDown(self) -> None:
        self.stream.close()
        self.stub.flush()

    def open(self, auth: Any, headers: dict[str, str] | None = None) -> tuple[Any, Collector]:
        d = self.stub.get(URL, auth=auth, headers=headers)
        self.stub.flush()
        response = self.successResultOf(d)
        body = Collector()
        response.deliverBody(body)
        self.stub.flush()
        return response, body

    def publish(self, topic: str, data: Any) -> None:
        self.hub.global_.topic(topic).publish(data)  # type: ignore[attr-defined]
        self.stub.flush()

    def hang_up(self, body: Collector) -> None:
        body.transport.stopProducing()
        self.stub.flush()



class EventStreamTests(StreamCase):
    def test_fake_user_source_provides_the_interface(self) -> None:
        self.assertTrue(verifyObject(IUserSource, self.users))

    def test_a_user_gets_only_their_own_events(self) -> None:
        response, body = self.open(("alice", "wonderland"))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"),
                         ["text/event-stream; charset=utf-8"])
        self.publish("mail:new", {"user": "alice", "mailbox": "INBOX", "uid": 1})
        self.publish("mail:new", {"user": "bob", "mailbox": "INBOX", "uid": 2})
        self.publish("mail:flags", {"user": "A.Liddell@Example.org", "uid": 3})
        self.publish("contacts:contact:add", {"bookHome": "aliceid", "user": "aliceid",
                                              "vcard": []})
        self.publish("contacts:contact:add", {"bookHome": "bobid", "user": "bobid"})
        frames = body.frames()
        self.assertEqual([f["event"] for f in frames],
                         ["mail:new", "mail:flags", "contacts:contact:add"])
        self.assertEqual(json.loads(frames[0]["data"])["uid"], 1)
        self.assertEqual(json.loads(frames[1]["data"])["uid"], 3)
        ids = [f["id"] for f in frames]
        self.assertEqual(len(set(ids)), 3)

    def test_keepalive_comments_every_interval(self) -> None:
        _, body = self.open(("bob", "builder"))
        self.assertNotIn(b": keepalive", body.data)
        self.clock.advance(15)
        self.stub.flush()
        self.assertEqual(body.data.count(b": keepalive\n\n"), 1)
        self.clock.pump([15, 15])
        self.stub.flush()
        self.assertEqual(body.data.count(b": keepalive\n\n"), 3)

    def test_disconnect_unsubscribes_and_stops_the_keepalive(self) -> None:
        _, body = self.open(("bob", "builder"))
        self.assertEqual(self.stream.clients(), 1)
        self.assertEqual(self.metrics.value("mailhub_sse_clients"), 1)
        self.hang_up(body)
        self.assertEqual(self.stream.clients(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.publish("mail:new", {"user": "bob"})  # nobody left to write to: no error

    def test_a_user_may_hold_sixteen_streams_and_one_more_once_one_closes(self) -> None:
        bodies = [self.open(("bob", "builder"))[1] for _ in range(MAX_STREAMS_PER_USER)]
        refused, _ = self.open(("bob", "builder"))
        self.assertEqual(refused.code, 429)
        # Another user is not counted against bob.
        self.assertEqual(self.open(("alice", "wonderland"))[0].code, 200)
        self.hang_up(bodies[0])
        self.assertEqual(self.open(("bob", "builder"))[0].code, 200)
        self.assertEqual(self.stream.clients(), MAX_STREAMS_PER_USER + 1)

    def test_last_event_id_resumes_from_the_buffer(self) -> None:
        _, first = self.open(("alice", "wonderland"))
        self.publish("mail:new", {"user": "alice", "uid": 1})
        last_id = first.frames()[0]["id"]
        self.hang_up(first)
        self.publish("mail:new", {"user": "alice", "uid": 2})
        self.publish("mail:new", {"user": "bob", "uid": 99})
        self.publish("mail:expunge", {"user": "alice", "uid": 3})
        _, second = self.open(("alice", "wonderland"), {"Last-Event-ID": last_id})
        self.assertEqual([json.loads(f["data"])["uid"] for f in second.frames()], [2, 3])

    def test_an_id_out_of_the_buffer_gets_a_reset(self) -> None:
        _, first = self.open(("alice", "wonderland"))
        self.publish("mail:new", {"user": "alice", "uid": 1})
        last_id = first.frames()[0]["id"]
        self.hang_up(first)
        for uid in range(2, 7):  # the buffer holds 3
            self.publish("mail:new", {"user": "alice", "uid": uid})
        _, second = self.open(("alice", "wonderland"), {"Last-Event-ID": last_id})
        self.assertEqual([f["event"] for f in second.frames()], ["reset"])
        _, third = self.open(("alice", "wonderland"), {"Last-Event-ID": "otherinstance-4"})
        self.assertEqual([f["event"] for f in third.frames()], ["reset"])

    def test_bad_credentials_are_401_and_counted(self) -> None:
        failures = []
        self.hub.global_.topic("login:failure").subscribe(failures.append)  # type: ignore
        for auth in (None, ("alice", "wrong"), ("alice", ""), ("nobody", "x")):
            d = self.stub.get(URL, auth=auth)
            self.stub.flush()
            self.clock.advance(10)  # repeated failures are slowed down
            self.stub.flush()
            response = self.successResultOf(d)
            self.assertEqual(response.code, 401)
            self.assertEqual(response.headers.getRawHeaders("www-authenticate"),
                             ['Basic realm="mailhub events", charset="UTF-8"'])
            self.assertEqual(json.loads(self.successResultOf(response.content())),
                             {"error": "authentication required"})
        self.assertEqual(auth_failures(self.metrics, "events"), 4)
        self.assertEqual([(f["user"], f["source"]) for f in failures],
                         [("alice", "events"), ("nobody", "events")])
        self.assertTrue(all(f["at"].endswith("Z") for f in failures))
        self.assertEqual(self.stream.clients(), 0)

    def test_repeated_failures_for_one_login_are_slowed_down(self) -> None:
        for attempt in range(2):
            d = self.stub.get(URL, auth=("alice", "wrong"))
            self.stub.flush()
            if attempt == 1:
                self.assertNoResult(d)
                self.clock.advance(0.5)
                self.stub.flush()
            self.assertEqual(self.successResultOf(d).code, 401)

    def test_close_ends_every_stream(self) -> None:
        _, body = self.open(("alice", "wonderland"))
        self.stream.close()
        self.stub.flush()
        self.assertIsNotNone(body.ended)
        self.assertEqual(self.stream.clients(), 0)


class BoundedStreamTests(StreamCase):
    """A client that stops reading, or opens stream after stream, is bounded."""

    def test_a_client_that_stops_reading_is_disconnected(self) -> None:
        _, body = self.open(("alice", "wonderland"))
        (client,) = self.stream._clients
        client.pauseProducing()  # what the transport does when its buffer is full
        big = "x" * 10_000
        for uid in range(40):  # about 400 KB, past the 256 KiB allowance
            self.publish("mail:new", {"user": "alice", "uid": uid, "snippet": big})
        self.assertEqual(self.stream.clients(), 0)
        self.assertLess(len(body.data), 300_000)

    def test_a_paused_client_that_resumes_keeps_its_stream(self) -> None:
        _, body = self.open(("alice", "wonderland"))
        (client,) = self.stream._clients
        client.pauseProducing()
        self.publish("mail:new", {"user": "alice", "uid": 1, "snippet": "x" * 200_000})
        client.resumeProducing()
        self.publish("mail:new", {"user": "alice", "uid": 2, "snippet": "x" * 200_000})
        self.assertEqual(self.stream.clients(), 1)
        self.assertEqual([f["event"] for f in body.frames()], ["mail:new", "mail:new"])

    def test_streams_per_user_are_capped(self) -> None:
        for _ in range(16):
            response, _ = self.open(("alice", "wonderland"))
            self.assertEqual(response.code, 200)
        response, _ = self.open(("alice", "wonderland"))
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["30"])
        response, _ = self.open(("bob", "builder"))
        self.assertEqual(response.code, 200)
