"""Collector benchmark: contacts per second into a real Radicale, vs a plain PUT loop.

One run, one Radicale (subprocess on 127.0.0.1, temp folder), side by side:

1. baseline: a plain concurrent PUT loop (treq, 8 requests in flight,
   ``If-None-Match: *`` like the engine's) writing N vCards into a new book;
2. engine: the same number of new addresses as collector messages (5 per
   message, 8 messages in flight, at most 8 requests in flight) through
   CollectorEngine.handle, into a new user's collected book;
3. RabbitMQ (when a broker answers on 127.0.0.1:5672): the same again,
   published on a work queue and consumed by the engine (prefetch 16);
4. re-collecting known addresses: with the engine's cache (one sync-collection of
   the collected book per batch of messages)
   and without it (lookups only, never a PUT: the PUTs are counted).

Phases 1-3 run ``--rounds`` times, alternating, each into fresh books, so a
change of load on a shared machine hits both sides; the ratios are given per
round and as medians. The engine's CardDAV requests per contact, by method,
say where any extra server work goes.

With ``--forget`` the engine has the per-user rules of issue 13 on
(:class:`~mailhub.collector.state.CollectorState` on a SQLite store in its own
thread pool, as the server has it): tombstones, opt-out and block list are
checked for every address, and the database reads made are reported
(``state_db_reads``: one per user, none per message).

With ``--book-sizes 100,1000,5000`` it measures instead books that already
hold that many cards, on the external and the embedded store
(``bench/collector/books.py``: ``--contacts`` new ones per size, 200 unless
given).

Usage: ``.venv/bin/python bench/collector/run.py [--contacts 400] [--rounds 3]
[--rank on|off] [--forget] [--book-sizes 100,1000,5000 [--stores external,embedded]
[--profile] [--item-cache hash|mtime]]`` (``[collector] rank``, on by default: new cards carry their
ranking, and a re-collected contact counts a use in memory; its card is
rewritten at most once a day, never within a run).
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
from mailhub.collector.state import CollectorState  # noqa: E402
from mailhub.directory.sql import StoreService  # noqa: E402
from mailhub.collector.engine import CollectorEngine, message_body  # noqa: E402
from mailhub.collector.vcard import Contact, contact_uuid, to_vcard  # noqa: E402
from mailhub.directory.model import User  # noqa: E402
from mailhub.metrics import Metrics  # noqa: E402
from mailhub.pubsub import Hub  # noqa: E402
from tests.collector.fakes import FakeUsers  # noqa: E402
from tests.support.radicale import RadicaleServer  # noqa: E402

CONCURRENCY = 8
PER_MESSAGE = 5


async def baseline(http: HTTPClient, server: RadicaleServer, n: int, owner: str) -> float:
    auth = Headers({b"authorization": [b"Basic " + __import__("base64").b64encode(
        ("%s:%s" % server.service).encode())]})
    home = server.url + owner + "@x.org/"
    book = home + "book/"
    # Timed from here: like the engine, the loop makes the home and the book.
    started = time.monotonic()
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

    await defer.gatherResults([limit.run(put, i) for i in range(n)])
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
        assert made.broker is not None, "an [amqp] url was given"
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


def requests_per_contact(metrics: Metrics, contacts: int) -> dict[str, float]:
    """CardDAV requests the engine made, by method, per contact written."""
    out = {}
    for family in metrics.registry.collect():
        if family.name != "mailhub_collector_carddav_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count") and sample.value:
                out[sample.labels["method"]] = round(sample.value / contacts, 3)
    return out


def syncs(metrics: Metrics) -> dict[str, float]:
    """sync-collection requests of the book copies, by kind (full reads, changes)."""
    return {kind: metrics.value("mailhub_collector_mirror_syncs_total", {"kind": kind})
            for kind in ("full", "changes")}


def server_cpu(server: RadicaleServer) -> float | None:
    """CPU seconds Radicale's process has used so far (Linux /proc; None elsewhere).

    The server is the bottleneck, so its CPU per contact says how much work
    each side gives it, whatever else runs on the machine.
    """
    try:
        assert server.process is not None
        with open("/proc/%d/stat" % server.process.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, AssertionError, ValueError, IndexError):
        return None


async def measured(server: RadicaleServer, cpu: list[float], work: Any) -> Any:
    """Await ``work``; append Radicale's CPU milliseconds spent meanwhile to ``cpu``."""
    before = server_cpu(server)
    result = await work
    after = server_cpu(server)
    if before is not None and after is not None:
        cpu.append(1000 * (after - before))
    return result


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


