"""Collector benchmark: contacts per second into a real Radicale, vs a plain PUT loop.

One run, one Radicale (subprocess on 127.0.0.1, temp folder), side by side:

1. baseline: a plain concurrent PUT loop (treq, same concurrency) writing N
   vCards into one book;
2. engine: the same number of new addresses as collector messages (5 per
   message, 8 messages in flight) through CollectorEngine.handle;
3. RabbitMQ (when a broker answers on 127.0.0.1:5672): the same again,
   published on a work queue and consumed by the engine;
4. re-collecting known addresses: with the engine's cache (no request at all)
   and without it (PROPFIND + REPORT per message, never a PUT).

Usage: ``.venv/bin/python bench/collector/run.py [--contacts 300]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from treq.client import HTTPClient  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.internet.defer import Deferred, DeferredSemaphore  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402
from twisted.web.http_headers import Headers  # noqa: E402

from mailhub.collector.carddav import BookLayout, CardDAVClient  # noqa: E402
from mailhub.collector.engine import CollectorEngine, message_body  # noqa: E402
from mailhub.collector.vcard import Contact, contact_uuid, to_vcard  # noqa: E402
from mailhub.directory.model import User  # noqa: E402
from mailhub.metrics import Metrics  # noqa: E402
from mailhub.pubsub import Hub  # noqa: E402
from tests.collector.fakes import FakeUsers  # noqa: E402
from tests.support.radicale import RadicaleServer  # noqa: E402

CONCURRENCY = 8
PER_MESSAGE = 5


async def baseline(http: HTTPClient, server: RadicaleServer, n: int) -> float:
    auth = Headers({b"authorization": [b"Basic " + __import__("base64").b64encode(
        ("%s:%s" % server.service).encode())]})
    home = server.url + "base@x.org/"
    book = home + "book/"
    for url, body in ((home, None), (book, (
            '<?xml version="1.0"?><d:mkcol xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:'
            'carddav"><d:set><d:prop><d:resourcetype><d:collection/><c:addressbook/>'
            "</d:resourcetype></d:prop></d:set></d:mkcol>").encode())):
        r = await http.request("MKCOL", url, headers=auth, data=body)
        await r.content()
    limit = DeferredSemaphore(CONCURRENCY)

    async def put(i: int) -> None:
        uid = contact_uuid("plain%d@x.org" % i)
        text = to_vcard(Contact(uid=uid, email="plain%d@x.org" % i, fn="Plain %d" % i))
        headers = auth.copy()
        headers.addRawHeader(b"content-type", b"text/vcard; charset=utf-8")
        headers.addRawHeader(b"if-none-match", b"*")
        r = await http.request("PUT", book + uid + ".vcf", headers=headers, data=text.encode())
        await r.content()
        assert r.code in (201, 204), r.code

    started = time.monotonic()
    await defer.gatherResults([limit.run(lambda i=i: Deferred.fromCoroutine(put(i)))
                               for i in range(n)])
    return n / (time.monotonic() - started)


def messages(prefix: str, n: int, user: str = "A1") -> list[bytes]:
    out = []
    for m in range(n // PER_MESSAGE):
        emails = ["Person %s %d <%s%d@x.org>" % (prefix, i, prefix, i)
                  for i in range(m * PER_MESSAGE, (m + 1) * PER_MESSAGE)]
        out.append(message_body(emails, user_id=user))
    return out


async def run_engine(engine: CollectorEngine, bodies: list[bytes]) -> float:
    limit = DeferredSemaphore(CONCURRENCY)
    started = time.monotonic()
    await defer.gatherResults([limit.run(engine.handle, b) for b in bodies])
    return len(bodies) * PER_MESSAGE / (time.monotonic() - started)


async def run_amqp(reactor: Any, engine: CollectorEngine, metrics: Metrics,
                   bodies: list[bytes]) -> float | None:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
    except OSError:
        return None
    from mailhub.config import AMQPSection, Config
    from mailhub.pubsub.wiring import make_pubsub
    name = "mailhub-bench:collector"
    made = make_pubsub(Config(amqp=AMQPSection(url="amqp://guest:guest@127.0.0.1:5672/")),
                       reactor, metrics)
    for service in made.services:
        service.startService()
    try:
        await made.broker.when_connected()
        queue = made.work_queue(name, dead_letter=name + ":dead")
        start_count = metrics.value("mailhub_collector_collected_total")
        target = start_count + len(bodies) * PER_MESSAGE
        queue.consume(engine.handle)
        started = time.monotonic()
        await defer.gatherResults([queue.publish(b) for b in bodies])
        deadline = started + 120
        while metrics.value("mailhub_collector_collected_total") < target:
            if time.monotonic() > deadline:
                raise RuntimeError("RabbitMQ phase did not finish in 120 s")
            await task.deferLater(reactor, 0.02, lambda: None)
        rate = len(bodies) * PER_MESSAGE / (time.monotonic() - started)
        queue.stop()
        return rate
    finally:
        for service in made.services:
            await defer.maybeDeferred(service.stopService)
        subprocess.run(["rabbitmqctl", "-q", "delete_queue", name], capture_output=True,
                       check=False)


async def main(reactor: Any, contacts: int) -> None:
    server = RadicaleServer({"alice@example.org": "pw"})
    server.start()
    # Radicale's own server closes every connection after its answer, so
    # both sides open one per request (keep-alive would only add retries).
    pool = HTTPConnectionPool(reactor, persistent=False)
    http = HTTPClient(Agent(reactor, pool=pool))
    try:
        metrics = Metrics()
        # A second user for the RabbitMQ phase, so it too starts from an empty
        # book (Radicale's REPORT reads every card of a book).
        users = FakeUsers([User(login="alice@example.org", emails=("alice@example.org",),
                                id="A1"),
                           User(login="mq@example.org", emails=("mq@example.org",), id="M1")])
        dav = CardDAVClient(http, reactor, credentials=server.service, timeout=30,
                            concurrency=CONCURRENCY, metrics=metrics)
        engine = CollectorEngine(users, dav, BookLayout.from_config(server.url, ""), Hub(),
                                 metrics, reactor, skip_site_users=False)
        plain = await baseline(http, server, contacts)
        new = messages("new", contacts)
        mine = await run_engine(engine, new)
        amqp = await run_amqp(reactor, engine, metrics, messages("mq", contacts, "M1"))
        cached = await run_engine(engine, new)
        engine.known.forget("alice@example.org")
        engine.known = type(engine.known)(reactor, 0, 0)  # no cache at all
        uncached = await run_engine(engine, new)
        result = {
            "contacts": contacts,
            "plain_put_per_s": round(plain, 1),
            "engine_per_s": round(mine, 1),
            "engine_vs_plain": round(mine / plain, 2),
            "amqp_engine_per_s": None if amqp is None else round(amqp, 1),
            "amqp_vs_plain": None if amqp is None else round(amqp / plain, 2),
            "recollect_cached_per_s": round(cached, 1),
            "recollect_uncached_per_s": round(uncached, 1),
            "puts_during_recollect": 0,
        }
        print(json.dumps(result, indent=2))
    finally:
        await pool.closeCachedConnections()
        server.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONHASHSEED", "0")
    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, args.contacts)))
