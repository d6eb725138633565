"""``mailhub dead`` on the real RabbitMQ (127.0.0.1:5672).

Every test has its own ``collector`` and ``collector:dead`` queues
(:func:`tests.support.rabbitmq.unique`), filled through pika (another client
than mailhub's) with letters shaped as mailhub dead-letters them (reason,
queue, id and time headers) and one a foreign tool put there (no id: named
by a hash). The command runs as a real process (``python -m mailhub``: it
runs the reactor), and what it left is read back with pika: order, headers,
counts. The interruption test holds every letter unacked, as the command
does, and cuts the connection: all of them are back, in order.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from mailhub.cli.dead import BrokerDeadLetters, letter_id
from mailhub.config import DEFAULT_SPEC
from mailhub.pubsub.deadletters import AT_HEADER, ID_HEADER, QUEUE_HEADER, REASON_HEADER
from tests.support.amqp_peer import _pika
from tests.support.rabbitmq import HOST, PORT, require_rabbitmq, unique

ROOT = Path(__file__).resolve().parent.parent
URL = "amqp://guest:guest@%s:%d/" % (HOST, PORT)


class Queues:
    """A work queue and its dead-letter queue, reached with pika."""

    def __init__(self) -> None:
        require_rabbitmq()
        pika = self.pika = _pika()
        self.queue = unique("dead-cli")
        self.dead = self.queue + ":dead"
        self.connection = pika.BlockingConnection(pika.ConnectionParameters(
            HOST, PORT, heartbeat=0,
            client_properties={"connection_name": self.queue + " test peer"}))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        for name in (self.queue, self.dead):
            self.channel.queue_declare(name, durable=True)

    def kill(self, body: dict[str, Any], reason: str, dead_id: str | None = None,
             at: int = 1_700_000_000, origin: str = "james") -> None:
        """Put a letter in the dead-letter queue, as mailhub's WorkQueue does."""
        headers: dict[str, Any] = {"origin": origin, REASON_HEADER: reason}
        if dead_id is not None:
            headers.update({QUEUE_HEADER: self.queue, ID_HEADER: dead_id, AT_HEADER: at})
        self.channel.basic_publish(
            "", self.dead, json.dumps(body).encode(), mandatory=True,
            properties=self.pika.BasicProperties(
                content_type="application/json", delivery_mode=2, message_id="m-" + reason,
                headers=headers))

    def drain(self, queue: str) -> list[tuple[dict[str, Any], dict[str, Any], Any]]:
        """Take every message of ``queue``: (body, headers, properties)."""
        found = []
        while True:
            method, properties, body = self.channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.append((json.loads(body), dict(properties.headers or {}), properties))

    def count(self, queue: str) -> int:
        return int(self.channel.queue_declare(queue, passive=True).method.message_count)

    def config(self, folder: Path) -> str:
        path = folder / "mailhub.ini"
        path.write_text("[mailhub]\ndata = %s\n[amqp]\nurl = %s\n[collector]\nqueue = %s\n"
                        "dead_letter = %s\n" % (folder / "data", URL, self.queue, self.dead))
        return str(path)

    def delete(self) -> None:
        for name in (self.queue, self.dead):
            self.channel.queue_delete(name)
        self.connection.close()


@pytest.fixture
def queues() -> Iterator[Queues]:
    made = Queues()
    try:
        yield made
    finally:
        made.delete()


def mailhub(config: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mailhub", "dead", *argv, "--config", config],
                          capture_output=True, text=True, timeout=60, env=env)


def rows(text: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines() if line.strip()]


def fill(queues: Queues) -> None:
    queues.kill({"userEmail": "ann@example.org", "emails": ["a@b.example"]}, "unknown user",
                dead_id="aaaaaaaaaaaa")
    queues.kill({"emails": []}, "no user; no emails", dead_id="bbbbbbbbbbbb", at=1_700_000_060)
    queues.kill({"userId": "u3", "emails": ["x@y.example", "z@y.example"]}, "foreign")