async def main(reactor: Any, contacts: int, rounds: int, rank: bool = True,
               forget: bool = False) -> None:
    server = RadicaleServer({"alice@example.org": "pw"})
    server.start()
    state: CollectorState | None = None
    database: StoreService | None = None
    if forget:
        database = StoreService("sqlite:///%s/bench.sqlite" % server.folder, "main", reactor)
        database.startService()
        await database.store.migrate()
        state = CollectorState(database.store, reactor)
    # Radicale's own server closes every connection after its answer, so
    # both sides open one per request (keep-alive would only add retries).
    pool = HTTPConnectionPool(reactor, persistent=False)
    http = HTTPClient(Agent(reactor, pool=pool))
    try:
        # Each round writes every phase into a fresh book of its own user
        # (Radicale's PUT and REPORT both cost more as a book grows), and the
        # phases alternate, so a load change on the machine hits both sides.
        users = FakeUsers([User(login="%s%d@example.org" % (who, r),
                                emails=("%s%d@example.org" % (who, r),), id="%s%d" % (who, r))
                           for r in range(rounds) for who in ("alice", "mq")])
        layout = BookLayout.from_config(server.url, "")
        figures: dict[str, list[float]] = {"plain": [], "engine": [], "amqp": []}
        cpu: dict[str, list[float]] = {"plain": [], "engine": [], "amqp": []}
        counted: dict[str, float] = {}
        counted_syncs: dict[str, float] = {}
        for r in range(rounds):
            metrics = Metrics()
            dav = CardDAVClient(http, reactor, credentials=server.service, timeout=30,
                                concurrency=CONCURRENCY, metrics=metrics)
            engine = CollectorEngine(users, dav, layout, Hub(), metrics, reactor,
                                     skip_site_users=False, rank=rank, state=state)
            figures["plain"].append(await measured(server, cpu["plain"], Deferred.fromCoroutine(
                baseline(http, server, contacts, "base%d" % r))))
            figures["engine"].append(await measured(server, cpu["engine"], run_engine(
                engine, messages("new", contacts, "alice%d" % r))))
            counted = requests_per_contact(metrics, contacts)
            counted_syncs = syncs(metrics)
            amqp = await measured(server, cpu["amqp"], Deferred.fromCoroutine(run_amqp(
                reactor, engine, metrics, messages("mq", contacts, "mq%d" % r))))
            if amqp is not None:
                figures["amqp"].append(amqp)
            elif cpu["amqp"]:
                cpu["amqp"].pop()
        # Re-collect what the last round's engine wrote (its cache knows it).
        new = messages("new", contacts, "alice%d" % (rounds - 1))
        puts_before = requests_per_contact(metrics, 1).get("PUT", 0)
        cached = await run_engine(engine, new)
        engine.known = type(engine.known)(reactor, 0, 0)  # no cache at all
        uncached = await run_engine(engine, new)
        puts_during = requests_per_contact(metrics, 1).get("PUT", 0) - puts_before
        plain = median(figures["plain"])
        result = {
            "contacts": contacts,
            "rounds": rounds,
            "rank": rank,
            "plain_put_per_s": [round(v, 1) for v in figures["plain"]],
            "engine_per_s": [round(v, 1) for v in figures["engine"]],
            "engine_vs_plain": [round(e / p, 2) for e, p in zip(figures["engine"],
                                                               figures["plain"])],
            "engine_requests_per_contact": counted,
            "engine_book_syncs": counted_syncs,
            "amqp_engine_per_s": [round(v, 1) for v in figures["amqp"]] or None,
            "amqp_vs_plain": [round(a / p, 2) for a, p in zip(figures["amqp"],
                                                             figures["plain"])] or None,
            "median_engine_vs_plain": round(median(figures["engine"]) / plain, 2),
            "median_amqp_vs_plain": (round(median(figures["amqp"]) / plain, 2)
                                     if figures["amqp"] else None),
            "radicale_cpu_ms_per_contact": {
                side: round(median(values) / contacts, 2) for side, values in cpu.items()
                if values} or None,
            "recollect_cached_per_s": round(cached, 1),
            "recollect_uncached_per_s": round(uncached, 1),
            "puts_during_recollect": puts_during,
            "forget": state is not None,
            "state_db_reads": state.reads if state is not None else None,
        }
        print(json.dumps(result, indent=2))
    finally:
        await pool.closeCachedConnections()
        if database is not None:
            await database.stopService()
        server.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=None,
                        help="new contacts per side (400; 200 with --book-sizes)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rank", choices=("on", "off"), default="on",
                        help="[collector] rank: ranking properties in the cards (default on)")
    parser.add_argument("--forget", action="store_true",
                        help="with issue 13's per-user rules (tombstones...) on")
    import books  # bench/collector/books.py, beside this file
    books.add_arguments(parser, sizes=None)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONHASHSEED", "0")
    if args.book_sizes:
        args.contacts = args.contacts or 200
        books.run(args)
        sys.exit(0)
    args.contacts = args.contacts or 400
    task.react(lambda reactor: Deferred.fromCoroutine(
        main(reactor, args.contacts, args.rounds, args.rank == "on", args.forget)))
