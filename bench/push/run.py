"""Benchmark: OX push notifications accepted per second, mailhub vs a bare handler.

Starts two servers in turn on 127.0.0.1, each in its own process on one core:

- ``mailhub``: the real :class:`mailhub.web.push.PushReceiver` (Basic auth,
  body limit, decoding, bounded queue, publication on the local pubsub to a
  live :class:`~mailhub.web.events.EventStream`) in mailhub's own Site and Root;
- ``baseline``: a bare twisted.web resource that reads the body and answers
  ``{"success":true}``;

and drives each with ``wrk`` (Debian package ``wrk``) on the other core, same
concurrency, same body, keep-alive, for a bounded time, alternating rounds.
Prints both rates and the ratio (target: 0.6 or more), and the 99th percentile
of mailhub's answer latency at that rate: Dovecot waits for the receiver at
the end of each delivery and gives up after 2 s (target: well under that).

    .venv/bin/python bench/push/run.py [--seconds 6] [--rounds 3] [--connections 16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PATH = "/preliminary/http-notify/v1/notify"
BODY = {
    "user": "alice@example.org", "event": "messageNew", "folder": "INBOX",
    "imap-uidvalidity": 1700000000, "imap-uid": 4242,
    "from": "=?utf-8?q?Bj=C3=B6rn?= <bjorn@example.org>",
    "subject": "=?ISO-8859-1?Q?R=E9union?= tomorrow",
    "snippet": "Hello, shall we meet tomorrow at ten?", "unseen": 3,
}
AUTH = "Basic ZG92ZWNvdDpiZW5jaC1zZWNyZXQ="  # dovecot:bench-secret


def serve(kind: str, port: int) -> None:
    """Run one server until killed (the child process)."""
    sys.path.insert(0, str(ROOT))
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    if kind == "mailhub":
        from mailhub.config import Config, PushSection
        from mailhub.metrics import Metrics
        from mailhub.pubsub import Hub
        from mailhub.web.events import EventStream
        from mailhub.web.push import PushReceiver

        config = Config(push=PushSection(username="dovecot", password="bench-secret",
                                         queue=10000))
        hub, metrics = Hub(), Metrics()
        from mailhub.web.site import MailhubSite, Root

        EventStream(config, hub, metrics, None, reactor)  # subscribed, as in production
        # mailhub's own Site and Root (body limit, per-route metrics), as
        # twistd mailhub serves it.
        root = Root(metrics)
        root.mount(b"preliminary", PushReceiver(config, hub, metrics, reactor).resource())
        site = MailhubSite(root, config.mailhub.max_body)
    else:
        class Bare(Resource):
            isLeaf = True

            def render_PUT(self, request):  # noqa: N802 (twisted.web's name)
                request.content.read()
                request.setHeader(b"content-type", b"application/json; charset=utf-8")
                return b'{"success":true}'

        site = Site(Bare())
    reactor.listenTCP(port, site, interface="127.0.0.1", backlog=1024)
    reactor.run()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("server on port %d did not start" % port)


def pinned(argv: list[str], cpu: int) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(cpu)] + argv if taskset and (os.cpu_count() or 1) > 1 else argv


def run_wrk(wrk: str, script: str, port: int, seconds: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        pinned([wrk, "-t1", "-c%d" % connections, "-d%ds" % seconds, "--timeout", "5s", "--latency",
                "-s", script, "http://127.0.0.1:%d%s" % (port, PATH)], 1),
        capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    total = re.search(r"(\d+) requests in", out)
    return {"rate": rate, "non2xx": float(bad.group(1)) if bad else 0.0,
            "requests": float(total.group(1)) if total else 0.0,
            "socket_errors": 1.0 if errors else 0.0,
            "p50_ms": percentile_ms(out, 50), "p99_ms": percentile_ms(out, 99)}


UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def percentile_ms(out: str, percent: int) -> float:
    """One line of wrk's --latency distribution ("     99%    3.21ms"), in ms."""
    found = re.search(r"^\s+%d%%\s+([\d.]+)(us|ms|s|m)\s*$" % percent, out, re.MULTILINE)
    if found is None:
        raise SystemExit("wrk printed no %d%% latency:\n%s" % (percent, out))
    return float(found.group(1)) * UNITS_MS[found.group(2)]


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds process ``pid`` has used (Linux /proc)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(kind: str, wrk: str, script: str, seconds: int, connections: int) -> dict[str, float]:
    """One server's rate, and its CPU time per request: on a shared machine the
    rate moves with the neighbours' load, the CPU per request much less."""
    port = free_port()
    server = subprocess.Popen(pinned([sys.executable, __file__, "--serve", kind,
                                      "--port", str(port)], 0))
    try:
        wait_listening(port)
        run_wrk(wrk, script, port, 2, connections)  # warm-up
        before = cpu_seconds(server.pid)
        result = run_wrk(wrk, script, port, seconds, connections)
        result["cpu_us"] = 1e6 * (cpu_seconds(server.pid) - before) / max(result["requests"], 1)
        return result
    finally:
        server.terminate()
        server.wait(timeout=10)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", choices=["mailhub", "baseline"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    wrk = shutil.which("wrk")
    if not wrk:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    args.seconds = max(1, min(args.seconds, 30))
    args.rounds = max(1, min(args.rounds, 9))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write('wrk.method = "PUT"\nwrk.body = %s\n'
                'wrk.headers["Content-Type"] = "application/json; charset=utf-8"\n'
                'wrk.headers["Authorization"] = "%s"\n'
                % (json.dumps(json.dumps(BODY)), AUTH))
        script = f.name
    try:
        results: dict[str, list[dict[str, float]]] = {"mailhub": [], "baseline": []}
        for _ in range(args.rounds):
            for kind in ("baseline", "mailhub"):
                result = measure(kind, wrk, script, args.seconds, args.connections)
                results[kind].append(result)
                print("%-8s %9.0f req/s  %6.1f us CPU/request  latency p50 %.2f ms, "
                      "p99 %.2f ms  (%d requests, %d non-2xx)"
                      % (kind, result["rate"], result["cpu_us"], result["p50_ms"],
                         result["p99_ms"], result["requests"], result["non2xx"]), flush=True)
    finally:
        os.unlink(script)
    # Neighbours share the cores: compare each mailhub run with the baseline run
    # just before it, and report the median of those paired ratios.
    pairs = list(zip(results["baseline"], results["mailhub"]))
    ratios = sorted(m["rate"] / b["rate"] for b, m in pairs)
    cpu_ratios = sorted(b["cpu_us"] / m["cpu_us"] for b, m in pairs if m["cpu_us"])
    best = {kind: max(r["rate"] for r in runs) for kind, runs in results.items()}
    print("baseline (bare twisted.web handler): best %.0f notifications/s" % best["baseline"])
    print("mailhub PushReceiver (OX driver):    best %.0f notifications/s" % best["mailhub"])
    print("paired ratios: %s" % ", ".join("%.2f" % r for r in ratios))
    print("ratio (median of paired rounds): %.2f (target 0.6)" % median(ratios))
    if cpu_ratios:
        print("ratio of CPU per request (median of paired rounds, baseline/mailhub): %.2f"
              % median(cpu_ratios))
    p99 = [r["p99_ms"] for r in results["mailhub"]]
    print("mailhub answer latency, 99th percentile at %d connections: median %.2f ms, "
          "worst %.2f ms (Dovecot's request timeout: 2000 ms)"
          % (args.connections, median(p99), max(p99)))
    if any(r["non2xx"] for r in results["mailhub"]):
        print("WARNING: mailhub answered non-2xx responses (queue full?)")


if __name__ == "__main__":
    main()