def test_list_shows_every_letter_in_order_and_leaves_them_in_place(
        queues: Queues, tmp_path: Path) -> None:
    fill(queues)
    done = mailhub(queues.config(tmp_path), "list")
    assert done.returncode == 0, done.stderr
    foreign = letter_id(json.dumps({"userId": "u3", "emails": ["x@y.example", "z@y.example"]})
                        .encode(), {REASON_HEADER: "foreign"})
    assert rows(done.stdout) == [
        ["ID", "WHEN", "REASON", "SUMMARY"],
        ["aaaaaaaaaaaa", "2023-11-14T22:13:20Z", "unknown user",
         "user=ann@example.org addresses=1"],
        ["bbbbbbbbbbbb", "2023-11-14T22:14:20Z", "no user; no emails", "user=- addresses=0"],
        [foreign, "-", "foreign", "user=u3 addresses=2"]]
    # Listing twice gives the same ids: nothing was taken or reordered.
    assert mailhub(queues.config(tmp_path), "list").stdout == done.stdout
    assert [m[1][REASON_HEADER] for m in queues.drain(queues.dead)] == [
        "unknown user", "no user; no emails", "foreign"]


def test_list_of_an_empty_or_missing_queue(queues: Queues, tmp_path: Path) -> None:
    done = mailhub(queues.config(tmp_path), "list")
    assert (done.returncode, done.stdout) == (0, "no dead letters in queue %s\n" % queues.dead)


def test_show_prints_reason_properties_and_body(queues: Queues, tmp_path: Path) -> None:
    fill(queues)
    done = mailhub(queues.config(tmp_path), "show", "bbbbbbbbbbbb")
    assert done.returncode == 0, done.stderr
    assert "reason:   no user; no emails\n" in done.stdout
    assert '"message-id": "m-no user; no emails"' in done.stdout
    assert '"emails": []' in done.stdout
    assert queues.count(queues.dead) == 3
    missing = mailhub(queues.config(tmp_path), "show", "nonesuch")
    assert missing.returncode == 1 and "no dead letter nonesuch" in missing.stderr


def test_replay_one_publishes_it_to_the_work_queue_then_removes_it(
        queues: Queues, tmp_path: Path) -> None:
    fill(queues)
    done = mailhub(queues.config(tmp_path), "replay", "bbbbbbbbbbbb")
    assert (done.returncode, done.stdout) == (0, "replayed bbbbbbbbbbbb\n"), done.stderr
    [(body, headers, properties)] = queues.drain(queues.queue)
    assert body == {"emails": []}
    # Its own properties kept, the dead-letter headers gone.
    assert headers == {"origin": "james"}
    assert properties.message_id == "m-no user; no emails"
    assert properties.delivery_mode == 2
    # The others stay, in their order.
    assert [m[1][REASON_HEADER] for m in queues.drain(queues.dead)] == [
        "unknown user", "foreign"]


def test_replay_all_and_drop_all(queues: Queues, tmp_path: Path) -> None:
    fill(queues)
    config = queues.config(tmp_path)
    done = mailhub(config, "replay", "--all")
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("replayed 3 dead letters\n")
    assert queues.count(queues.dead) == 0
    assert [m[0].get("userId") or m[0].get("userEmail") for m in queues.drain(queues.queue)] \
        == ["ann@example.org", None, "u3"]
    fill(queues)
    done = mailhub(config, "drop", "--all")
    assert done.returncode == 0 and done.stdout.endswith("dropped 3 dead letters\n")
    assert queues.count(queues.dead) == 0 and queues.count(queues.queue) == 0


def test_drop_one(queues: Queues, tmp_path: Path) -> None:
    fill(queues)
    done = mailhub(queues.config(tmp_path), "drop", "aaaaaaaaaaaa")
    assert (done.returncode, done.stdout) == (0, "dropped aaaaaaaaaaaa\n")
    assert [m[1][REASON_HEADER] for m in queues.drain(queues.dead)] == [
        "no user; no emails", "foreign"]
    assert queues.count(queues.queue) == 0


def test_replay_refuses_when_the_work_queue_is_missing(queues: Queues, tmp_path: Path) -> None:
    fill(queues)
    queues.channel.queue_delete(queues.queue)
    done = mailhub(queues.config(tmp_path), "replay", "aaaaaaaaaaaa")
    assert done.returncode == 1 and "does not exist" in done.stderr
    assert queues.count(queues.dead) == 3


def test_an_unreachable_broker_is_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "m.ini"
    path.write_text("[amqp]\nurl = amqp://guest:guest@127.0.0.1:1/\n")
    done = mailhub(str(path), "list")
    assert done.returncode == 2 and "cannot reach RabbitMQ" in done.stderr


