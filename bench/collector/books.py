"""Collector benchmark by book size: contacts per second into books already holding S cards.

For each size S (``--book-sizes 100,1000,5000``) and each store
(``--stores external,embedded``), two books are filled with S cards (written
as ``.vcf`` files into Radicale's storage folder, then read once through
Radicale so its item cache holds them, untimed), and N new contacts
(``--contacts 200``) are timed on each side:

- plain: a concurrent PUT loop (8 in flight, ``If-None-Match: *``) straight
  to the store, into the first book;
- engine: the same number of new addresses as collector messages (5 per
  message, 8 messages in flight) through ``CollectorEngine.handle``, into the
  user's collected book (the second one). One untimed message first gives
  the engine its copy of the book (the full sync-collection a running mailhub
  made long ago; its time is printed as ``first_sync_ms``).

Stores:

- ``external``: Radicale 3.9 as its own process on 127.0.0.1 (fsync on),
  the engine's client over HTTP, as ``run.py`` has it; Radicale's CPU is its
  process's, mailhub's the bench process's (the engine, or the plain loop's
  client);
- ``embedded``: the store of ``[carddav] url = embedded``:
  :class:`~mailhub.collector.embedded.EmbeddedDAV` in this process, its
  thread pool of 4 (``[mailhub] threads``), the engine writing through its
  in-process client as the server does, and the plain loop through the same
  client (straight into the Radicale application, no HTTP). Radicale's CPU is
  what its application used in the pool's threads (per request, so it is also
  given by method); mailhub's is the reactor thread's.

Printed for each size: plain/s, engine/s, their ratio, Radicale's CPU ms
per contact on each side (and, embedded, per request by method), mailhub's
CPU ms per contact, the engine's CardDAV requests per contact by method and
its sync-collections, and the sync-token files Radicale keeps for the
engine's book (one per state of the book a sync saw).

``--profile`` profiles (cProfile) the largest size of the embedded store:
the reactor thread during the engine's phase, and Radicale's application in
the pool threads during each phase; the top functions are printed and the
``.prof`` files kept in ``--profile-dir``.

Usage: ``.venv/bin/python bench/collector/books.py [--book-sizes 100,1000,5000]
[--contacts 200] [--stores external,embedded] [--book-rounds 1] [--profile]
[--item-cache hash|mtime] [--plain-synced]`` (also ``bench/collector/run.py --book-sizes ...``).
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import io
import json
import os
import pstats
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from treq.client import HTTPClient  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.internet.defer import Deferred, DeferredSemaphore  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402
from twisted.web.http_headers import Headers  # noqa: E402

from mailhub.collector.carddav import BookLayout, CardDAVClient  # noqa: E402
from mailhub.collector.embedded import EmbeddedDAV  # noqa: E402
from mailhub.collector.engine import CollectorEngine  # noqa: E402
from mailhub.collector.state import CollectorState  # noqa: E402
from mailhub.collector.vcard import Contact, contact_uuid, to_vcard  # noqa: E402
from mailhub.directory.model import User  # noqa: E402
from mailhub.directory.sql import StoreService  # noqa: E402
from mailhub.metrics import Metrics  # noqa: E402
from mailhub.pubsub import Hub  # noqa: E402
from tests.collector.fakes import FakeUsers  # noqa: E402
from tests.support.radicale import RadicaleServer  # noqa: E402

CONCURRENCY = 8
PER_MESSAGE = 5
MKBOOK = ('<?xml version="1.0"?><d:mkcol xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:'
          'carddav"><d:set><d:prop><d:resourcetype><d:collection/><c:addressbook/>'
          "</d:resourcetype></d:prop></d:set></d:mkcol>").encode()
SYNC = ('<?xml version="1.0"?><d:sync-collection xmlns:d="DAV:"><d:sync-token/>'
        "<d:sync-level>1</d:sync-level><d:prop><d:getetag/></d:prop></d:sync-collection>"
        ).encode()
ETAGS = ('<?xml version="1.0"?><d:propfind xmlns:d="DAV:"><d:prop><d:getetag/></d:prop>'
         "</d:propfind>").encode()


# -- the stores -------------------------------------------------------------


class RadicaleCalls:
    """WSGI wrapper: Radicale's CPU time (thread time) per request, by method,
    and optionally a cProfile per thread. Runs in the pool's threads."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.cpu: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self.profiles: dict[int, cProfile.Profile] | None = None

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        method = environ.get("REQUEST_METHOD", "?")
        profile = None
        if self.profiles is not None:
            with self.lock:
                profile = self.profiles.setdefault(threading.get_ident(), cProfile.Profile())
            profile.enable()
        started = time.thread_time()
        try:
            body = list(self.app(environ, start_response))
        finally:
            spent = time.thread_time() - started
            if profile is not None:
                profile.disable()
            with self.lock:
                self.cpu[method] = self.cpu.get(method, 0.0) + spent
                self.count[method] = self.count.get(method, 0) + 1
        return body

    def snapshot(self) -> tuple[dict[str, float], dict[str, int]]:
        with self.lock:
            return dict(self.cpu), dict(self.count)


