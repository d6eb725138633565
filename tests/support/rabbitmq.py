"""RabbitMQ for integration tests: reachability, unique names, cutting connections.

Tests use names that no other test (or helper running tests at the same time)
uses, delete what they declared, and cut only their own connections, found by
the ``connection_name`` client property that mailhub sends.
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from txamqp.client import TwistedDelegate
from txamqp.content import Content
from txamqp.protocol import AMQClient
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from mailhub.config import DEFAULT_SPEC
from tests.support.require import require_port

HOST = "127.0.0.1"
PORT = 5672
URL = "amqp://guest:guest@%s:%d/" % (HOST, PORT)


def require_rabbitmq() -> None:
    """Skip the test unless RabbitMQ listens on 127.0.0.1:5672 and the spec exists."""
    require_port(HOST, PORT, "RabbitMQ")
    if not os.path.isfile(DEFAULT_SPEC):
        pytest.skip("Debian's amqp-specs is not installed (%s)" % DEFAULT_SPEC)


def unique(prefix: str = "test") -> str:
    """A name for an exchange, queue or connection that no one else uses."""
    return "mailhub-test:%s:%s" % (prefix, uuid.uuid4().hex[:12])


def _rabbitmqctl() -> str:
    found = shutil.which("rabbitmqctl") or (
        "/usr/sbin/rabbitmqctl" if os.path.exists("/usr/sbin/rabbitmqctl") else None)
    if found is None:
        pytest.skip("rabbitmqctl is not installed (it comes with rabbitmq-server)")
    assert found is not None
    return found


async def close_connections(name: str) -> int:
    """Have the broker close every connection named ``name``; how many it closed."""
    ctl = _rabbitmqctl()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": os.environ.get("HOME", "/root")}
    out, err, code = await getProcessOutputAndValue(
        ctl, ["list_connections", "-q", "--no-table-headers", "pid", "client_properties"],
        env=env)
    if code != 0:
        pytest.skip("rabbitmqctl list_connections failed: %s" % err.decode(errors="replace"))
    closed = 0
    needle = '{"connection_name","%s"}' % name
    for line in out.decode().splitlines():
        if needle in line:
            pid = line.split("\t", 1)[0]
            _, _, code = await getProcessOutputAndValue(
                ctl, ["close_connection", pid, "mailhub test cuts the connection"], env=env)
            if code == 0:
                closed += 1
    return closed


async def _listing(what: str, *columns: str) -> list[list[str]]:
    """``rabbitmqctl list_<what>`` of the default virtual host: one row of columns a line."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": os.environ.get("HOME", "/root")}
    out, err, code = await getProcessOutputAndValue(
        _rabbitmqctl(), ["list_" + what, "-q", "--no-table-headers", *columns], env=env)
    if code != 0:
        pytest.skip("rabbitmqctl list_%s failed: %s" % (what, err.decode(errors="replace")))
    return [line.split("\t") for line in out.decode().splitlines() if line.strip()]


async def bound_queues(exchange: str) -> list[str]:
    """The queues the broker routes ``exchange``'s messages to now."""
    rows = await _listing("bindings", "source_name", "destination_name", "destination_kind")
    return sorted(row[1] for row in rows if len(row) == 3 and row[0] == exchange
                  and row[2] == "queue")


async def unsettled(queue: str) -> int:
    """Messages of ``queue`` still ready or delivered but not acknowledged.

    Once it is 0 (and nothing more is published) no consumer can get another
    message from ``queue``: what proves that nothing else will arrive,
    without waiting a while to see.
    """
    for row in await _listing("queues", "name", "messages_ready", "messages_unacknowledged"):
        if len(row) == 3 and row[0] == queue:
            return int(row[1]) + int(row[2])
    raise AssertionError("no queue %s on the broker" % queue)


async def settled(queue: str, timeout: float = 20.0) -> None:
    """Wait until every message of ``queue`` is acknowledged (:func:`unsettled` is 0)."""
    from twisted.internet import reactor

    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
    while (left := await unsettled(queue)) != 0:
        if reactor.seconds() > deadline:  # type: ignore[attr-defined]
            raise AssertionError("%d messages of %s still unacknowledged" % (left, queue))
        await deferLater(reactor, 0.05, lambda: None)


class RawClient:
    """txamqp used directly, as a third-party AMQP peer (an OpenPaaS node) would."""

    def __init__(self, client: AMQClient, channel: Any) -> None:
        self.client = client
        self.channel = channel

    @classmethod
    async def connect(cls, reactor: Any) -> "RawClient":
        from mailhub.pubsub.connection import load_spec

        delegate = TwistedDelegate()
        client = AMQClient(delegate, "/", load_spec(DEFAULT_SPEC), heartbeat=0, clock=reactor)
        await connectProtocol(TCP4ClientEndpoint(reactor, HOST, PORT), client)
        await client.authenticate("guest", "guest", mechanism="PLAIN")
        channel = await client.channel(1)
        await channel.channel_open()
        return cls(client, channel)

    async def subscribe_like_esn(self, topic: str) -> Any:
        """ESN's subscribe: fanout exchange, server-named exclusive queue; a queue of messages."""
        await self.channel.exchange_declare(exchange=topic, type="fanout", durable=True)
        reply = await self.channel.queue_declare(queue="", exclusive=True, auto_delete=True)
        await self.channel.queue_bind(queue=reply.queue, exchange=topic, routing_key="")
        consume = await self.channel.basic_consume(queue=reply.queue, no_ack=True)
        return await self.client.queue(consume.consumer_tag)

    async def publish_like_esn(self, topic: str, body: bytes) -> None:
        """ESN's publish: assert the fanout exchange, publish with routing key ''."""
        await self.channel.exchange_declare(exchange=topic, type="fanout", durable=True)
        self.channel.basic_publish(exchange=topic, routing_key="", content=Content(body))

    async def get(self, queue: str) -> Any:
        """basic.get one message (None when the queue is empty)."""
        reply = await self.channel.basic_get(queue=queue, no_ack=True)
        if reply.method.name == "get-empty":
            return None
        return reply

    async def delete(self, exchanges: list[str] = (), queues: list[str] = ()) -> None:  # type: ignore[assignment]
        for queue in queues:
            await self.channel.queue_delete(queue=queue)
        for exchange in exchanges:
            await self.channel.exchange_delete(exchange=exchange)

    async def close(self) -> None:
        d: Deferred[Any] = self.client.close(within=2)
        await d
