#!/usr/bin/env python3
"""Benchmark: confirmed publishes per second, mailhub's GlobalPubSub vs raw txamqp.

Both sides publish the same payload the same way (JSON-encoded per
publication as ESN does, content-type application/json, persistent) with
publisher confirms, to a durable fanout exchange with one exclusive queue bound (as one
ESN subscriber), keeping the same number of unconfirmed publications in
flight (the window). Each round runs both sides back to back (alternating
which goes first) on one RabbitMQ; the median of the rounds' ratios is the
figure that holds on a busy machine, printed with each side's best and median.

    .venv/bin/python bench/pubsub/run.py [--count 5000] [--window 500] [--rounds 8]
        [--url amqp://guest:guest@127.0.0.1:5672/]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol  # noqa: E402
from txamqp.client import TwistedDelegate  # noqa: E402
from txamqp.content import Content  # noqa: E402
from txamqp.protocol import AMQClient  # noqa: E402

from mailhub.config import DEFAULT_SPEC  # noqa: E402
from mailhub.metrics import Metrics  # noqa: E402
from mailhub.pubsub.connection import (  # noqa: E402
    JSON_PROPERTIES, Broker, BrokerAddress, load_spec)
from mailhub.pubsub.globalpubsub import GlobalPubSub  # noqa: E402

DATA = {"user": "alice@example.org", "event": "messageNew", "folder": "INBOX",
        "imap-uidvalidity": 1700000000, "imap-uid": 42, "from": "bob@example.org",
        "subject": "Lunch?", "snippet": "Shall we meet at noon?", "unseen": 1}


class ConfirmDelegate(TwistedDelegate):
    """txamqp's delegate plus basic.ack: what any raw confirm user must write."""

    def basic_ack(self, ch: Any, msg: Any) -> None:
        self.on_ack(msg.delivery_tag, msg.multiple)


class RawPublisher:
    """Plain txamqp with confirms: the baseline."""

    def __init__(self, client: AMQClient, channel: Any, exchange: str) -> None:
        self.client = client
        self.channel = channel
        self.exchange = exchange
        self.tag = 0
        self.pending: dict[int, Deferred[None]] = {}
        client.delegate.on_ack = self.ack

    @classmethod
    async def connect(cls, reactor: Any, url: str, exchange: str) -> "RawPublisher":
        address = BrokerAddress.from_url(url)
        client = AMQClient(ConfirmDelegate(), address.vhost, load_spec(DEFAULT_SPEC),
                           heartbeat=0, clock=reactor)
        await connectProtocol(TCP4ClientEndpoint(reactor, address.host, address.port), client)
        await client.authenticate(address.username, address.password, mechanism="PLAIN")
        channel = await client.channel(1)
        await channel.channel_open()
        await channel.confirm_select()
        await channel.exchange_declare(exchange=exchange, type="fanout", durable=True)
        return cls(client, channel, exchange)

    def publish(self, data: Any) -> Deferred[None]:
        # What any ESN-compatible publisher does: encode the payload as JSON.
        body = json.dumps(data).encode("utf-8")
        self.tag += 1
        d: Deferred[None] = Deferred()
        self.pending[self.tag] = d
        self.channel.basic_publish(exchange=self.exchange, routing_key="",
                                   content=Content(body, properties=dict(JSON_PROPERTIES)))
        return d

    def ack(self, tag: int, multiple: bool) -> None:
        tags = [t for t in self.pending if t <= tag] if multiple else [tag]
        for t in tags:
            d = self.pending.pop(t, None)
            if d is not None:
                d.callback(None)


async def timed(publish: Callable[[], Deferred[None]], count: int, window: int) -> float:
    """Publications per second, keeping ``window`` unconfirmed at most."""
    semaphore = DeferredSemaphore(window)
    waits = []
    start = time.perf_counter()
    for _ in range(count):
        await semaphore.acquire()
        d = publish()
        d.addBoth(lambda r: (semaphore.release(), r)[1])
        waits.append(d)
    await gatherResults(waits)
    return count / (time.perf_counter() - start)


async def main(reactor: Any, args: argparse.Namespace) -> None:
    tag = uuid.uuid4().hex[:8]
    raw_exchange = "mailhub-bench:raw:" + tag
    hub_exchange = "mailhub-bench:mailhub:" + tag
    body = json.dumps(DATA, separators=(",", ":")).encode()

    raw = await RawPublisher.connect(reactor, args.url, raw_exchange)
    broker = Broker(reactor, args.url, DEFAULT_SPEC, outbox=args.window * 2,
                    metrics=Metrics(), connection_name="mailhub-bench " + tag)
    broker.startService()
    await broker.when_connected()
    pubsub = GlobalPubSub(broker)
    # One subscriber queue on each exchange, as one ESN node would have.
    for exchange in (raw_exchange, hub_exchange):
        await raw.channel.exchange_declare(exchange=exchange, type="fanout", durable=True)
        q = await raw.channel.queue_declare(queue="", exclusive=True, auto_delete=True)
        await raw.channel.queue_bind(queue=q.queue, exchange=exchange, routing_key="")
    topic = pubsub.topic(hub_exchange)

    # Warm up both paths (declarations, JIT-free but cache-warm Python).
    await timed(lambda: raw.publish(DATA), 500, args.window)
    await timed(lambda: topic.publish(DATA), 500, args.window)

    raw_rates, hub_rates, ratios = [], [], []
    for round_ in range(args.rounds):
        # Alternate which side goes first, and pair each round's two runs:
        # the load of a shared machine drifts less within a pair.
        if round_ % 2 == 0:
            raw_rate = await timed(lambda: raw.publish(DATA), args.count, args.window)
            hub_rate = await timed(lambda: topic.publish(DATA), args.count, args.window)
        else:
            hub_rate = await timed(lambda: topic.publish(DATA), args.count, args.window)
            raw_rate = await timed(lambda: raw.publish(DATA), args.count, args.window)
        raw_rates.append(raw_rate)
        hub_rates.append(hub_rate)
        ratios.append(hub_rate / raw_rate)
        print("round %d: raw txamqp %.0f/s, mailhub %.0f/s, ratio %.2f"
              % (round_ + 1, raw_rate, hub_rate, ratios[-1]), flush=True)

    for exchange in (raw_exchange, hub_exchange):
        await raw.channel.exchange_delete(exchange=exchange)
    await raw.client.close(within=2)
    await broker.stopService()

    print("messages: %d per side per round, window %d, %d rounds, body %d bytes"
          % (args.count, args.window, args.rounds, len(body)))
    print("raw txamqp + confirms : %8.0f publishes/s (best round), %.0f (median)"
          % (max(raw_rates), statistics.median(raw_rates)))
    print("mailhub GlobalPubSub  : %8.0f publishes/s (best round), %.0f (median)"
          % (max(hub_rates), statistics.median(hub_rates)))
    print("ratio mailhub/raw     : %8.2f (median of the rounds' ratios), %.2f (best/best)"
          % (statistics.median(ratios), max(hub_rates) / max(raw_rates)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    arguments = parser.parse_args()
    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, arguments)))
