"""Benchmark: 10,000 concurrent ``/api/v1/events`` streams on one process, vs a bare twisted.web.

    .venv/bin/python bench/events/run.py [--streams N] [--notifications K]

For each server (bench/events/serve.py: mailhub's PushReceiver + EventStream in
mailhub's own Site, then a bare twisted.web resource doing the least the same
job needs) it opens N event streams (``N / 10`` users, 10 streams each; each
stream one connection from the user's own loopback address, 127.x.y.z,
answered ``: connected`` before it counts), then:

- **memory per stream**: the server's resident memory (VmRSS) with N streams
  open, minus before the first, over N;
- **delay**: K Dovecot OX notifications (``POST
  /preliminary/http-notify/v1/notify``), one after the other, each for one
  user, timed from the moment the POST is sent to the moment the first, and
  the last, of that user's 10 streams has the event; median and 95th
  percentile.

Prints each figure for both and the ratios. The client is one Twisted
process (raw sockets, no HTTP library per stream); the server runs with a
keep-alive comment every ``--keepalive`` seconds (5 by default, so that
10,000 idle streams are kept alive during the run too).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ClientFactory, Protocol

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve import PASSWORD, PUSH_PASSWORD, PUSH_USER  # noqa: E402

PER_USER = 10


def rss_kib(pid: int) -> int:
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit("no VmRSS for %d" % pid)


class Stream(Protocol):
    """One event stream: sends the GET, notices ``: connected`` and each event."""

    def __init__(self, login: str) -> None:
        self.login = login
        self.connected_d: defer.Deferred[None] = defer.Deferred()
        self.tail = b""
        self.events = 0
        self.watch: list[tuple[int, defer.Deferred[None]]] = []

    def connectionMade(self) -> None:
        auth = base64.b64encode(("%s:%s" % (self.login, PASSWORD)).encode())
        self.transport.write(b"GET /api/v1/events HTTP/1.1\r\nHost: bench\r\n"
                             b"Authorization: Basic " + auth + b"\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        text = self.tail + data
        if not self.connected_d.called and b": connected" in text:
            self.connected_d.callback(None)
        self.events += text.count(b"\nevent: ") + text.startswith(b"event: ")
        self.tail = text[-16:]
        for wanted, d in list(self.watch):
            if self.events >= wanted:
                self.watch.remove((wanted, d))
                d.callback(None)

    def until(self, events: int) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if self.events >= events:
            d.callback(None)
        else:
            self.watch.append((events, d))
        return d

    def connectionLost(self, reason: Any) -> None:
        if not self.connected_d.called:
            self.connected_d.errback(reason)


class StreamFactory(ClientFactory):
    def __init__(self, login: str) -> None:
        self.login = login
        self.protocol_instance: Stream | None = None

    def buildProtocol(self, addr: Any) -> Stream:
        self.protocol_instance = Stream(self.login)
        return self.protocol_instance


async def open_streams(port: int, count: int, batch: int = 250) -> dict[str, list[Stream]]:
    users: dict[str, list[Stream]] = {}
    for start in range(0, count, batch):
        waits = []
        for n in range(start, min(count, start + batch)):
            user = n // PER_USER
            login = "u%d@example.org" % user
            factory = StreamFactory(login)
            # Each user from an address of its own, as users are: one address
            # opening hundreds of logins at once is what the throttle's burst
            # rule spaces out (doc/auth.rst).
            source = "127.%d.%d.%d" % (1 + user // 62500, user // 250 % 250, 1 + user % 250)
            reactor.connectTCP("127.0.0.1", port, factory, bindAddress=(source, 0))
            await task.deferLater(reactor, 0, lambda: None)
            stream = factory
            waits.append(stream)
        # Wait for this batch's streams to be answered.
        for factory in waits:
            while factory.protocol_instance is None:
                await task.deferLater(reactor, 0.01, lambda: None)
        await defer.gatherResults([f.protocol_instance.connected_d for f in waits])
        for factory in waits:
            users.setdefault(factory.login, []).append(factory.protocol_instance)
    return users


class Notify(Protocol):
    """One persistent HTTP/1.1 connection that POSTs OX notifications."""

    def __init__(self) -> None:
        self.answered: defer.Deferred[None] | None = None
        self.buffer = b""

    def post(self, body: bytes) -> None:
        auth = base64.b64encode(("%s:%s" % (PUSH_USER, PUSH_PASSWORD)).encode())
        self.buffer = b""
        self.transport.write(b"POST /preliminary/http-notify/v1/notify HTTP/1.1\r\n"
                             b"Host: bench\r\nContent-Type: application/json\r\n"
                             b"Authorization: Basic " + auth + b"\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data


async def measure(port: int, pid: int, streams: int, notifications: int) -> dict[str, float]:
    before = rss_kib(pid)
    started = time.monotonic()
    users = await open_streams(port, streams)
    opened = time.monotonic() - started
    await task.deferLater(reactor, 2, lambda: None)
    after = rss_kib(pid)
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    notify = Notify()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), notify)
    logins = sorted(users)
    first, last = [], []
    for n in range(notifications):
        login = logins[(n * 7) % len(logins)]
        targets = users[login]
        wanted = [s.events + 1 for s in targets]
        body = json.dumps({"user": login, "event": "messageNew", "folder": "INBOX",
                           "imap-uidvalidity": 1700000000, "imap-uid": n + 1,
                           "from": "Zoe <zoe@example.org>", "subject": "Hello %d" % n,
                           "unseen": 1}).encode()
        sent = time.monotonic()
        notify.post(body)
        waits = [s.until(w) for s, w in zip(targets, wanted)]
        first_done: list[float] = []
        for d in waits:
            d.addCallback(lambda _: first_done.append(time.monotonic()))
        await defer.gatherResults(waits)
        first.append(min(first_done) - sent)
        last.append(max(first_done) - sent)
        await task.deferLater(reactor, 0.005, lambda: None)
    alive = sum(1 for group in users.values() for s in group if s.transport.connected)
    for group in users.values():
        for s in group:
            s.transport.loseConnection()
    notify.transport.loseConnection()
    return {"kib_per_stream": (after - before) / streams, "rss_before_mib": before / 1024,
            "rss_after_mib": after / 1024, "open_s": opened, "alive": alive,
            "first_median_ms": statistics.median(first) * 1000,
            "first_p95_ms": statistics.quantiles(first, n=20)[-1] * 1000,
            "last_median_ms": statistics.median(last) * 1000,
            "last_p95_ms": statistics.quantiles(last, n=20)[-1] * 1000}


def start(kind: str, port: int, keepalive: float) -> subprocess.Popen[bytes]:
    argv = [sys.executable, str(HERE / "serve.py"), kind, str(port)]
    if kind == "mailhub":
        argv.append(str(keepalive))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    if b"ready" not in proc.stdout.readline():
        raise SystemExit("bench/events/serve.py %s did not start" % kind)
    return proc


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def main(args: argparse.Namespace) -> None:
    results = {}
    for kind in ("bare", "mailhub"):
        port = free_port()
        proc = start(kind, port, args.keepalive)
        try:
            results[kind] = await measure(port, proc.pid, args.streams, args.notifications)
        finally:
            proc.terminate()
            proc.wait(30)
        r = results[kind]
        print("%-8s %d streams open in %.1f s (%d still open at the end); RSS %.0f -> %.0f MiB: "
              "%.1f KiB per stream; delay to the first stream median %.1f ms, p95 %.1f ms; "
              "to all 10 median %.1f ms, p95 %.1f ms"
              % (kind, args.streams, r["open_s"], r["alive"], r["rss_before_mib"],
                 r["rss_after_mib"], r["kib_per_stream"], r["first_median_ms"],
                 r["first_p95_ms"], r["last_median_ms"], r["last_p95_ms"]), flush=True)
    bare, hub = results["bare"], results["mailhub"]
    print("memory per stream, mailhub / bare:       %5.2f" % (hub["kib_per_stream"]
                                                                / bare["kib_per_stream"]))
    print("delay to all streams (median), mailhub / bare: %5.2f"
          % (hub["last_median_ms"] / bare["last_median_ms"]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--notifications", type=int, default=200)
    parser.add_argument("--keepalive", type=float, default=5.0,
                        help="mailhub's [push] keepalive during the run")
    arguments = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = arguments.streams + 1000
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed), hard))
    os.environ.setdefault("PYTHONHASHSEED", "0")
    task.react(lambda _: defer.Deferred.fromCoroutine(main(arguments)))
