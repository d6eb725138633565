"""Benchmark: the longest reactor stall while large answers are served (issue 11).

    .venv/bin/python bench/stall/run.py [--profiles 1000000] [--ldap-users 100000]
                                        [--interval 0.01]

Makes a SQLite database of N profiles (bulk-inserted, as bench/hooks does),
starts a throwaway slapd with M users (tests.support.slapd) when M > 0, and
runs the real ``twistd -n mailhub`` over both. From outside, a prober thread
sends ``GET /metrics`` on a keep-alive connection every ``--interval``
seconds and records each answer's latency: a request the reactor cannot
serve waits, so the longest latency bounds the longest reactor stall.

It reports, each with the longest and the 99th percentile probe latency:

- start-up with no saved directory table (a child process builds it):
  seconds until the directory is loaded, what ``/gs-site-member-list.json
  users`` answered meanwhile (503, never 200 []), the resident memory;
- ``users`` and ``user_groups`` of ``/gs-site-member-list.json`` (N profiles),
  read as fast as the client can, with their size and time;
- MailStore ``cmd=list`` (the site's users, then LDAP's);
- a restart, which reads the table the first run saved.

Target: the longest probe latency under 50 ms while each answer is served.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "hooks"))

from run import free_port, seed, stop  # type: ignore[import-not-found]  # noqa: E402

AUTH = "Basic " + base64.b64encode(b"mailstore:Passw0rd").decode()
FORM = {"content-type": "application/x-www-form-urlencoded"}


class Prober(threading.Thread):
    """GET /metrics every ``interval`` seconds; latencies recorded with their start time."""

    def __init__(self, port: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self.running = True

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        while self.running:
            started = time.monotonic()
            try:
                conn.request("GET", "/metrics")
                conn.getresponse().read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                continue
            ended = time.monotonic()
            self.samples.append((started, ended - started))
            time.sleep(max(0.0, self.interval - (ended - started)))
        conn.close()

    def during(self, start: float, end: float) -> tuple[float, float, int]:
        """(longest, 99th percentile, count) of the probes begun in [start, end]."""
        got = sorted(lat for t, lat in self.samples if start <= t <= end)
        if not got:
            return float("nan"), float("nan"), 0
        return got[-1], got[int(0.99 * (len(got) - 1))], len(got)


def fetch(port: int, path: str, body: str, headers: dict[str, str]) -> tuple[int, int, float]:
    """(status, bytes, seconds) of one POST, the body read in 64 KiB reads."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", path, body=body, headers=headers)
    response = conn.getresponse()
    size = 0
    while True:
        chunk = response.read(65536)
        if not chunk:
            break
        size += len(chunk)
    conn.close()
    return response.status, size, time.monotonic() - started