class External:
    """Radicale in its own process, over HTTP (one connection per request, as run.py)."""

    name = "external"

    def __init__(self, reactor: Any) -> None:
        self.server = RadicaleServer({"alice@example.org": "pw"})
        self.server.start()
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.http: Any = HTTPClient(Agent(reactor, pool=self.pool))
        self.credentials: tuple[str, str] | None = self.server.service
        self.base = self.server.url
        self.root = self.server.folder / "collections" / "collection-root"
        self.calls: RadicaleCalls | None = None

    def auth(self) -> Headers:
        pair = ("%s:%s" % self.server.service).encode()
        return Headers({b"authorization": [b"Basic " + base64.b64encode(pair)]})

    def radicale_cpu(self) -> float:
        assert self.server.process is not None
        with open("/proc/%d/stat" % self.server.process.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def mailhub_cpu() -> float:
        return time.process_time()  # this process: the engine or the loop's client

    async def close(self) -> None:
        await self.pool.closeCachedConnections()
        self.server.cleanup()


class Embedded:
    """The embedded store (EmbeddedDAV) in this process, through its in-process client."""

    name = "embedded"

    def __init__(self, reactor: Any, item_cache: str = "") -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="mailhub-bookbench-"))
        self.dav = EmbeddedDAV(reactor, self.folder / "dav", FakeUsers([]), threads=4)
        if item_cache:
            # Radicale's [storage] use_mtime_and_size_for_item_cache: its item
            # cache checked by stat() (mtime), or by reading and hashing each
            # card's file (hash, Radicale's default).
            self.dav.app._storage._use_mtime_and_size_for_item_cache = item_cache == "mtime"
        self.item_cache = ("mtime" if self.dav.app._storage._use_mtime_and_size_for_item_cache
                           else "hash")
        self.calls = RadicaleCalls(self.dav.app)
        self.dav.app = self.calls  # http_client() calls this
        self.dav.startService()
        self.http: Any = self.dav.http_client()
        self.credentials = None
        self.base = self.dav.url
        self.root = self.folder / "dav" / "collection-root"

    @staticmethod
    def auth() -> Headers:
        return Headers()  # the in-process client is the user of the path

    def radicale_cpu(self) -> float:
        assert self.calls is not None
        return sum(self.calls.snapshot()[0].values())

    @staticmethod
    def mailhub_cpu() -> float:
        return time.thread_time()  # the reactor thread

    async def close(self) -> None:
        self.dav.stopService()
        shutil.rmtree(self.folder, ignore_errors=True)


# -- filling the books --------------------------------------------------------


def card(prefix: str, i: int, now: datetime) -> tuple[str, str]:
    email = "%s%d@old.example" % (prefix, i)
    contact = Contact(uid=contact_uuid(email), email=email, fn="Old %s %d" % (prefix, i),
                      family="%d" % i, given="Old", rev=now, source="mail",
                      ref="<%d@old.example>" % i, note="Collected by mailhub", count=1,
                      last_used=now)
    return contact.href_name, to_vcard(contact)


async def request(store: Any, method: str, url: str, body: bytes | None = None,
                  depth: str | None = None) -> int:
    headers = store.auth()
    if depth is not None:
        headers.addRawHeader(b"depth", depth.encode())
    if body is not None:
        headers.addRawHeader(b"content-type", b"application/xml; charset=utf-8")
    r = await store.http.request(method, url, headers=headers, data=body)
    await r.content()
    return int(r.code)


