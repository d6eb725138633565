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


class RawClient:
    """txamqp used directly, as a third-party AMQP peer (an OpenPaaS node) would."""

    def __init__(self, client: AMQClient, channel: Any) -> None:
        self.client = client
        self.channel = channel

    @classmethod
    async def connect(cls, reactor: Any) -> "RawClient":
        from mailhub.pubsub.amqp import load_spec

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
