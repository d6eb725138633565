"""End to end: a real Dovecot (dovecot-lda, doveadm) pushes to mailhub over HTTP.

mailhub's push surface and event stream listen on a free port of 127.0.0.1 in
this process (trial TestCase, real reactor); Dovecot's tools run in threads
so the reactor keeps answering them. What ``mailhub dovecot-config`` prints
for Dovecot 2.3 is run here verbatim too. A recording TCP relay sits between
Dovecot and mailhub, so the tests can read the exchange on the wire.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from typing import Any, Callable

import treq
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.protocols import portforward
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from mailhub import cli
from mailhub.config import Config, PushSection
from mailhub.directory.model import User
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.push import TOPICS
from mailhub.web.events import EventStream
from mailhub.web.push import PushReceiver
from tests.push.fakes import FakeUserSource
from tests.support.dovecot import LUA_SCRIPT, Dovecot, message

PUSH_USER, PUSH_PASSWORD = "dovecot", "push-s3cret"


class _Dispatch(Resource):
    """The test's root: /api/ to the event stream, everything else to the receiver."""

    isLeaf = True

    def __init__(self, receiver: IResource, stream: IResource) -> None:
        super().__init__()
        self.receiver, self.stream = receiver, stream

    def render(self, request: Any) -> Any:
        target = self.stream if request.path.startswith(b"/api/") else self.receiver
        return target.render(request)


class _TapClient(portforward.ProxyClient):
    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        self.peer.factory.wire.append(("mailhub", data))
        super().dataReceived(data)


class _TapClientFactory(portforward.ProxyClientFactory):
    protocol = _TapClient


class _TapServer(portforward.ProxyServer):
    clientProtocolFactory = _TapClientFactory

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.factory.wire.append(("dovecot", data))
        super().dataReceived(data)


class _Tap(portforward.ProxyFactory):
    """A TCP relay that records every chunk each side sends, in order."""

    protocol = _TapServer

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.wire: list[tuple[str, bytes]] = []


class DovecotPushTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        config = Config(push=PushSection(username=PUSH_USER, password=PUSH_PASSWORD,
                                         keepalive=5.0))
        self.hub, self.metrics = Hub(), Metrics()
        self.seen: list[tuple[str, dict[str, Any]]] = []
        for topic in TOPICS:
            self.hub.local.topic(topic).subscribe(
                lambda data, topic=topic: self.seen.append((topic, data)))
        self.receiver = PushReceiver(config, self.hub, self.metrics, reactor)
        self.users = FakeUserSource()
        self.stream = EventStream(config, self.hub, self.metrics, self.users, reactor)
        site = Site(_Dispatch(self.receiver.resource(), self.stream.resource()))
        self.site_port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.site_port.stopListening)
        self.tap = _Tap("127.0.0.1", self.site_port.getHost().port)
        relay = reactor.listenTCP(0, self.tap, interface="127.0.0.1")
        self.addCleanup(relay.stopListening)
        self.base = "http://127.0.0.1:%d" % self.site_port.getHost().port
        # Dovecot does not percent-decode URL credentials: keep them URL-safe.
        self.relay = "127.0.0.1:%d" % relay.getHost().port
        self.relay_base = "http://%s:%s@%s" % (PUSH_USER, PUSH_PASSWORD, self.relay)
        self.addCleanup(self.stream.close)
        self.addCleanup(self.receiver.stop)

    def dovecot(self, **kw: Any) -> Dovecot:
        dc = Dovecot(**kw)
        self.addCleanup(dc.cleanup)
        return dc

    def in_thread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return threads.deferToThread(f, *args)

    @inlineCallbacks
    def wait_for(self, what: str, predicate: Callable[[], Any], seconds: float = 10.0) -> Any:
        for _ in range(int(seconds / 0.02)):
            found = predicate()
            if found:
                return found
            yield deferLater(reactor, 0.02, lambda: None)
        self.fail("timed out waiting for %s; published: %r" % (what, self.seen))

    def published(self, topic: str) -> list[dict[str, Any]]:
        return [data for t, data in self.seen if t == topic]

    @inlineCallbacks
    def open_stream(self, login: str, password: str) -> Any:
        """A real SSE client: (chunks list, Deferred firing when the stream ends)."""
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield treq.get(self.base + "/api/v1/events", auth=(login, password),
                                  pool=pool, unbuffered=True)
        self.assertEqual(response.code, 200)
        chunks: list[bytes] = []
        ended = treq.collect(response, chunks.append)

        @inlineCallbacks
        def close() -> Any:
            self.stream.close()
            yield ended
            yield pool.closeCachedConnections()

        self.addCleanup(close)
        return chunks

    @inlineCallbacks
    def test_lda_delivery_with_the_ox_driver_is_published_and_streamed(self) -> None:
        dc = self.dovecot(driver="ox:url=%s/preliminary/http-notify/v1/notify" % self.relay_base)
        self.users.add(User(login=dc.user, emails=("%s@example.org" % dc.user,)), "pw")
        self.users.add(User(login="someone-else"), "pw2")
        own = yield self.open_stream(dc.user, "pw")
        other = yield self.open_stream("someone-else", "pw2")
        result = yield self.in_thread(dc.enable_ox)
        self.assertEqual(result.code, 0, result.stderr)
        result = yield self.in_thread(dc.deliver, message(
            subject="=?utf-8?q?Caf=C3=A9_au_lait?=", sender="Zoë <zoe@example.org>"))
        self.assertEqual(result.code, 0, result.stderr)
        [event] = yield self.wait_for("mail:new", lambda: self.published("mail:new"))
        self.assertEqual((event["user"], event["driver"], event["mailbox"], event["uid"]),
                         (dc.user, "ox", "INBOX", 1))
        self.assertEqual(event["subject"], "Café au lait")
        self.assertEqual(event["from"], "Zoë <zoe@example.org>")
        self.assertEqual(event["snippet"], "Hi there.")
        self.assertIsInstance(event["uid_validity"], int)
        text = yield self.wait_for("the SSE frame", lambda: b"event: mail:new" in b"".join(own)
                                   and b"".join(own).decode("utf-8"))
        data = json.loads(text.split("event: mail:new\ndata: ", 1)[1].split("\n", 1)[0])
        self.assertEqual((data["user"], data["subject"]), (dc.user, "Café au lait"))
        self.assertNotIn(b"mail:new", b"".join(other))
        self.assertNotIn("Error", dc.log())

    @inlineCallbacks
    def test_shipped_lua_script_sends_deliveries_and_appends(self) -> None:
        # Credentials as settings this time: the script sends them as Basic auth.
        dc = self.dovecot(driver="lua:file=%s" % LUA_SCRIPT, lua=True, plugin={
            "mailhub_push_url": "http://%s/push/v1/notify" % self.relay,
            "mailhub_push_username": PUSH_USER, "mailhub_push_password": PUSH_PASSWORD})
        result = yield self.in_thread(dc.deliver, message(
            subject="Lunch?", sender="Zoë <zoe@example.org>", message_id="<lunch@example.org>"))
        self.assertEqual(result.code, 0, result.stderr)
        [new] = yield self.wait_for("mail:new", lambda: self.published("mail:new"))
        self.assertEqual((new["user"], new["driver"], new["mailbox"], new["uid"]),
                         (dc.user, "lua", "INBOX", 1))
        self.assertEqual((new["from_address"], new["from_display_name"], new["subject"]),
                         ("zoe@example.org", "Zoë", "Lunch?"))
        self.assertEqual(new["message_id"], "<lunch@example.org>")
        self.assertEqual((new["date"], new["tz"]), (1704099600, 60))
        result = yield self.in_thread(dc.doveadm, "mailbox", "create", "Sent")
        self.assertEqual(result.code, 0, result.stderr)
        result = yield self.in_thread(dc.save, "Sent", message(
            subject="Re: Lunch?", sender="%s@example.org" % dc.user,
            to="Zoë <zoe@example.org>, bob@example.org"))
        self.assertEqual(result.code, 0, result.stderr)
        # The collector's mail source listens on the local pubsub for this.
        [append] = yield self.wait_for("mail:append", lambda: self.published("mail:append"))
        self.assertEqual((append["user"], append["mailbox"], append["subject"]),
                         (dc.user, "Sent", "Re: Lunch?"))
        self.assertEqual(append["to"], "Zoë <zoe@example.org>, bob@example.org")
        self.assertIn({"user": dc.user, "event": "mailbox_create", "driver": "lua",
                       "mailbox": "Sent"}, self.published("mailbox:create"))
        self.assertNotIn("Error", dc.log())

    @inlineCallbacks
    def test_shipped_lua_script_sends_flags_expunges_and_mailbox_changes(self) -> None:
        dc = self.dovecot(driver="lua:file=%s" % LUA_SCRIPT, lua=True, plugin={
            "mailhub_push_url": "%s/push/v1/notify" % self.relay_base})
        result = yield self.in_thread(dc.deliver, message())
        self.assertEqual(result.code, 0, result.stderr)
        yield self.wait_for("mail:new", lambda: self.published("mail:new"))
        steps = [
            ("flags", "add", "\\Seen", "mailbox", "INBOX", "1"),
            ("flags", "add", "\\Flagged $Label1", "mailbox", "INBOX", "1"),
            ("flags", "remove", "$Label1", "mailbox", "INBOX", "1"),
            ("flags", "add", "\\Deleted", "mailbox", "INBOX", "1"),
            ("expunge", "mailbox", "INBOX", "1"),
            ("mailbox", "create", "Archive"), ("mailbox", "subscribe", "Archive"),
            ("mailbox", "unsubscribe", "Archive"), ("mailbox", "rename", "Archive", "Old"),
            ("mailbox", "delete", "Old"),
        ]
        for step in steps:
            result = yield self.in_thread(dc.doveadm, *step)
            self.assertEqual(result.code, 0, (step, result.stderr))
        yield self.wait_for("mailbox:delete", lambda: self.published("mailbox:delete"))
        flags = [(e["event"], e["flags"], e["keywords"]) for e in self.published("mail:flags")]
        self.assertEqual(flags, [
            ("flags_set", ["\\Seen"], []), ("message_read", ["\\Seen"], []),
            ("flags_set", ["\\Flagged"], ["$Label1"]),
            ("flags_clear", [], ["$Label1"]),
            ("flags_set", ["\\Deleted"], []),
        ])
        self.assertEqual([(e["event"], e["mailbox"], e["uid"])
                          for e in self.published("mail:expunge")],
                         [("message_trash", "INBOX", 1), ("message_expunge", "INBOX", 1)])
        mailboxes = [(t, d["mailbox"], d.get("mailbox_old")) for t, d in self.seen
                     if t.startswith("mailbox:")]
        self.assertEqual(mailboxes, [
            ("mailbox:create", "INBOX", None),  # made by the delivery
            ("mailbox:create", "Archive", None), ("mailbox:subscribe", "Archive", None),
            ("mailbox:unsubscribe", "Archive", None), ("mailbox:rename", "Old", "Archive"),
            ("mailbox:delete", "Old", None)])
        self.assertTrue(all(d["user"] == dc.user and d["driver"] == "lua"
                            for _, d in self.seen))
        self.assertNotIn("Error", dc.log())

    @inlineCallbacks
    def test_lua_delivery_gets_100_continue_before_sending_its_body(self) -> None:
        """Dovecot's Lua client sends ``Expect: 100-continue`` and waits for the
        interim answer (about 2 s without one): the relay shows twisted.web sends
        ``100 Continue`` as soon as the headers arrive, before the body is sent."""
        dc = self.dovecot(driver="lua:file=%s" % LUA_SCRIPT, lua=True, plugin={
            "mailhub_push_url": "%s/push/v1/notify" % self.relay_base})
        result = yield self.in_thread(dc.deliver, message())
        self.assertEqual(result.code, 0, result.stderr)
        yield self.wait_for("mail:new", lambda: self.published("mail:new"))
        wire = self.tap.wire
        sent = b"".join(data for side, data in wire if side == "dovecot")
        head, _, body = sent.partition(b"\r\n\r\n")
        self.assertIn(b"expect: 100-continue", head.lower())
        self.assertTrue(body.startswith(b'{"'), body[:40])
        first_answer = next(i for i, (side, _) in enumerate(wire) if side == "mailhub")
        self.assertTrue(wire[first_answer][1].startswith(b"HTTP/1.1 100 Continue\r\n\r\n"))
        # Every byte of the body left Dovecot after the 100 Continue reached it.
        before = b"".join(data for side, data in wire[:first_answer] if side == "dovecot")
        self.assertEqual(before, head + b"\r\n\r\n")
        answers = b"".join(data for side, data in wire if side == "mailhub")
        self.assertIn(b"HTTP/1.1 200 OK", answers)
        log = dc.log()
        self.assertNotIn("timed out", log.lower())
        self.assertNotIn("Error", log)

    def printed_config(self, *argv: str) -> str:
        """What ``mailhub dovecot-config --with-password ARGV`` prints for this
        test's receiver (its real port, its [push] credentials)."""
        folder = tempfile.mkdtemp(prefix="mailhub-dovecot-config-")
        self.addCleanup(shutil.rmtree, folder, True)
        ini = os.path.join(folder, "mailhub.ini")
        with open(ini, "w") as f:
            f.write("[mailhub]\nlisten = tcp:%d:interface=127.0.0.1\n"
                    "[push]\nusername = %s\npassword = %s\n"
                    % (self.site_port.getHost().port, PUSH_USER, PUSH_PASSWORD))
        out, err = io.StringIO(), io.StringIO()
        code = cli.main(["dovecot-config", "--config", ini, "--with-password", *argv],
                        stdout=out, stderr=err)
        self.assertEqual((code, err.getvalue()), (0, ""))
        return out.getvalue()

    @inlineCallbacks
    def test_printed_lua_configuration_works_verbatim(self) -> None:
        dc = self.dovecot(snippet=self.printed_config("--driver", "lua", "--dovecot", "2.3"))
        result = yield self.in_thread(dc.deliver, message(subject="Printed"))
        self.assertEqual(result.code, 0, result.stderr)
        [new] = yield self.wait_for("mail:new", lambda: self.published("mail:new"))
        self.assertEqual((new["user"], new["driver"], new["subject"]),
                         (dc.user, "lua", "Printed"))
        self.assertNotIn("Error", dc.log())

    @inlineCallbacks
    def test_printed_ox_configuration_works_verbatim(self) -> None:
        dc = self.dovecot(snippet=self.printed_config("--driver", "ox", "--dovecot", "2.3"))
        result = yield self.in_thread(dc.enable_ox)
        self.assertEqual(result.code, 0, result.stderr)
        result = yield self.in_thread(dc.deliver, message(subject="Printed"))
        self.assertEqual(result.code, 0, result.stderr)
        [new] = yield self.wait_for("mail:new", lambda: self.published("mail:new"))
        self.assertEqual((new["user"], new["driver"], new["subject"]),
                         (dc.user, "ox", "Printed"))
        self.assertNotIn("Error", dc.log())