async def fill(store: Any, plain_user: str, engine: CollectorEngine, engine_user: User,
               size: int, plain_synced: bool = False) -> None:
    """Both books made, each holding ``size`` cards, in Radicale's item cache (untimed).

    The cards are written as files into the plain book's folder, read once
    through Radicale (a PROPFIND of their ETags parses each and fills the
    item cache), and the folder's cards and cache are then copied into the
    engine's collected book (same content, same modification times: the
    cache holds for both).

    ``plain_synced``: the plain book is also read once with sync-collection
    (as a user's CardDAV client reads it), so Radicale keeps its history
    there too, as it does for the engine's book.
    """
    home = store.base + plain_user + "/"
    await request(store, "MKCOL", home)
    assert await request(store, "MKCOL", home + "book/", MKBOOK) in (200, 201)
    collected = engine._layout.book(engine_user)
    await engine._dav.create_book(collected, "Collected contacts")
    plain_dir = store.root / plain_user / "book"
    engine_dir = store.root / engine_user.login / "collected"
    now = datetime.now(timezone.utc)
    for i in range(size):
        name, text = card("old", i, now)
        (plain_dir / name).write_text(text, newline="")
    assert await request(store, "PROPFIND", home + "book/", ETAGS, depth="1") == 207
    for entry in plain_dir.iterdir():
        if entry.name == ".Radicale.props":
            continue
        if entry.is_dir():
            shutil.copytree(entry, engine_dir / entry.name, dirs_exist_ok=True)
        else:
            shutil.copy2(entry, engine_dir / entry.name)
    if plain_synced:
        assert await request(store, "REPORT", home + "book/", SYNC, depth="0") == 207


# -- the two sides ----------------------------------------------------------------


async def plain_loop(store: Any, user: str, prefix: str, n: int) -> None:
    book = store.base + user + "/book/"
    limit = DeferredSemaphore(CONCURRENCY)

    async def put(i: int) -> None:
        email = "%s%d@x.org" % (prefix, i)
        uid = contact_uuid(email)
        text = to_vcard(Contact(uid=uid, email=email, fn="Plain %d" % i))
        headers = store.auth()
        headers.addRawHeader(b"content-type", b"text/vcard; charset=utf-8")
        headers.addRawHeader(b"if-none-match", b"*")
        r = await store.http.request("PUT", book + uid + ".vcf", headers=headers,
                                     data=text.encode())
        await r.content()
        assert r.code in (201, 204), r.code

    await defer.gatherResults([limit.run(lambda i=i: Deferred.fromCoroutine(put(i)))
                               for i in range(n)])


def messages(prefix: str, n: int, user: str) -> list[bytes]:
    """run.py's messages of ``n`` new addresses (one message at least)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run  # bench/collector/run.py, beside this file

    return run.messages(prefix, max(n, PER_MESSAGE), user)  # type: ignore[no-any-return]


async def engine_loop(engine: CollectorEngine, bodies: list[bytes]) -> None:
    limit = DeferredSemaphore(CONCURRENCY)
    await defer.gatherResults([limit.run(engine.handle, b) for b in bodies])


def counts(metrics: Metrics) -> dict[str, tuple[float, float]]:
    """The engine's CardDAV requests so far, by method: (count, seconds)."""
    out: dict[str, list[float]] = {}
    for family in metrics.registry.collect():
        if family.name != "mailhub_collector_carddav_seconds":
            continue
        for sample in family.samples:
            method = sample.labels.get("method", "?")
            if sample.name.endswith("_count"):
                out.setdefault(method, [0.0, 0.0])[0] = sample.value
            elif sample.name.endswith("_sum"):
                out.setdefault(method, [0.0, 0.0])[1] = sample.value
    return {m: (v[0], v[1]) for m, v in out.items()}


def syncs(metrics: Metrics) -> dict[str, float]:
    return {kind: metrics.value("mailhub_collector_mirror_syncs_total", {"kind": kind})
            for kind in ("full", "changes")}


async def timed(store: Any, work: Any) -> dict[str, Any]:
    """Run ``work``; its wall time, Radicale's and mailhub's CPU seconds meanwhile,
    and (embedded) Radicale's CPU seconds and requests by method."""
    calls_before = store.calls.snapshot() if store.calls is not None else None
    radicale = store.radicale_cpu()
    mailhub = store.mailhub_cpu()
    started = time.monotonic()
    await work
    out: dict[str, Any] = {
        "wall": time.monotonic() - started,
        "radicale": store.radicale_cpu() - radicale,
        "mailhub": store.mailhub_cpu() - mailhub,
    }
    if calls_before is not None:
        cpu, count = store.calls.snapshot()
        out["by_method"] = {m: (count[m] - calls_before[1].get(m, 0),
                                cpu[m] - calls_before[0].get(m, 0.0))
                            for m in cpu if count[m] - calls_before[1].get(m, 0)}
    return out