class Trace:
    """What bench/stall/traced.py saw inside twistd: reactor lags and GC pauses."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def during(self, start: float, end: float) -> tuple[float, float, float, str]:
        """(longest reactor lag, the reactor thread's CPU time in it, longest GC
        pause, its generation) in [start, end]."""
        lag, cpu, pause, generation = 0.0, 0.0, 0.0, "-"
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return lag, cpu, pause, generation
        for line in lines:
            fields = line.split()
            if fields[0] == "#" or len(fields) < 3 or not start <= float(fields[1]) <= end:
                continue
            if fields[0] == "lag" and float(fields[2]) > lag:
                lag, cpu = float(fields[2]), float(fields[3])
            elif fields[0] == "gc" and float(fields[2]) > pause:
                pause, generation = float(fields[2]), fields[3]
        return lag, cpu, pause, generation


def report(what: str, prober: Prober, trace: Trace, start: float, end: float,
           extra: str) -> None:
    longest, p99, n = prober.during(start, end)
    lag, cpu, pause, generation = trace.during(start, end)
    print("%-34s %s; probe latency max %.1f ms, p99 %.1f ms (%d probes); "
          "inside: reactor lag max %.1f ms (its thread ran %.1f ms of it), "
          "longest GC %.1f ms (gen %s)"
          % (what, extra, longest * 1000, p99 * 1000, n, lag * 1000, cpu * 1000,
             pause * 1000, generation), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=int, default=1_000_000)
    parser.add_argument("--ldap-users", type=int, default=100_000)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--trace-out", type=Path, default=None,
                        help="keep what traced.py recorded inside twistd in this file")
    args = parser.parse_args()
    rng = random.Random(11)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        began = time.monotonic()
        token, _ = seed(work / "site.sqlite", args.profiles, rng)
        print("seeded %d profiles in %.1f s" % (args.profiles, time.monotonic() - began),
              flush=True)
        ldap = ""
        slapd = None
        if args.ldap_users:
            from tests.support import slapd as fixture

            began = time.monotonic()
            slapd = fixture.Slapd(work / "slapd", users=args.ldap_users, start_timeout=120)
            slapd.start()
            print("slapd with %d users ready in %.1f s"
                  % (args.ldap_users, time.monotonic() - began), flush=True)
            ldap = "[ldap]\n" + "".join("%s = %s\n" % kv for kv in slapd.settings().items())
        try:
            run(args, work, token, ldap)
        finally:
            if slapd is not None:
                slapd.stop()


def run(args: argparse.Namespace, work: Path, token: str, ldap: str) -> None:
    port = free_port()
    config = work / "mailhub.ini"
    config.write_text(
        "[mailhub]\nlisten = tcp:%d:interface=127.0.0.1\ndata = %s\n"
        "site_url = https://groups.example.com\n[database]\ndsn = sqlite:///%s\n"
        "[collector]\nenabled = no\n[mailstore]\nusername = mailstore\npassword = Passw0rd\n"
        "list = all\n%s" % (port, work / "data", work / "site.sqlite", ldap))
    trace = Trace(work / "trace")
    # The first start has no saved table (a child process builds it); the
    # second reads the one the first saved.
    for start, phases in (("start-up, no saved table", True),
                          ("restart, saved table", False)):
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "traced.py"), str(trace.path),
             "-n", "--pidfile=", "--logfile", str(work / "twistd.log"), "mailhub",
             "--config", str(config)],
            cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            serve(args, proc, port, token, trace, start, phases)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            stop(proc)  # type: ignore[arg-type]
    if args.trace_out is not None and trace.path.exists():
        args.trace_out.write_bytes(trace.path.read_bytes())
    os.sync()


def rss_mib(pid: int) -> float:
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def serve(args: argparse.Namespace, proc: subprocess.Popen[bytes], port: int, token: str,
          trace: Trace, start: str, phases: bool) -> None:
    started = time.monotonic()
    users = "token=%s&users" % token
    while True:
        if proc.poll() is not None:
            raise SystemExit("twistd exited; see its log")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.connect()
            conn.close()
            break
        except OSError:
            time.sleep(0.1)
    prober = Prober(port, args.interval)
    prober.start()
    seen: dict[int, int] = {}
    listening = time.monotonic()
    while True:
        # Loaded when the list is answered (its first byte; the whole list
        # then takes seconds to read).
        ready = time.monotonic()
        status, size, _ = fetch(port, "/gs-site-member-list.json", users, FORM)
        seen[status] = seen.get(status, 0) + 1
        if status == 200:
            break
        time.sleep(0.1)
    report(start, prober, trace, listening, time.monotonic(),
           "listening after %.1f s, loaded after %.1f s; users answered %s; RSS %.0f MiB"
           % (listening - started, ready - started,
              ", ".join("%d x%d" % kv for kv in sorted(seen.items())), rss_mib(proc.pid)))
    time.sleep(1)
    if phases:
        for action in ("users", "user_groups"):
            begin = time.monotonic()
            status, size, seconds = fetch(port, "/gs-site-member-list.json",
                                          "token=%s&%s" % (token, action), FORM)
            report("site members %s" % action, prober, trace, begin, time.monotonic(),
                   "%d, %.1f MB in %.1f s" % (status, size / 1e6, seconds))
        begin = time.monotonic()
        status, size, seconds = fetch(port, "/mailstore", "cmd=list",
                                      dict(FORM, authorization=AUTH))
        report("MailStore cmd=list", prober, trace, begin, time.monotonic(),
               "%d, %.1f MB in %.1f s; RSS after %.0f MiB"
               % (status, size / 1e6, seconds, rss_mib(proc.pid)))
        idle = time.monotonic()
        time.sleep(2)
        report("idle", prober, trace, idle, time.monotonic(), "-")
    prober.running = False
    prober.join(5)


if __name__ == "__main__":
    main()
