"""Three ``twistd mailhub`` processes on one PostgreSQL and the RabbitMQ cluster.

Each instance has its own ``[amqp] url`` order (so each starts on another
node), the collector's queue a quorum queue; the site user is created once,
with the ``mailhub`` command, in the shared database. A Dovecot-style push
(the OX endpoint, as ``doc/push.rst`` shows it) delivered to instance A
reaches the user's ``/api/v1/events`` streams on instances B and C, through
the cluster; a site token rotated with instance B's configuration works at
once on all three, and the old one is refused by all three.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

from twisted.internet import reactor, threads
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from tests.cluster.test_rabbit_cluster import ClusterTestCase
from tests.pubsub.test_rabbitmq import inline
from tests.push.test_twistd_e2e import EventStreamClient
from tests.support import dav
from tests.support.amqp_peer import _pika
from tests.support.postgres import throwaway_database
from tests.support.process import Mailhub
from tests.support.rabbitmq import unique
from tests.support.radicale import RadicaleServer

MAILHUB_CLI = str(Path(sys.executable).with_name("mailhub"))
PUSH_USER, PUSH_PASSWORD = "dovecot", "push-Secret-42"


class ThreeInstances(ClusterTestCase):
    timeout = 300

    def setUp(self) -> None:
        super().setUp()
        self.folder = Path(tempfile.mkdtemp(prefix="mailhub-three-"))
        self.addCleanup(shutil.rmtree, self.folder, True)
        tag = uuid.uuid4().hex[:10]
        self.login, self.password = "three-%s@example.org" % tag, "own-Secret-%s" % tag
        # One CardDAV server for the three, as a site has.
        self.radicale = RadicaleServer({self.login: self.password})
        self.radicale.start()
        self.addCleanup(self.radicale.cleanup)
        radicale = self.radicale
        carddav = ("[carddav]\nurl = %s\nusername = %s\npassword = %s\n"
                   "addressbook = %s{user}/collected/\n"
                   % (radicale.url, radicale.service[0], radicale.service[1], radicale.url))
        database = throwaway_database()
        self.dsn = database.__enter__()
        self.addCleanup(database.__exit__, None, None, None)
        self.queue = queue = unique("three-collector")
        nodes = self.cluster.nodes
        self.instances = []
        for i, name in enumerate("abc"):
            folder = self.folder / name
            (folder / "data").mkdir(parents=True)
            url = ", ".join(nodes[(i + k) % 3].url for k in range(3))
            self.instances.append(Mailhub(folder, config=(
                "[mailhub]\ndata = %s\n"
                "[database]\ndsn = %s\n"
                "[amqp]\nurl = %s\n"
                "[push]\nusername = %s\npassword = %s\nkeepalive = 0.5\n"
                "[collector]\nqueue = %s\ndead_letter = %s:dead\nqueue_type = quorum\n%s"
                % (folder / "data", self.dsn, url, PUSH_USER, PUSH_PASSWORD, queue, queue,
                   carddav))))

    def cli(self, *args: str, stdin: str = "", instance: int = 0) -> str:
        """The ``mailhub`` command on an instance's INI file (blocking); its output."""
        on = self.instances[instance]
        done = subprocess.run([MAILHUB_CLI, *args, "--config", str(on.folder / "mailhub.ini")],
                              input=stdin, capture_output=True, text=True, timeout=60,
                              cwd=on.folder)
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout

    def token(self, instance: int) -> str:
        """``mailhub token create`` with an instance's configuration: the new site token."""
        out = self.cli("token", "create", instance=instance)
        return out.splitlines()[1].strip()

    def groups(self, mailhub: Mailhub, token: str) -> int:
        """The status of ``/gs-group-groups.json`` asked with ``token``."""
        status, _ = mailhub.post_form("/gs-group-groups.json", "token=%s&get=" % token)
        return status

    async def wait_for(self, what: str, predicate: Callable[[], Any],
                       seconds: float = 60.0) -> Any:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = predicate()
            if found:
                return found
            await deferLater(reactor, 0.05, lambda: None)
        logs = "\n".join("--- %s\n%s" % (m.folder.name, m.log.read_text()[-3000:])
                         for m in self.instances)
        self.fail("timed out waiting for %s\n%s" % (what, logs))

    async def start(self, mailhub: Mailhub) -> None:
        """Start ``mailhub``, until /healthz says the broker is set up too."""
        await threads.deferToThread(mailhub.start, 120)
        self.addCleanup(threads.deferToThread, mailhub.stop)
        deadline = time.monotonic() + 60
        while True:
            status, health = await threads.deferToThread(mailhub.get, "/healthz")
            if status == 200 and health["dependencies"]["amqp"]["ok"]:
                return
            if time.monotonic() > deadline:
                self.fail("%s never reached RabbitMQ: %r\n%s"
                          % (mailhub.folder.name, health, mailhub.log.read_text()))
            await deferLater(reactor, 0.1, lambda: None)

    async def stream(self, mailhub: Mailhub, login: str, password: str) -> EventStreamClient:
        pool = HTTPConnectionPool(reactor, persistent=False)
        token = base64.b64encode(("%s:%s" % (login, password)).encode("utf-8"))
        response = await Agent(reactor, pool=pool).request(
            b"GET", (mailhub.url + "/api/v1/events").encode("ascii"),
            Headers({b"authorization": [b"Basic " + token],
                     b"accept": [b"text/event-stream"]}))
        self.assertEqual(response.code, 200)
        stream = EventStreamClient()
        response.deliverBody(stream)
        self.addCleanup(stream.close)
        await self.wait_for("the stream to open", lambda: b": connected" in stream.data)
        return stream

    @inline
    async def test_collection_events_and_token_rotation_across_three_instances(self) -> None:
        login, password = self.login, self.password
        await threads.deferToThread(self.cli, "user", "add", login, "--name", "Three")
        await threads.deferToThread(self.cli, "user", "passwd", login, stdin=password + "\n")
        old = await threads.deferToThread(self.token, 0)
        for mailhub in self.instances:
            await self.start(mailhub)
        a, b, c = self.instances
        on_c = await self.stream(c, login, password)
        on_b = await self.stream(b, login, password)

        push = {"user": login, "event": "messageNew", "folder": "INBOX",
                "imap-uidvalidity": 1700000000, "imap-uid": 7,
                "from": "Bob <bob@example.org>", "subject": "Lunch?", "snippet": "Shall we?",
                "unseen": 1}
        credentials = base64.b64encode(("%s:%s" % (PUSH_USER, PUSH_PASSWORD)).encode())
        status, answer = await threads.deferToThread(
            a.request, "PUT", "/preliminary/http-notify/v1/notify",
            json.dumps(push).encode("utf-8"),
            {"Content-Type": "application/json; charset=utf-8",
             "Authorization": "Basic " + credentials.decode()})
        self.assertEqual((status, answer), (200, {"success": True}))

        for name, stream in (("C", on_c), ("B", on_b)):
            [event] = await self.wait_for("mail:new on instance %s" % name,
                                          lambda s=stream: s.events("mail:new"))
            self.assertEqual((event["user"], event["subject"], event["uid"]),
                             (login, "Lunch?", 7))

        # A token rotated with instance B's configuration: the new one works
        # at once everywhere, the old one is refused by all three once each
        # has read the change (PostgreSQL: as it commits; cli.rst's bound).
        for mailhub in self.instances:
            self.assertEqual(await threads.deferToThread(self.groups, mailhub, old), 200)
        new = await threads.deferToThread(self.token, 1)
        self.assertNotEqual(new, old)
        for mailhub in self.instances:
            self.assertEqual(await threads.deferToThread(self.groups, mailhub, new), 200)
        for mailhub in self.instances:
            deadline = time.monotonic() + 10
            while (status := await threads.deferToThread(self.groups, mailhub, old)) != 403:
                self.assertEqual(status, 200)
                if time.monotonic() > deadline:
                    self.fail("%s still accepts the old token" % mailhub.folder.name)
                await deferLater(reactor, 0.05, lambda: None)

        # Collector messages published to the cluster (pika, confirmed), the
        # same addresses in several of them: the three instances compete for
        # them, and each address becomes one contact in the shared CardDAV.
        expected = sorted({"c%02d@example.net" % (i % 20) for i in range(40)}
                          | {"shared@example.net"})
        await threads.deferToThread(self.publish, [
            {"userEmail": login, "emails": ["Contact %d <c%02d@example.net>" % (i % 20, i % 20),
                                            "shared@example.net"]} for i in range(40)])
        book = "%s%s/collected/" % (self.radicale.url, quote(login, safe="@+"))

        def emails() -> list[str]:
            return sorted(e for card in dav.cards(book, self.radicale.service)
                          for e in card.emails)

        await self.wait_for("every contact", lambda: set(emails()) == set(expected))
        await self.wait_for("the queue settled", lambda: self.cluster.queue_counts(
            self.queue) == (0, 0))
        self.assertEqual(emails(), expected)

    def publish(self, messages: list[dict[str, Any]]) -> None:
        """pika publishes ``messages`` to the collector's exchange, with confirms."""
        pika = _pika()
        node = self.cluster.nodes[2]
        connection = pika.BlockingConnection(pika.ConnectionParameters(
            host="127.0.0.1", port=node.port, heartbeat=0,
            credentials=pika.PlainCredentials("guest", "guest")))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            for data in messages:
                channel.basic_publish(self.queue, "", json.dumps(data).encode("utf-8"),
                                      pika.BasicProperties(delivery_mode=2))
        finally:
            connection.close()
