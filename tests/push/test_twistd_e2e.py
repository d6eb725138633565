"""End to end, as a user runs it: Dovecot -> ``twistd mailhub`` -> RabbitMQ and SSE.

A real ``twistd -n mailhub`` (a child process with an INI file: ``[amqp] url``
on the local RabbitMQ, ``[push]`` credentials, site users created with the
``mailhub`` command) receives pushes from a real Dovecot (``dovecot-lda`` and
``doveadm``, as in ``tests/support/dovecot.py``). Two clients watch, as in
production:

- an OpenPaaS ESN node, played by pika (an AMQP client that shares no code
  with mailhub): its own server-named, exclusive, auto-delete queue bound to
  the fanout exchange named as the topic (``mail:new``, ``mail:append``,
  ``contacts:contact:add``), JSON bodies;
- a web client on ``/api/v1/events`` (Server-Sent Events, Basic auth as the
  site user), and another user's stream that must get nothing of it.

Each test uses its own Dovecot login (a unique address), so runs next to each
other on one broker pick out their own messages from the shared exchanges.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Coroutine, Sequence

import pytest
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from tests.support.dovecot import DOVEADM, LDA, LUA_SCRIPT, Dovecot, Result, message
from tests.support.process import Mailhub
from tests.support.rabbitmq import URL, RawClient, require_rabbitmq, unique
from tests.support.require import require_program

MAILHUB_CLI = str(Path(sys.executable).with_name("mailhub"))
PUSH_USER, PUSH_PASSWORD = "dovecot", "push-Secret-42"
OTHER_PASSWORD = "other-Secret-7"


def inline(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., Deferred[None]]:
    """Run an ``async def`` test method on the reactor."""
    def run(self: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(test(self))
    run.__name__ = test.__name__
    run.__doc__ = test.__doc__
    return run


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


class AddressedDovecot(Dovecot):
    """Dovecot whose login is an email address, as on most mail sites.

    The tools still run as the unprivileged system account (``runuser`` when
    root), but ``USER`` (the login Dovecot uses for ``%u``, the pushes'
    ``user`` and the Lua script's ``user.username``) is ``login``, so the
    pushes name the same user that mailhub knows.
    """

    def __init__(self, login: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.login = login

    def command(self, argv: Sequence[str], stdin: bytes = b"", timeout: float = 30) -> Result:
        env = ["env", "-i", "USER=%s" % self.login, "HOME=%s/home" % self.dir,
               "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
        full = (["runuser", "-u", self.user, "--"] if self.as_root else []) + env + list(argv)
        started = time.monotonic()
        done = subprocess.run(full, input=stdin, capture_output=True, timeout=timeout)
        return Result(done.returncode, done.stdout.decode("utf-8", "replace"),
                      done.stderr.decode("utf-8", "replace"), time.monotonic() - started)


def about(data: Any, user: str) -> bool:
    """Whether an event is about ``user``: push events name the login,
    ``contacts:contact:add`` (ESN's payload) carries the user's record."""
    if not isinstance(data, dict):
        return False
    named = data.get("user")
    if isinstance(named, dict):
        return user == named.get("login") or user in (named.get("emails") or [])
    return named == user


def jcard_emails(event: dict[str, Any]) -> list[tuple[str, str]]:
    """(FN, EMAIL) of the jCard in a ``contacts:contact:add`` payload."""
    properties = {p[0]: p[3] for p in event["vcard"][1]}
    return [(properties["fn"], properties["email"])]


class EsnNode:
    """An OpenPaaS ESN node's subscriptions, in a thread of its own.

    ESN (amqplib) asserts a durable fanout exchange named as the topic, and
    per subscription a server-named, exclusive, auto-delete queue bound to it
    with routing key ''; it reads the body as JSON text. pika does the same
    here: an AMQP client that shares no code with mailhub. (txamqp, which
    mailhub uses with frame decoding of its own, cannot read a body that
    holds non-ASCII text.) ``received`` gathers (topic, metadata, JSON data).
    """

    def __init__(self, url: str, topics: Sequence[str]) -> None:
        try:
            import pika
        except ImportError:
            pytest.skip("pika is not installed (the ESN node of the end-to-end test)")
        self._pika = pika
        self.url = url
        self.topics = tuple(topics)
        self.received: list[tuple[str, dict[str, Any], Any]] = []
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="esn-node", daemon=True)

    def start(self) -> None:
        """Connect and subscribe (blocking); raise what went wrong."""
        self._thread.start()
        self._ready.wait(15)
        if self._error is not None:
            raise self._error
        if not self._ready.is_set():
            raise AssertionError("the ESN node could not subscribe in 15 s")

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(15)

    def _run(self) -> None:
        pika = self._pika
        try:
            connection = pika.BlockingConnection(pika.URLParameters(self.url))
            channel = connection.channel()
            for topic in self.topics:
                channel.exchange_declare(exchange=topic, exchange_type="fanout", durable=True)
                queue = channel.queue_declare(queue="", exclusive=True,
                                              auto_delete=True).method.queue
                channel.queue_bind(queue=queue, exchange=topic, routing_key="")
                channel.basic_consume(queue=queue, auto_ack=True,
                                      on_message_callback=self._receive)
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stopping.is_set():
                connection.process_data_events(time_limit=0.05)
        finally:
            connection.close()

    def _receive(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        meta = {"exchange": method.exchange, "routing_key": method.routing_key,
                "content_type": properties.content_type,
                "delivery_mode": properties.delivery_mode}
        self.received.append((method.exchange, meta, json.loads(body.decode("utf-8"))))


class EventStreamClient(Protocol):
    """The body of one ``text/event-stream`` response, kept as it arrives."""

    def __init__(self) -> None:
        self.data = b""
        self.ended: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        if not self.ended.called:
            self.ended.callback(None)

    def events(self, topic: str, start: int = 0) -> list[dict[str, Any]]:
        """The JSON data of every complete ``event: topic`` frame after ``start``."""
        found = []
        for frame in self.data[start:].decode("utf-8").split("\n\n")[:-1]:
            fields: dict[str, str] = {}
            for line in frame.split("\n"):
                name, _, value = line.partition(": ")
                fields.setdefault(name, value)
            if fields.get("event") == topic:
                found.append(json.loads(fields["data"]))
        return found

    def close(self) -> Deferred[None]:
        """Hang up, as a browser tab does when it closes."""
        if not self.ended.called and self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]
        return self.ended


class TwistdPushEndToEnd(TestCase):
    """Dovecot's pushes through ``twistd mailhub`` to RabbitMQ and to SSE clients."""

    timeout = 60

    def setUp(self) -> None:
        require_rabbitmq()
        for program in (LDA, DOVEADM) + (("runuser",) if os.geteuid() == 0 else ()):
            require_program(program)
        self.folder = Path(tempfile.mkdtemp(prefix="mailhub-e2e-"))
        self.addCleanup(shutil.rmtree, self.folder, True)
        tag = uuid.uuid4().hex[:10]
        self.login = "e2e-%s@example.org" % tag
        self.other = "e2e-other-%s@example.org" % tag
        self.password = "own-Secret-%s" % tag
        # The collector runs as configured in production, on a queue of its
        # own, so it never competes with anyone else's on this broker.
        self.collector_queue = unique("e2e-collector")
        self.mailhub = Mailhub(self.folder, config=(
            "[mailhub]\ndata = %s\n"
            "[amqp]\nurl = %s\n"
            "[push]\nusername = %s\npassword = %s\nkeepalive = 0.5\n"
            "[collector]\nqueue = %s\ndead_letter = %s:dead\n"
            % (self.folder / "data", URL, PUSH_USER, PUSH_PASSWORD,
               self.collector_queue, self.collector_queue)))
        self.config = self.folder / "mailhub.ini"
        self.raw: RawClient | None = None
        self.addCleanup(self.delete_collector_queue)

    # -- helpers ----------------------------------------------------------------

    def in_thread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> Deferred[Any]:
        return threads.deferToThread(f, *args, **kw)

    def cli(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        """The ``mailhub`` command on this test's INI file (blocking)."""
        done = subprocess.run([MAILHUB_CLI, *args, "--config", str(self.config)],
                              input=stdin, capture_output=True, text=True, timeout=30,
                              cwd=self.folder)
        self.assertEqual(done.returncode, 0, done.stderr)
        return done

    async def add_user(self, address: str, password: str) -> None:
        await self.in_thread(self.cli, "user", "add", address, "--name", "E2E User")
        await self.in_thread(self.cli, "user", "passwd", address, stdin=password + "\n")

    async def start_mailhub(self) -> None:
        """``twistd -n mailhub``, until /healthz says the broker is set up too."""
        await self.in_thread(self.mailhub.start)
        self.addCleanup(self.stop_mailhub)
        deadline = time.monotonic() + 20
        while True:
            status, health = await self.in_thread(self.mailhub.get, "/healthz")
            if status == 200 and health["dependencies"]["amqp"]["ok"]:
                return
            if time.monotonic() > deadline:
                self.fail("mailhub never reached RabbitMQ: %r\n%s"
                          % (health, self.mailhub.log.read_text()))
            await sleep(0.05)

    async def stop_mailhub(self) -> None:
        code = await self.in_thread(self.mailhub.stop)
        log = self.mailhub.log.read_text()
        self.assertEqual(code, -signal.SIGTERM, log)  # twistd's exit on SIGTERM
        self.assertNotIn("Traceback", log)

    async def delete_collector_queue(self) -> None:
        raw = await RawClient.connect(reactor)
        try:
            # The calendar source's shared queues are made by every mailhub
            # with a broker; no test here needs them kept.
            calendar = ["mailhub:calendar:event:%s%s" % (kind, dead)
                        for kind in ("created", "updated") for dead in ("", ":dead")]
            await raw.delete(exchanges=[self.collector_queue],
                             queues=[self.collector_queue, self.collector_queue + ":dead",
                                     *calendar])
        finally:
            await raw.close()

    async def esn_node(self, *topics: str) -> "EsnNode":
        """An OpenPaaS ESN node subscribed to ``topics`` on the same RabbitMQ."""
        node = EsnNode(URL, topics)
        await self.in_thread(node.start)
        self.addCleanup(self.in_thread, node.stop)
        return node

    def on_exchange(self, node: "EsnNode", topic: str,
                    user: str) -> list[tuple[dict[str, Any], Any]]:
        """What the ESN node got on ``topic`` about ``user`` (other runs' are ignored)."""
        return [(meta, data) for t, meta, data in node.received
                if t == topic and about(data, user)]

    async def from_exchange(self, node: "EsnNode", topic: str,
                            user: str) -> tuple[dict[str, Any], Any]:
        """The one message on ``topic`` about ``user``."""
        [found] = await self.wait_for("%s for %s on RabbitMQ" % (topic, user),
                                      lambda: self.on_exchange(node, topic, user))
        return found

    async def open_stream(self, login: str, password: str) -> EventStreamClient:
        """A web client on /api/v1/events, authenticated as a site user."""
        pool = HTTPConnectionPool(reactor, persistent=False)
        token = base64.b64encode(("%s:%s" % (login, password)).encode("utf-8"))
        response = await Agent(reactor, pool=pool).request(
            b"GET", (self.mailhub.url + "/api/v1/events").encode("ascii"),
            Headers({b"authorization": [b"Basic " + token],
                     b"accept": [b"text/event-stream"]}))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                         [b"text/event-stream; charset=utf-8"])
        stream = EventStreamClient()
        response.deliverBody(stream)
        self.addCleanup(stream.close)
        await self.wait_for("the stream to open", lambda: b": connected" in stream.data)
        return stream

    async def wait_for(self, what: str, predicate: Callable[[], Any],
                       seconds: float = 15.0) -> Any:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = predicate()
            if found:
                return found
            await sleep(0.02)
        self.fail("timed out waiting for %s\n%s" % (what, self.mailhub.log.read_text()))

    def dovecot(self, **kw: Any) -> AddressedDovecot:
        dc = AddressedDovecot(self.login, **kw)
        self.addCleanup(dc.cleanup)
        return dc

    def assert_esn_message(self, meta: dict[str, Any], topic: str) -> None:
        """What an ESN node reads: the topic's fanout exchange, key '', JSON text."""
        self.assertEqual((meta["exchange"], meta["routing_key"]), (topic, ""))
        self.assertEqual(meta["content_type"], "application/json")

    # -- the tests ------------------------------------------------------------

    @inline
    async def test_ox_delivery_reaches_esn_over_rabbitmq_and_only_its_users_stream(
            self) -> None:
        await self.add_user(self.login, self.password)
        await self.add_user(self.other, OTHER_PASSWORD)
        await self.start_mailhub()
        node = await self.esn_node("mail:new")
        own = await self.open_stream(self.login, self.password)
        other = await self.open_stream(self.other, OTHER_PASSWORD)
        dc = self.dovecot(driver="ox:url=http://%s:%s@127.0.0.1:%d"
                          "/preliminary/http-notify/v1/notify"
                          % (PUSH_USER, PUSH_PASSWORD, self.mailhub.port))
        result = await self.in_thread(dc.enable_ox, self.login)
        self.assertEqual(result.code, 0, result.stderr)

        result = await self.in_thread(dc.deliver, message(
            subject="=?utf-8?q?Caf=C3=A9_au_lait?=", sender="Zoë <zoe@example.org>",
            to=self.login))
        self.assertEqual(result.code, 0, result.stderr)

        delivered, event = await self.from_exchange(node, "mail:new", self.login)
        self.assert_esn_message(delivered, "mail:new")
        self.assertEqual((event["event"], event["driver"], event["mailbox"], event["uid"]),
                         ("message_new", "ox", "INBOX", 1))
        self.assertEqual((event["subject"], event["from"], event["snippet"]),
                         ("Café au lait", "Zoë <zoe@example.org>", "Hi there."))
        self.assertIsInstance(event["uid_validity"], int)

        [streamed] = await self.wait_for("mail:new on the user's stream",
                                         lambda: own.events("mail:new"))
        self.assertEqual(streamed, event)
        # The other stream is alive (a keep-alive written after the event
        # reached the first one) and got no mail:new.
        seen = len(other.data)
        await self.wait_for("a keep-alive on the other stream",
                            lambda: b": keepalive" in other.data[seen:])
        self.assertEqual(other.events("mail:new"), [])
        self.assertNotIn(b"Caf", other.data)
        self.assertNotIn("Error", dc.log())

    @inline
    async def test_shipped_lua_script_sends_new_mail_and_sent_appends_to_esn(self) -> None:
        await self.add_user(self.login, self.password)
        await self.start_mailhub()
        node = await self.esn_node("mail:new", "mail:append", "contacts:contact:add")
        own = await self.open_stream(self.login, self.password)
        # Set up as contrib/dovecot/10-mailhub-push.conf says.
        dc = self.dovecot(driver="lua:file=%s" % LUA_SCRIPT, lua=True, plugin={
            "mailhub_push_url": "%s/push/v1/notify" % self.mailhub.url,
            "mailhub_push_username": PUSH_USER, "mailhub_push_password": PUSH_PASSWORD})

        result = await self.in_thread(dc.deliver, message(
            subject="Lunch?", sender="Zoë <zoe@example.org>", to=self.login,
            message_id="<lunch@example.org>"))
        self.assertEqual(result.code, 0, result.stderr)
        delivered, new = await self.from_exchange(node, "mail:new", self.login)
        self.assert_esn_message(delivered, "mail:new")
        self.assertEqual((new["event"], new["driver"], new["mailbox"], new["uid"]),
                         ("message_new", "lua", "INBOX", 1))
        self.assertEqual((new["from_address"], new["from_display_name"], new["subject"],
                          new["message_id"]),
                         ("zoe@example.org", "Zoë", "Lunch?", "<lunch@example.org>"))

        result = await self.in_thread(dc.doveadm, "mailbox", "create", "Sent")
        self.assertEqual(result.code, 0, result.stderr)
        result = await self.in_thread(dc.save, "Sent", message(
            subject="Re: Lunch?", sender=self.login,
            to="Zoë <zoe@example.org>, bob@example.org", message_id="<re-lunch@example.org>"))
        self.assertEqual(result.code, 0, result.stderr)
        delivered, append = await self.from_exchange(node, "mail:append",
                                                     self.login)
        self.assert_esn_message(delivered, "mail:append")
        self.assertEqual((append["event"], append["driver"], append["mailbox"],
                          append["subject"]),
                         ("message_append", "lua", "Sent", "Re: Lunch?"))
        self.assertEqual(append["to"], "Zoë <zoe@example.org>, bob@example.org")

        await self.wait_for("both events on the user's stream",
                            lambda: own.events("mail:new") and own.events("mail:append"))
        self.assertEqual((own.events("mail:new"), own.events("mail:append")), ([new], [append]))

        # The collector's mail source took the append to Sent: both recipients
        # became contacts, announced to ESN and on the user's stream.
        added = await self.wait_for(
            "two contacts:contact:add on RabbitMQ",
            lambda: len(self.on_exchange(node, "contacts:contact:add", self.login)) >= 2
            and self.on_exchange(node, "contacts:contact:add", self.login))
        for meta, _ in added:
            self.assert_esn_message(meta, "contacts:contact:add")
        self.assertEqual(sorted(sum((jcard_emails(data) for _, data in added), [])),
                         [("Zoë", "zoe@example.org"), ("bob@example.org", "bob@example.org")])
        self.assertEqual({data["bookName"] for _, data in added}, {"collected"})
        streamed = await self.wait_for(
            "two contacts:contact:add on the user's stream",
            lambda: len(own.events("contacts:contact:add")) >= 2
            and own.events("contacts:contact:add"))
        self.assertEqual(sorted(streamed, key=lambda e: e["contactId"]),
                         sorted((data for _, data in added), key=lambda e: e["contactId"]))
        self.assertNotIn("Error", dc.log())