def sync_tokens(store: Any, user: str, book: str) -> dict[str, int]:
    folder = store.root / user / book / ".Radicale.cache" / "sync-token"
    files = list(folder.iterdir()) if folder.is_dir() else []
    return {"files": len(files), "kib": sum(f.stat().st_size for f in files) // 1024}


def top(stats: pstats.Stats, n: int, key: str) -> str:
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats(key).print_stats(n)
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join(lines[start:])


async def one_size(reactor: Any, store: Any, size: int, n: int, rounds: int, rank: bool,
                   state: CollectorState | None, profile_dir: Path | None,
                   plain_synced: bool = False) -> dict[str, Any]:
    plain_user = "plain-%d@x.org" % size
    engine_user = User(login="alice-%d@example.org" % size,
                       emails=("alice-%d@example.org" % size,), id="alice%d" % size)
    metrics = Metrics()
    dav = CardDAVClient(store.http, reactor, credentials=store.credentials, timeout=120,
                        concurrency=CONCURRENCY, metrics=metrics)
    engine = CollectorEngine(FakeUsers([engine_user]), dav,
                             BookLayout.from_config(store.base, ""), Hub(), metrics, reactor,
                             skip_site_users=False, rank=rank, state=state)
    started = time.monotonic()
    await fill(store, plain_user, engine, engine_user, size, plain_synced)
    filled = time.monotonic() - started
    # The copy a running mailhub would have had for long: one message, untimed.
    started = time.monotonic()
    await engine_loop(engine, messages("warm", PER_MESSAGE, engine_user.id))
    first_sync = metrics_mean(metrics, "REPORT")
    warm = time.monotonic() - started
    result: dict[str, Any] = {"size": size, "contacts": n, "fill_s": round(filled, 1),
                              "first_message_s": round(warm, 2),
                              "first_sync_ms": round(1000 * first_sync, 1),
                              "rounds": []}
    for r in range(rounds):
        plain = await timed(store, Deferred.fromCoroutine(
            plain_loop(store, plain_user, "plain%d-" % r, n)))
        before, syncs_before = counts(metrics), syncs(metrics)
        profiler = cProfile.Profile() if profile_dir is not None else None
        if profiler is not None:
            assert store.calls is not None
            store.calls.profiles = {}
            profiler.enable()
        eng = await timed(store, Deferred.fromCoroutine(
            engine_loop(engine, messages("new%d-" % r, n, engine_user.id))))
        if profiler is not None:
            profiler.disable()
        after, syncs_after = counts(metrics), syncs(metrics)
        requests = {m: round((after[m][0] - before.get(m, (0, 0))[0]) / n, 3)
                    for m in after if after[m][0] - before.get(m, (0, 0))[0]}
        latency = {m: round(1000 * (after[m][1] - before.get(m, (0, 0))[1])
                            / (after[m][0] - before.get(m, (0, 0))[0]), 1)
                   for m in after if after[m][0] - before.get(m, (0, 0))[0]}
        row: dict[str, Any] = {
            "plain_per_s": round(n / plain["wall"], 1),
            "engine_per_s": round(n / eng["wall"], 1),
            "engine_vs_plain": round(plain["wall"] / eng["wall"], 2),
            "radicale_cpu_ms_per_contact": {"plain": round(1000 * plain["radicale"] / n, 1),
                                            "engine": round(1000 * eng["radicale"] / n, 1)},
            "mailhub_cpu_ms_per_contact": {"plain": round(1000 * plain["mailhub"] / n, 2),
                                           "engine": round(1000 * eng["mailhub"] / n, 2)},
            "engine_requests_per_contact": requests,
            "engine_latency_ms": latency,
            "engine_syncs": {k: syncs_after[k] - syncs_before[k] for k in syncs_after},
        }
        if "by_method" in plain:
            row["radicale_cpu_ms_per_request"] = {
                side: {m: round(1000 * cpu / count, 1) for m, (count, cpu) in
                       sorted(part["by_method"].items())}
                for side, part in (("plain", plain), ("engine", eng))}
        result["rounds"].append(row)
        if profiler is not None and profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
            mine = profile_dir / ("mailhub-%s-%d.prof" % (store.name, size))
            profiler.dump_stats(str(mine))
            assert store.calls is not None and store.calls.profiles is not None
            threads = list(store.calls.profiles.values())
            store.calls.profiles = None
            theirs = pstats.Stats(threads[0])
            for p in threads[1:]:
                theirs.add(p)
            theirs.dump_stats(str(profile_dir / ("radicale-%s-%d.prof" % (store.name, size))))
            print("== mailhub, reactor thread, engine phase at %d (cumulative)" % size)
            print(top(pstats.Stats(str(mine)), 25, "cumulative"))
            print("== mailhub, reactor thread (own time)")
            print(top(pstats.Stats(str(mine)), 15, "tottime"))
            print("== Radicale, pool threads, engine phase at %d (cumulative)" % size)
            print(top(theirs, 40, "cumulative"))
            print("== Radicale (own time)")
            print(top(theirs, 20, "tottime"))
            profile_dir = None  # once
    result["engine_sync_tokens"] = sync_tokens(store, engine_user.login, "collected")
    result["engine_copy_cards"] = len(engine.books)
    return result


def metrics_mean(metrics: Metrics, method: str) -> float:
    count, seconds = counts(metrics).get(method, (0.0, 0.0))
    return seconds / count if count else 0.0


async def main(reactor: Any, sizes: list[int], n: int, stores: list[str], rounds: int,
               rank: bool = True, forget: bool = False, profile: bool = False,
               profile_dir: Path = Path("/tmp/bookbench-profiles"),
               item_cache: str = "", plain_synced: bool = False) -> None:
    results: list[dict[str, Any]] = []
    for name in stores:
        store: Any = External(reactor) if name == "external" else Embedded(reactor, item_cache)
        database: StoreService | None = None
        state: CollectorState | None = None
        try:
            if forget:
                folder = tempfile.mkdtemp(prefix="mailhub-bookbench-db-")
                database = StoreService("sqlite:///%s/bench.sqlite" % folder, "main", reactor)
                database.startService()
                await database.store.migrate()
                state = CollectorState(database.store, reactor)
            for size in sizes:
                wanted = profile and name == "embedded" and size == max(sizes)
                row = await one_size(reactor, store, size, n, rounds, rank, state,
                                     profile_dir if wanted else None, plain_synced)
                row["store"] = name
                if name == "embedded":
                    row["item_cache"] = store.item_cache
                results.append(row)
                print(json.dumps(row), flush=True)
        finally:
            if database is not None:
                await database.stopService()
            await store.close()
    print(json.dumps({"rank": rank, "forget": forget,
                      "plain_synced": plain_synced,
                      "results": results}, indent=1))
    print(table(results))


def table(results: list[dict[str, Any]]) -> str:
    head = ("store", "size", "plain/s", "engine/s", "ratio", "Rad ms/c plain",
            "Rad ms/c engine", "mh ms/c plain", "mh ms/c engine", "requests/contact")
    lines = ["  ".join(head)]
    for row in results:
        for r in row["rounds"]:
            lines.append("  ".join(str(v) for v in (
                row["store"], row["size"], r["plain_per_s"], r["engine_per_s"],
                r["engine_vs_plain"], r["radicale_cpu_ms_per_contact"]["plain"],
                r["radicale_cpu_ms_per_contact"]["engine"],
                r["mailhub_cpu_ms_per_contact"]["plain"],
                r["mailhub_cpu_ms_per_contact"]["engine"],
                " ".join("%s %s" % kv for kv in sorted(
                    r["engine_requests_per_contact"].items())))))
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--contacts", type=int, default=200)
    p.add_argument("--rank", choices=("on", "off"), default="on")
    p.add_argument("--forget", action="store_true")
    return p


def add_arguments(p: argparse.ArgumentParser, sizes: str | None = "100,1000,5000") -> None:
    p.add_argument("--book-sizes", default=sizes,
                   help="cards already in each book, comma-separated (%s)" % sizes)
    p.add_argument("--stores", default="external,embedded",
                   help="external (Radicale's own process), embedded (in process)")
    p.add_argument("--book-rounds", type=int, default=1,
                   help="timed rounds per size (each adds --contacts cards per book)")
    p.add_argument("--profile", action="store_true",
                   help="cProfile the largest size of the embedded store")
    p.add_argument("--profile-dir", default="/tmp/bookbench-profiles")
    p.add_argument("--item-cache", choices=("hash", "mtime"), default="",
                   help="embedded: Radicale's item cache checked by hashing each card "
                   "(Radicale's default) or by size and mtime (mailhub's); default: as "
                   "mailhub configures it")
    p.add_argument("--plain-synced", action="store_true",
                   help="the plain book read once with sync-collection too (as a client does)")


def run(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.book_sizes.split(",") if s.strip()]
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    for s in stores:
        if s not in ("external", "embedded"):
            raise SystemExit("--stores: external or embedded, not %r" % s)
    task.react(lambda reactor: Deferred.fromCoroutine(main(
        reactor, sizes, args.contacts, stores, args.book_rounds, args.rank == "on",
        args.forget, args.profile, Path(args.profile_dir), args.item_cache,
        args.plain_synced)))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    run(parser().parse_args())
