"""Every topic of the catalogue can be watched from outside before mailhub publishes on it.

A real ``twistd mailhub`` connects to the real RabbitMQ (a virtual host of
the test's own); as soon as ``/healthz`` says the broker is up, a peer (pika,
not mailhub's txamqp) binds a queue to each topic of doc/pubsub.rst's topic
catalogue. Without the declarations at start each bind would be refused with
``404 NOT_FOUND`` until mailhub's first publication on that topic. Then a
publication made through the hooks reaches the peer's queue.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from mailhub.events import PUBLISHED_TOPICS
from mailhub.push.events import TOPICS as PUSH_TOPICS
from tests.support.amqp_peer import VirtualHost, _pika
from tests.support.process import Mailhub
from tests.support.rabbitmq import HOST, PORT

DOC = Path(__file__).resolve().parents[2] / "doc" / "pubsub.rst"
MAILBOX_TOPICS = [t for t in PUSH_TOPICS if t.startswith("mailbox:")]


def catalogue_of_the_doc() -> list[str]:
    """The topics named in the first column of doc/pubsub.rst's topic catalogue."""
    text = DOC.read_text()
    table = text[text.index("Topic catalogue"):text.index("Topics mailhub consumes")]
    topics: list[str] = []
    for row in re.findall(r"^   \* - (.+)$", table, re.M)[1:]:  # [0] is the header
        for name in re.findall(r"``([^`]+)``", row):
            topics.extend(MAILBOX_TOPICS if name == "mailbox:*" else [name])
    return topics


def test_the_code_declares_the_catalogue_of_the_doc() -> None:
    assert sorted(catalogue_of_the_doc()) == sorted(PUBLISHED_TOPICS)


def test_an_outside_client_binds_to_every_topic_before_any_publication(
        tmp_path: Path) -> None:
    pika = _pika()
    vhost = VirtualHost().create()
    try:
        config = "[amqp]\nurl = %s\n" % vhost.url
        with Mailhub(tmp_path, config) as mailhub:
            deadline = time.monotonic() + 30
            while True:
                _, health = mailhub.get("/healthz")
                if health["dependencies"]["amqp"]["ok"] or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert health["dependencies"]["amqp"]["ok"], health
            connection = pika.BlockingConnection(pika.ConnectionParameters(
                host=HOST, port=PORT, virtual_host=vhost.name,
                credentials=pika.PlainCredentials("guest", "guest"), heartbeat=0))
            try:
                channel = connection.channel()
                queue = channel.queue_declare("", exclusive=True).method.queue
                for topic in PUBLISHED_TOPICS:
                    # Refused with 404 NOT_FOUND (closing the channel) when
                    # the exchange does not exist.
                    channel.queue_bind(queue, topic)
                publish_a_member(mailhub, tmp_path)
                seen: list[dict[str, str]] = []
                deadline = time.monotonic() + 20
                while not any(m.get("groupId") == "watched" for m in seen):
                    assert time.monotonic() < deadline, seen
                    method, _, body = channel.basic_get(queue, auto_ack=True)
                    if body is None:
                        time.sleep(0.1)
                    else:
                        seen.append(json.loads(body))
            finally:
                connection.close()
    finally:
        vhost.delete()


def publish_a_member(mailhub: Mailhub, folder: Path) -> None:
    """Make mailhub publish ``profile:created`` and ``member:added``, through the hooks."""
    cli = str(Path(sys.executable).with_name("mailhub"))

    def run(*args: str) -> str:
        return subprocess.run([cli, *args, "--config", str(folder / "mailhub.ini")],
                              cwd=folder, capture_output=True, text=True, timeout=60,
                              check=True).stdout

    token = run("token", "create").splitlines()[1]
    run("group", "add", "watched", "--name", "Watched")
    status, answer = mailhub.post_form(
        "/gs-group-member-add.json",
        "token=%s&groupId=watched&email=w%%40example.org&fn=W&add" % token)
    assert status == 200, answer
    assert answer["status"] == 0, answer


def test_the_exchanges_are_declared_as_openpaas_declares_them(tmp_path: Path) -> None:
    """Durable fanout: a passive declaration finds them, an OpenPaaS-style one matches."""
    pika = _pika()
    vhost = VirtualHost().create()
    try:
        with Mailhub(tmp_path, "[amqp]\nurl = %s\n" % vhost.url) as mailhub:
            deadline = time.monotonic() + 30
            while not mailhub.get("/healthz")[1]["dependencies"]["amqp"]["ok"]:
                assert time.monotonic() < deadline, "the broker never came up"
                time.sleep(0.2)
            connection = pika.BlockingConnection(pika.ConnectionParameters(
                host=HOST, port=PORT, virtual_host=vhost.name,
                credentials=pika.PlainCredentials("guest", "guest"), heartbeat=0))
            try:
                channel = connection.channel()
                for topic in PUBLISHED_TOPICS:
                    channel.exchange_declare(topic, passive=True)
                    # amqplib's assertExchange(name, 'fanout'): a 406 would close the channel.
                    channel.exchange_declare(topic, "fanout", durable=True)
            finally:
                connection.close()
    finally:
        vhost.delete()