class InterruptedTests(TestCase):
    """A command cut off while it holds the letters loses and reorders nothing."""

    def setUp(self) -> None:
        self.queues = Queues()
        self.addCleanup(self.queues.delete)

    def test_letters_held_by_a_cut_connection_come_back_in_order(self) -> Deferred[None]:
        fill(self.queues)

        async def run() -> None:
            broker = BrokerDeadLetters(reactor, URL, DEFAULT_SPEC, self.queues.dead,
                                       self.queues.queue)
            await broker.open()
            letters = await broker.read()
            assert [letter.reason for letter in letters] == [
                "unknown user", "no user; no emails", "foreign"]
            closed = broker.client.disconnected.wait()
            broker.client.transport.abortConnection()  # killed: no nack, no close
            await closed
            # The broker requeues them once it notices the connection gone.
            deadline = reactor.seconds() + 20
            while self.queues.count(self.queues.dead) < 3 and reactor.seconds() < deadline:
                await deferLater(reactor, 0.05, lambda: None)

        await_run = ensureDeferred(run())

        def check(_: Any) -> None:
            self.assertEqual([m[1][REASON_HEADER] for m in self.queues.drain(self.queues.dead)],
                             ["unknown user", "no user; no emails", "foreign"])
            self.assertEqual(self.queues.count(self.queues.queue), 0)

        return await_run.addCallback(check)


class ServerTests(TestCase):
    """Dead letters made by mailhub's own WorkQueue: counted by the server's
    watch, and a replayed one consumed again by the running queue."""

    timeout = 60

    def setUp(self) -> None:
        self.queues = Queues()
        self.addCleanup(self.queues.delete)
        self.addCleanup(lambda: self.queues.channel.exchange_delete(self.queues.queue))

    def test_the_watch_counts_and_a_replay_is_collected(self) -> Deferred[None]:
        return ensureDeferred(self._scenario())

    async def _scenario(self) -> None:
        from mailhub.config import load
        from mailhub.errors import ValidationError
        from mailhub.metrics import Metrics
        from mailhub.pubsub.connection import Broker
        from mailhub.pubsub.deadletters import GAUGE, dead_letter_watch
        from mailhub.pubsub.workqueue import WorkQueue

        metrics = Metrics()
        broker = Broker(reactor, URL, DEFAULT_SPEC, heartbeat=5, metrics=metrics,
                        connection_name=unique("conn"), retry_policy=lambda n: 0.1)
        broker.startService()
        self.addCleanup(broker.stopService)
        queue = WorkQueue(broker.outbox, self.queues.queue, reactor, retry_initial=0.05,
                          retry_max=0.2, metrics=metrics, broker=broker)
        self.addCleanup(queue.stop)
        collected: list[bytes] = []
        fixed = [False]

        def handle(body: bytes) -> None:
            if not fixed[0]:
                raise ValidationError(["unknown user"])
            collected.append(body)

        queue.consume(handle)
        await broker.when_connected()
        for n in range(2):
            await queue.publish({"userEmail": "u%d@example.org" % n, "emails": ["a@b.org"]})

        async def until(check: Any) -> None:
            deadline = reactor.seconds() + 20
            while not check():
                if reactor.seconds() > deadline:
                    raise AssertionError("timed out waiting for %r" % check)
                await deferLater(reactor, 0.05, lambda: None)

        await until(lambda: self.queues.count(self.queues.dead) == 2)
        watch = dead_letter_watch(load(None), queue, broker, metrics, reactor)
        await watch.refresh()
        self.assertEqual(metrics.value(GAUGE), 2)

        fixed[0] = True
        tool = BrokerDeadLetters(reactor, URL, DEFAULT_SPEC, self.queues.dead, self.queues.queue)
        await tool.open()
        try:
            letters = await tool.read()
            self.assertEqual([letter.reason for letter in letters], ["unknown user"] * 2)
            self.assertEqual([letter.summary() for letter in letters],
                             ["user=u0@example.org addresses=1",
                              "user=u1@example.org addresses=1"])
            await tool.replay(letters[1])
        finally:
            await tool.close()
        await until(lambda: len(collected) == 1)
        self.assertEqual(json.loads(collected[0])["userEmail"], "u1@example.org")
        await watch.refresh()
        self.assertEqual(metrics.value(GAUGE), 1)
