"""A blocking AMQP peer (pika) for end-to-end tests that drive ``twistd mailhub``.

It plays the part of OpenPaaS or Apache James' ``AmqpForwardAttribute``
mailet: it publishes ``collector:email`` messages to the fanout exchange,
persistently and with publisher confirms, and reads what mailhub
dead-lettered. It is a separate client library from mailhub's own (txamqp), so
the tests check the wire layout, not mailhub against itself.

Isolation: global topics have fixed names (``calendar:event:created``...), and
mailhub's collector turns what arrives on them into collector messages, so a
test sharing the broker's default vhost with other test runs could collect
their events. :class:`VirtualHost` gives the tests a vhost of their own
(created and deleted with ``rabbitmqctl``); on top of that every test uses
queue names that no other test uses (:func:`tests.support.rabbitmq.unique`),
removed by :meth:`WorkQueuePeer.delete`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from typing import Any
from urllib.parse import quote

import pytest

from tests.support.rabbitmq import HOST, PORT, _rabbitmqctl, require_rabbitmq, unique


def _pika() -> Any:
    try:
        import pika
    except ImportError:
        pytest.skip("pika is not installed (pip install pika; it is in the test extras)")
    return pika


class VirtualHost:
    """A RabbitMQ vhost that only these tests use, with guest allowed everything in it."""

    def __init__(self) -> None:
        require_rabbitmq()
        self.name = "mailhub-test-%s" % uuid.uuid4().hex[:12]
        self.url = "amqp://guest:guest@%s:%d/%s" % (HOST, PORT, quote(self.name, safe=""))
        self._ctl = _rabbitmqctl()

    def _run(self, *args: str) -> None:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": os.environ.get("HOME", "/root")}
        done = subprocess.run([self._ctl, "-q", *args], capture_output=True, text=True,
                              timeout=60, env=env)
        if done.returncode != 0:
            pytest.skip("rabbitmqctl %s failed: %s" % (args[0], done.stderr.strip()))

    def create(self) -> "VirtualHost":
        self._run("add_vhost", self.name)
        self._run("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        return self

    def delete(self) -> None:
        """Delete the vhost and everything in it (queues, exchanges)."""
        self._run("delete_vhost", self.name)


class WorkQueuePeer:
    """A connection to RabbitMQ with one work queue's names: ``queue`` and ``dead_letter``."""

    def __init__(self, vhost: str = "/", prefix: str = "collector") -> None:
        require_rabbitmq()
        self.pika = _pika()
        self.queue = unique(prefix)
        self.dead_letter = self.queue + ":dead"
        parameters = self.pika.ConnectionParameters(
            host=HOST, port=PORT, virtual_host=vhost,
            credentials=self.pika.PlainCredentials("guest", "guest"),
            heartbeat=0, client_properties={"connection_name": self.queue + " test peer"})
        self.connection = self.pika.BlockingConnection(parameters)
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        # What OpenPaaS declares, and what mailhub declares too (same
        # arguments, so whoever comes first wins and nothing conflicts):
        # a durable fanout exchange and a durable queue with its name.
        self.channel.exchange_declare(self.queue, exchange_type="fanout", durable=True)
        self.channel.queue_declare(self.queue, durable=True)
        self.channel.queue_bind(self.queue, self.queue, routing_key="")

    def publish(self, message: Any) -> None:
        """Publish one message (bytes as they are, anything else as JSON), persistent, confirmed.

        ``mandatory`` makes an unroutable message an error rather than a loss.
        """
        body = message if isinstance(message, bytes) else json.dumps(message).encode("utf-8")
        self.channel.basic_publish(
            exchange=self.queue, routing_key="", body=body, mandatory=True,
            properties=self.pika.BasicProperties(content_type="application/json",
                                                 delivery_mode=2))

    def ready(self, queue: str | None = None) -> tuple[int, int]:
        """(messages ready, consumers) of a queue, from a passive declare."""
        reply = self.channel.queue_declare(queue or self.queue, passive=True)
        return reply.method.message_count, reply.method.consumer_count

    def wait_consumers(self, count: int, timeout: float = 20.0) -> None:
        """Wait until ``count`` consumers are on the work queue."""
        deadline = time.monotonic() + timeout
        while self.ready()[1] < count:
            if time.monotonic() > deadline:
                raise AssertionError("%d consumers expected on %s, got %d"
                                     % (count, self.queue, self.ready()[1]))
            time.sleep(0.05)

    def dead_letters(self, count: int,
                     timeout: float = 20.0) -> list[tuple[bytes, dict[str, Any]]]:
        """Take ``count`` messages off the dead-letter queue: (body, headers) each."""
        found: list[tuple[bytes, dict[str, Any]]] = []
        deadline = time.monotonic() + timeout
        while len(found) < count:
            try:
                method, properties, body = self.channel.basic_get(self.dead_letter, auto_ack=True)
            except self.pika.exceptions.ChannelClosedByBroker:  # not declared yet
                self.channel = self.connection.channel()
                method = None
            if method is not None:
                found.append((body, dict(properties.headers or {})))
                continue
            if time.monotonic() > deadline:
                raise AssertionError("%d dead letters expected on %s, got %d: %r"
                                     % (count, self.dead_letter, len(found), found))
            time.sleep(0.05)
        return found

    def delete(self) -> None:
        """Remove the queues and the exchange, and close the connection."""
        try:
            if self.channel.is_closed:
                self.channel = self.connection.channel()
            self.channel.queue_delete(self.queue)
            self.channel.queue_delete(self.dead_letter)
            self.channel.exchange_delete(self.queue)
        finally:
            self.connection.close()
