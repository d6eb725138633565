"""Benchmark: the hooks' rate on 2 ``twistd mailhub`` processes sharing one port, against 1.

    .venv/bin/python bench/processes/run.py [--profiles N] [--duration S]
                                            [--connections C] [--rounds R]

The database and the load are bench/hooks' (N profiles in SQLite, ``wrk``
POSTing ``/gs-search-people.json`` searches for 1,000 different profiles,
keep-alive, C connections). Two sets of real ``twistd -n mailhub`` processes
run on one configuration each (same SQLite file): one process on port P1,
and two processes on port P2, both listening with ``reuseport=yes``, so the
kernel spreads wrk's connections over them. Beside them, the baseline: a bare
twisted.web resource answering the same bytes (bench/hooks' ``Bare``), once
as one process and once as two on one port, which shows what a second
process can give on this machine at all (the load generator shares its two
cores). Nothing is pinned to a CPU: the processes are meant to use every
core. Rounds alternate the four; each prints its rate, then the best and
the median of each and the ratios 2 processes / 1. Needs Debian's ``wrk``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE.parent / "hooks"))

from run import free_port, load, lua_script, post, seed, stop, wait_port  # noqa: E402

SITE_URL = "https://groups.example.com"


def wait_ready(log: Path, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while "mailhub is ready" not in (log.read_text() if log.exists() else ""):
        if proc.poll() is not None:
            raise SystemExit("mailhub exited with %s; see %s" % (proc.returncode, log))
        if time.monotonic() > deadline:
            raise SystemExit("mailhub not ready in %d s; see %s" % (timeout, log))
        time.sleep(0.2)


def start_mailhubs(work: Path, dsn: str, count: int) -> tuple[list[subprocess.Popen[bytes]], int]:
    """``count`` twistd mailhub processes on one port (reuseport=yes), all ready."""
    port = free_port()
    folder = work / ("mailhub-x%d" % count)
    folder.mkdir()
    config = folder / "mailhub.ini"
    config.write_text("[mailhub]\nlisten = tcp:%d:interface=127.0.0.1:reuseport=yes\n"
                      "data = %s\nsite_url = %s\n[database]\ndsn = %s\n"
                      "[collector]\nenabled = false\n" % (port, folder / "data", SITE_URL, dsn))
    twistd = str(Path(sys.executable).parent / "twistd")
    procs = []
    for n in range(count):
        log = folder / ("instance%d.log" % n)
        proc = subprocess.Popen([twistd, "-n", "--pidfile=", "--logfile", str(log), "mailhub",
                                 "--config", str(config)], cwd=str(folder),
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        procs.append(proc)
        wait_ready(log, proc)
    return procs, port


def start_bares(body: Path, count: int) -> tuple[list[subprocess.Popen[bytes]], int]:
    port = free_port()
    procs = []
    for _ in range(count):
        proc = subprocess.Popen([sys.executable, str(HERE / "bare.py"), str(body), str(port)],
                                stdout=subprocess.PIPE)
        procs.append(proc)
        assert proc.stdout is not None
        if b"ready" not in proc.stdout.readline():
            raise SystemExit("bench/processes/bare.py did not start")
    wait_port(port, procs[0])
    return procs, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=int, default=100_000)
    parser.add_argument("--duration", type=int, default=8, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("bench/processes needs wrk (apt-get install wrk)")
    rng = random.Random(42)
    work = Path(tempfile.mkdtemp(prefix="mailhub-bench-processes-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        db = work / "mailhub.sqlite"
        token, users = seed(db, args.profiles, rng)
        dsn = "sqlite:///" + str(db)
        ports: dict[str, int] = {}
        for count in (1, 2):
            started = time.monotonic()
            mailhubs, ports["mailhub x%d" % count] = start_mailhubs(work, dsn, count)
            procs += mailhubs
            print("%d mailhub process(es) ready in %.1f s" % (count, time.monotonic() - started))
        status, sample = post(ports["mailhub x1"], "token=%s&search&user=%s" % (token, users[0]))
        if status != 200 or not json.loads(sample).get("id"):
            raise SystemExit("mailhub answered %d %r" % (status, sample[:200]))
        (work / "body.json").write_bytes(sample)
        for count in (1, 2):
            bares, ports["bare x%d" % count] = start_bares(work / "body.json", count)
            procs += bares
        script = work / "search.lua"
        lua_script(script, token, users, "POST")
        for port in ports.values():  # warm every process (JSON caches, code paths)
            load(port, script, 2, args.connections)
        rates: dict[str, list[float]] = {name: [] for name in ports}
        print("wrk -t1 -c%d -d%ds, POST, %d bytes per answer, %d rounds, nothing pinned"
              % (args.connections, args.duration, len(sample), args.rounds))
        for number in range(1, args.rounds + 1):
            for name, port in ports.items():
                rate = load(port, script, args.duration, args.connections)
                rates[name].append(rate)
                print("  round %d %-11s %9.0f requests/s" % (number, name, rate))
        best = {name: max(values) for name, values in rates.items()}
        middle = {name: statistics.median(values) for name, values in rates.items()}
        for name in rates:
            print("%-12s best %7.0f, median %7.0f requests/s" % (name + ":", best[name],
                                                               middle[name]))
        for kind in ("mailhub", "bare"):
            print("ratio %-7s 2 processes / 1: best %5.2f, median %5.2f"
                  % (kind, best[kind + " x2"] / best[kind + " x1"],
                     middle[kind + " x2"] / middle[kind + " x1"]))
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
