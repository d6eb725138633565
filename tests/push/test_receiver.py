"""The push endpoints through StubTreq over the real Klein resource."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailhub.config import Config, PushSection
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.pubsub.local import LocalPubSub
from mailhub.web.push import PushReceiver
from tests.support.auth import auth_failures

OX_URL = "http://mailhub.test/preliminary/http-notify/v1/notify"
LUA_URL = "http://mailhub.test/push/v1/notify"
AUTH = ("dovecot", "s3cret")

OX_BODY = {
    "user": "alice", "event": "messageNew", "folder": "INBOX",
    "imap-uidvalidity": 1700000000, "imap-uid": 7,
    "from": "=?utf-8?q?Bj=C3=B6rn?= <bjorn@example.org>",
    "subject": "=?ISO-8859-1?Q?caf=E9?=", "snippet": "Hello there", "unseen": 3,
}


def make(**push: Any) -> tuple[PushReceiver, StubTreq, Hub, Clock, Metrics]:
    settings = {"username": AUTH[0], "password": AUTH[1], **push}
    config = Config(push=PushSection(**settings))
    hub, clock, metrics = Hub(), Clock(), Metrics()
    receiver = PushReceiver(config, hub, metrics, clock)
    return receiver, StubTreq(receiver.resource()), hub, clock, metrics


def record(hub: Hub, *topics: str, pubsub: Any = None) -> list[tuple[str, Any]]:
    seen: list[tuple[str, Any]] = []
    for topic in topics:
        (pubsub or hub.local).topic(topic).subscribe(
            lambda data, topic=topic: seen.append((topic, data)))
    return seen


class PushReceiverTests(SynchronousTestCase):
    def call(self, stub: StubTreq, method: str, url: str, body: Any,
             auth: Any = AUTH, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
        hdrs = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
        d = stub.request(method, url, data=data, headers=hdrs, auth=auth)
        stub.flush()
        response = self.successResultOf(d)
        raw = self.successResultOf(response.content())
        return response.code, json.loads(raw), response.headers

    def test_ox_put_answers_success_and_publishes_mail_new_after(self) -> None:
        receiver, stub, hub, clock, metrics = make()
        seen = record(hub, "mail:new")
        code, body, headers = self.call(stub, "PUT", OX_URL, OX_BODY)
        self.assertEqual((code, body), (200, {"success": True}))
        self.assertEqual(headers.getRawHeaders("content-type"),
                         ["application/json; charset=utf-8"])
        self.assertEqual(seen, [])  # answered first, published afterwards
        self.assertEqual(receiver.pending(), 1)
        clock.advance(0)
        self.assertEqual(receiver.pending(), 0)
        [(topic, data)] = seen
        self.assertEqual(topic, "mail:new")
        self.assertEqual(data["user"], "alice")
        self.assertEqual(data["mailbox"], "INBOX")
        self.assertEqual((data["uid"], data["uid_validity"]), (7, 1700000000))
        self.assertEqual(data["from"], "Björn <bjorn@example.org>")
        self.assertEqual(data["subject"], "café")
        self.assertEqual((data["driver"], data["event"], data["unseen"]),
                         ("ox", "message_new", 3))
        self.assertEqual(metrics.value("mailhub_push_requests_total",
                                       {"driver": "ox", "status": "200"}), 1)
        self.assertEqual(metrics.value("mailhub_push_events_total", {"topic": "mail:new"}), 1)

    def test_ox_post_is_accepted_too(self) -> None:
        _, stub, _, _, _ = make()
        self.assertEqual(self.call(stub, "POST", OX_URL, OX_BODY)[:2], (200, {"success": True}))

    def test_publishes_locally_then_on_the_global_pubsub(self) -> None:
        config = Config(push=PushSection(username=AUTH[0], password=AUTH[1]))
        hub, clock = Hub(local=LocalPubSub(), global_=LocalPubSub()), Clock()
        stub = StubTreq(PushReceiver(config, hub, Metrics(), clock).resource())
        order: list[str] = []
        hub.local.topic("mail:new").subscribe(lambda data: order.append("local"))
        hub.global_.topic("mail:new").subscribe(  # type: ignore[attr-defined]
            lambda data: order.append("global"))
        self.call(stub, "PUT", OX_URL, OX_BODY)
        clock.advance(0)
        self.assertEqual(order, ["local", "global"])

    def test_lua_transaction_publishes_every_event_on_its_topic(self) -> None:
        receiver, stub, hub, clock, _ = make()
        seen = record(hub, "mail:new", "mail:append", "mail:flags", "mail:expunge",
                      "mailbox:rename")
        body = {"user": "bob@example.org", "events": [
            {"name": "MessageAppend", "mailbox": "Sent", "uid": 3.0, "uid_validity": 9,
             "to": "Carol <carol@example.org>", "subject": "Hi", "flags": ["\\Seen"],
             "keywords": {}},
            {"name": "FlagsSet", "mailbox": "INBOX", "uid": 4, "uid_validity": 9,
             "flags": ["\\Flagged"], "keywords": ["$label1"]},
            {"name": "MessageTrash", "mailbox": "INBOX", "uid": 5, "uid_validity": 9},
            {"name": "MailboxRename", "mailbox": "New", "mailbox_old": "Old"},
        ]}
        code, reply, _ = self.call(stub, "POST", LUA_URL, body)
        self.assertEqual((code, reply), (200, {"success": True, "events": 4}))
        clock.advance(0)
        self.assertEqual([t for t, _ in seen],
                         ["mail:append", "mail:flags", "mail:expunge", "mailbox:rename"])
        append, flags, trash, rename = [d for _, d in seen]
        self.assertEqual((append["mailbox"], append["uid"], append["to"]),
                         ("Sent", 3, "Carol <carol@example.org>"))
        self.assertEqual(append["keywords"], [])
        self.assertEqual((flags["event"], flags["flags"], flags["keywords"]),
                         ("flags_set", ["\\Flagged"], ["$label1"]))
        self.assertEqual((trash["event"], trash["uid"]), ("message_trash", 5))
        self.assertEqual((rename["mailbox"], rename["mailbox_old"], rename["user"]),
                         ("New", "Old", "bob@example.org"))

    def test_lua_form_body_with_a_wrong_content_type_is_accepted(self) -> None:
        _, stub, hub, clock, _ = make()
        seen = record(hub, "mail:new")
        code, _, _ = self.call(stub, "POST", LUA_URL,
                               b"from=a%40x&to=b%40y&subject=Hi+there&snippet=&user=bob",
                               headers={"Content-Type": "text/plain"})
        self.assertEqual(code, 200)
        clock.advance(0)
        self.assertEqual(seen[0][1]["subject"], "Hi there")
        self.assertEqual(seen[0][1]["user"], "bob")

    def test_wrong_password_is_401_with_www_authenticate_and_counted(self) -> None:
        receiver, stub, hub, clock, metrics = make()
        seen = record(hub, "mail:new")
        for auth in (("dovecot", "wrong"), ("other", "s3cret"), None):
            code, body, headers = self.call(stub, "PUT", OX_URL, OX_BODY, auth=auth)
            self.assertEqual(code, 401)
            self.assertEqual(body, {"error": "authentication required"})
            self.assertEqual(headers.getRawHeaders("www-authenticate"),
                             ['Basic realm="mailhub push", charset="UTF-8"'])
        clock.advance(0)
        self.assertEqual(seen, [])
        self.assertEqual(receiver.pending(), 0)
        self.assertEqual(auth_failures(metrics, "push-ox"), 3)
        self.assertEqual(metrics.value("mailhub_push_requests_total",
                                       {"driver": "ox", "status": "401"}), 3)

    def test_without_configured_credentials_everything_is_refused(self) -> None:
        _, stub, _, _, _ = make(username="", password="")
        self.assertEqual(self.call(stub, "PUT", OX_URL, OX_BODY, auth=None)[0], 401)
        self.assertEqual(self.call(stub, "PUT", OX_URL, OX_BODY, auth=("", ""))[0], 401)

    def test_a_username_without_a_password_refuses_the_empty_password(self) -> None:
        _, stub, _, _, _ = make(username="dovecot", password="")
        self.assertEqual(self.call(stub, "PUT", OX_URL, OX_BODY, auth=("dovecot", ""))[0], 401)

    def test_allow_loopback_accepts_local_peers_without_credentials(self) -> None:
        _, stub, _, _, _ = make(username="", password="", allow_loopback=True)
        # StubTreq's requests come from 127.0.0.1.
        self.assertEqual(self.call(stub, "PUT", OX_URL, OX_BODY, auth=None)[0], 200)

    def test_body_over_the_limit_is_413(self) -> None:
        _, stub, hub, clock, _ = make(max_body=1024)
        seen = record(hub, "mail:new")
        big = dict(OX_BODY, snippet="x" * 2000)
        code, body, _ = self.call(stub, "PUT", OX_URL, big)
        self.assertEqual(code, 413)
        self.assertEqual(body, {"error": "request body larger than 1024 bytes"})
        clock.advance(0)
        self.assertEqual(seen, [])

    def test_nan_infinity_and_deep_nesting_are_400_and_a_large_body_413(self) -> None:
        _, stub, hub, clock, _ = make(max_body=4096)
        seen = record(hub, "mail:new")
        for url in (OX_URL, LUA_URL):
            for value, why in ((b"NaN", "NaN is not JSON"), (b"Infinity", "Infinity is not JSON"),
                               (b"-Infinity", "Infinity is not JSON"),
                               (b"[" * 65 + b"]" * 65, "nested too deeply")):
                body = (b'{"user": "alice", "event": "messageNew", "folder": "INBOX", '
                        b'"imap-uidvalidity": 1, "imap-uid": %s}' % value)
                code, reply, _ = self.call(stub, "PUT", url, body)
                self.assertEqual(code, 400, (url, value))
                self.assertIn(why, reply["error"], (url, value))
            code, reply, _ = self.call(stub, "PUT", url, b'{"user": "' + b"x" * 5000 + b'"}')
            self.assertEqual(code, 413)
        clock.advance(0)
        self.assertEqual(seen, [])

    def test_malformed_payloads_are_400_with_the_reason(self) -> None:
        _, stub, hub, clock, metrics = make()
        seen = record(hub, "mail:new")
        cases = [
            (OX_URL, b'{"user": "alice", ', "not valid JSON"),
            (OX_URL, dict(OX_BODY, **{"imap-uid": "seven"}), "'imap-uid'"),
            (OX_URL, dict(OX_BODY, user=12), "'user' must be text"),
            (OX_URL, dict(OX_BODY, event="MessageRead"), "unsupported event"),
            (OX_URL, [OX_BODY], "must be a JSON object"),
            (OX_URL, b'{"user": "\xff\xfe"}', "not valid UTF-8"),
            (LUA_URL, {"user": "bob", "events": "many"}, "'events' must be an array"),
            (LUA_URL, {"user": "bob", "events": [{"name": "Bogus"}]}, "unknown event"),
            (LUA_URL, {"events": [{"name": "MessageNew"}]}, "'user' is required"),
            (LUA_URL, {"user": "b", "events": [{"name": "MessageNew", "uid": True}]},
             "not a boolean"),
            (LUA_URL, b"user=bob&name=message_new&subject=%FF", "not valid UTF-8"),
        ]
        for url, body, reason in cases:
            code, reply, headers = self.call(stub, "PUT", url, body)
            self.assertEqual(code, 400, (body, reply))
            self.assertIn(reason, reply["error"] + " ".join(reply["messages"]), body)
            self.assertEqual(headers.getRawHeaders("content-type"),
                             ["application/json; charset=utf-8"])
        clock.advance(0)
        self.assertEqual(seen, [])
        self.assertEqual(metrics.value("mailhub_push_requests_total",
                                       {"driver": "ox", "status": "400"}), 6)

    def test_full_queue_is_503_with_retry_after_then_accepts_again(self) -> None:
        receiver, stub, hub, clock, metrics = make(queue=2)
        seen = record(hub, "mail:new")
        for uid in (1, 2):
            self.assertEqual(self.call(stub, "PUT", OX_URL, dict(OX_BODY, **{"imap-uid": uid}))[0],
                             200)
        code, body, headers = self.call(stub, "PUT", OX_URL, dict(OX_BODY, **{"imap-uid": 3}))
        self.assertEqual(code, 503)
        self.assertEqual(body, {"error": "push queue full, retry later"})
        self.assertEqual(headers.getRawHeaders("retry-after"), ["1"])
        self.assertEqual(metrics.value("mailhub_push_queue_length"), 2)
        clock.advance(0)
        self.assertEqual([d["uid"] for _, d in seen], [1, 2])
        self.assertEqual(self.call(stub, "PUT", OX_URL, dict(OX_BODY, **{"imap-uid": 3}))[0], 200)
        clock.advance(0)
        self.assertEqual([d["uid"] for _, d in seen], [1, 2, 3])

    def test_a_failing_subscriber_does_not_break_the_receiver(self) -> None:
        receiver, stub, hub, clock, _ = make()

        def broken(data: Any) -> None:
            raise RuntimeError("subscriber bug")

        hub.local.topic("mail:new").subscribe(broken)
        seen = record(hub, "mail:new")
        self.assertEqual(self.call(stub, "PUT", OX_URL, OX_BODY)[0], 200)
        clock.advance(0)
        self.assertEqual(len(seen), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.call(stub, "PUT", OX_URL, OX_BODY)[0], 200)

    def test_the_klein_routes_answer_the_same_as_the_direct_path(self) -> None:
        receiver, _, hub, clock, _ = make()
        seen = record(hub, "mail:new")
        klein = StubTreq(receiver.app.resource())
        self.assertEqual(self.call(klein, "PUT", OX_URL, OX_BODY)[:2], (200, {"success": True}))
        self.assertEqual(self.call(klein, "POST", LUA_URL, b"user=bob")[:2],
                         (200, {"success": True, "events": 1}))
        self.assertEqual(self.call(klein, "PUT", OX_URL, OX_BODY, auth=None)[0], 401)
        clock.advance(0)
        self.assertEqual([d["user"] for _, d in seen], ["alice", "bob"])

    def test_get_is_not_allowed(self) -> None:
        _, stub, _, _, _ = make()
        d = stub.get(OX_URL, auth=AUTH)
        stub.flush()
        self.assertEqual(self.successResultOf(d).code, 405)

    def test_stop_publishes_what_is_still_queued(self) -> None:
        receiver, stub, hub, clock, _ = make()
        seen = record(hub, "mail:new")
        self.call(stub, "PUT", OX_URL, OX_BODY)
        receiver.stop()
        self.assertEqual(len(seen), 1)
        self.assertEqual(clock.getDelayedCalls(), [])



class BrokerAwayTests(PushReceiverTests):
    """The real GlobalPubSub and Outbox, with the broker away (no channel attached)."""

    def setUp(self) -> None:
        from mailhub.pubsub.globalpubsub import GlobalPubSub
        from tests.pubsub.fakes import FakeBroker, FakeChannel

        self.broker = FakeBroker(limit=5)
        self.channel = FakeChannel()
        self.hub = Hub(local=LocalPubSub(), global_=GlobalPubSub(self.broker))  # type: ignore
        self.clock, self.metrics = Clock(), Metrics()
        config = Config(push=PushSection(username=AUTH[0], password=AUTH[1], queue=10))
        self.receiver = PushReceiver(config, self.hub, self.metrics, self.clock)
        self.stub = StubTreq(self.receiver.resource())
        self.local = record(self.hub, "mail:new")

    def deliver(self, uid: int) -> int:
        code = self.call(self.stub, "PUT", OX_URL, dict(OX_BODY, **{"imap-uid": uid}))[0]
        self.clock.advance(0)
        return code

    def test_events_wait_in_the_outbox_then_here_then_dovecot_is_asked_to_retry(self) -> None:
        codes = [self.deliver(uid) for uid in range(1, 17)]
        # 5 in the outbox, 10 waiting here (the [push] queue), then 503.
        self.assertEqual(codes, [200] * 15 + [503])
        self.assertEqual(len(self.broker.outbox), 5)
        self.assertEqual(self.receiver.pending(), 10)
        self.assertEqual(self.metrics.value("mailhub_push_queue_length"), 10)
        # In-process subscribers are not held up by the broker.
        self.assertEqual([d["uid"] for _, d in self.local], list(range(1, 16)))
        self.assertEqual(self.metrics.value("mailhub_push_publish_errors_total",
                                            {"topic": "mail:new"}), 0)

    def test_everything_accepted_reaches_the_broker_in_order_when_it_comes_back(self) -> None:
        for uid in range(1, 16):
            self.assertEqual(self.deliver(uid), 200)
        self.broker.outbox.attach(self.channel)
        sent: list[int] = []
        for _ in range(10):
            sent = [json.loads(body)["uid"] for body in self.channel.bodies]
            for tag in range(1, len(sent) + 1):
                self.broker.outbox.ack(tag, False)
            self.clock.advance(0.5)
        self.assertEqual(sent, list(range(1, 16)))
        self.assertEqual(self.receiver.pending(), 0)
        self.assertEqual(self.metrics.value("mailhub_push_events_total",
                                            {"topic": "mail:new"}), 15)
        self.assertEqual(self.deliver(16), 200)

    def test_stopping_offers_the_outbox_what_waits_then_counts_what_it_could_not_take(
            self) -> None:
        for uid in range(1, 9):
            self.deliver(uid)  # 5 in the outbox, 3 waiting here
        stopped = self.receiver.stop()
        self.assertNoResult(stopped)
        self.broker.outbox.attach(self.channel)
        self.broker.outbox.ack(1, False)  # room for one more
        self.clock.pump([0.5] * 10)  # the 5 s a stop goes on offering them
        self.successResultOf(stopped)
        self.assertEqual(json.loads(self.channel.bodies[-1])["uid"], 6)
        self.assertEqual(self.metrics.value("mailhub_push_publish_errors_total",
                                            {"topic": "mail:new"}), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])
