"""Benchmark: /gs-search-people.json over 100,000 profiles vs a bare twisted.web resource.

    .venv/bin/python bench/hooks/run.py [--profiles N] [--duration S]
                                        [--connections C] [--rounds R]

Makes a SQLite database with N profiles (schema from SQLStore.migrate, rows
bulk-inserted with sqlite3), starts mailhub's hooks on CPU 0 (the real
``twistd -n mailhub`` when it mounts the hooks, else bench/hooks/serve.py,
which builds the same Site/Root/Directory/GroupHooks) and a bare twisted.web
resource answering the same bytes on CPU 0 too, then loads each in turn with
``wrk`` on CPU 1 (keep-alive, C connections, S seconds, POST bodies searching
1,000 different profiles by address or id). Rounds alternate bare and
mailhub, so both see the same machine; it prints each round, the best rate
of each and their ratio (target: 0.5 or more). Needs Debian's ``wrk``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

from mailhub.directory.model import BASE62, new_token  # noqa: E402
from mailhub.directory.sql import SQLiteDialect, SQLStore  # noqa: E402

SITE_URL = "https://groups.example.com"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Rows = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]],
             list[tuple[Any, ...]]]


def generate(count: int, rng: random.Random,
             password_hash: str | None = None) -> tuple[Rows, list[str]]:
    """The rows of a directory of ``count`` profiles, and 1,000 users to search.

    Rows are (groups, profiles, emails, memberships), in the columns of their
    tables: 20 groups; a third of the profiles have two addresses, each is in
    0 to 3 groups; with ``password_hash``, every fourth profile has it.
    """
    groups = ["group%02d" % n for n in range(20)]
    group_rows: list[tuple[Any, ...]] = [
        (g, g.title(), "%s@groups.example.com" % g, "discussion", "public") for g in groups]
    ids = set()
    profiles: list[tuple[Any, ...]] = []
    emails: list[tuple[Any, ...]] = []
    members: list[tuple[Any, ...]] = []
    now = "2025-01-01T00:00:00.000+00:00"
    while len(ids) < count:
        pid = "".join(rng.choice(BASE62) for _ in range(22))
        if pid in ids:
            continue
        ids.add(pid)
        n = len(ids)
        profiles.append((pid, "Person %d" % n, None,
                         password_hash if password_hash and n % 4 == 0 else None, now))
        emails.append(("person%d@example.com" % n, "person%d@example.com" % n, pid, 1, 1, 0))
        if n % 3 == 0:
            emails.append(("p%d@work.example.org" % n, "p%d@work.example.org" % n, pid, 1, 0, 1))
        for g in rng.sample(groups, rng.randint(0, 3)):
            members.append((g, pid))
    users = []
    for n in rng.sample(range(1, count + 1), min(1000, count)):
        users.append(profiles[n - 1][0] if n % 2 else "Person%d@Example.com" % n)
    return (group_rows, profiles, emails, members), users


def seed(path: Path, count: int, rng: random.Random,
         password_hash: str | None = None) -> tuple[str, list[str]]:
    """A SQLite database of ``count`` profiles (:func:`generate`, inserted in
    one transaction); the token and 1,000 users to search."""
    store = SQLStore(SQLiteDialect(str(path)), "main")
    store.migrate()
    token = new_token()
    store.set_token(token)
    store.close_all()
    (groups, profiles, emails, members), users = generate(count, rng, password_hash)
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO groups_ (id, name, email, type, privacy) VALUES (?, ?, ?, ?, ?)",
                     groups)
    conn.executemany("INSERT INTO profiles (id, name, nickname, password_hash, created) "
                     "VALUES (?, ?, ?, ?, ?)", profiles)
    conn.executemany("INSERT INTO emails (address_key, address, profile_id, verified, preferred, "
                     "position) VALUES (?, ?, ?, ?, ?, ?)", emails)
    conn.executemany("INSERT INTO memberships (group_id, profile_id) VALUES (?, ?)", members)
    conn.execute("COMMIT")
    conn.close()
    return token, users


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("server exited with %s" % proc.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("server did not listen on %d" % port)


def post(port: int, body: str) -> tuple[int, bytes]:
    request = urllib.request.Request("http://127.0.0.1:%d/gs-search-people.json" % port,
                                     data=body.encode(), method="POST", headers={
                                         "content-type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def pinned(cpu: int, argv: list[str]) -> list[str]:
    return (["taskset", "-c", str(cpu)] + argv) if shutil.which("taskset") else argv


def start_mailhub(work: Path, dsn: str, token: str, user: str,
                  log: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    """twistd -n mailhub when it serves the hooks; serve.py otherwise."""
    python = sys.executable
    port = free_port()
    config = work / "mailhub.ini"
    config.write_text("[mailhub]\nlisten = tcp:%d:interface=127.0.0.1\ndata = %s\nsite_url = %s\n"
                      "[database]\ndsn = %s\n" % (port, work / "data", SITE_URL, dsn))
    twistd = [str(Path(python).parent / "twistd"), "-n", "--pidfile=", "--logfile", str(log),
              "mailhub", "--config", str(config)]
    body = "token=%s&search&user=%s" % (token, user)
    if Path(twistd[0]).exists():
        proc = subprocess.Popen(pinned(0, twistd), cwd=str(ROOT), stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT)
        try:
            wait_port(port, proc)
            deadline = time.monotonic() + 120
            status = 503
            while time.monotonic() < deadline:
                status, _ = post(port, body)
                if status != 503:
                    break
                time.sleep(0.5)
            if status == 200:
                return proc, port, "twistd -n mailhub --config " + str(config)
        except SystemExit:
            pass
        stop(proc)
    port = free_port()
    argv = [python, str(HERE / "serve.py"), "mailhub", dsn, str(port), SITE_URL]
    proc = subprocess.Popen(pinned(0, argv), cwd=str(ROOT), stdout=subprocess.PIPE,
                            stderr=open(log, "ab"), env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if b"ready" not in line:
        raise SystemExit("bench/hooks/serve.py did not start; see %s" % log)
    return proc, port, "bench/hooks/serve.py (twistd mailhub does not mount the hooks yet)"


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def lua_script(path: Path, token: str, users: list[str], method: str) -> None:
    queries = ['token=%s&search&user=%s' % (token, u) for u in users]
    if method == "GET":
        paths = ",\n".join('"/gs-search-people.json?%s"' % q for q in queries)
        path.write_text("""local paths = {%s}
local i = 0
request = function()
  i = i %% #paths + 1
  return wrk.format("GET", paths[i])
end
""" % paths)
        return
    bodies = ",\n".join('"%s"' % q for q in queries)
    path.write_text("""wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
local bodies = {%s}
local i = 0
request = function()
  i = i %% #bodies + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
""" % bodies)


def load(port: int, script: Path, duration: int, connections: int) -> float:
    out = subprocess.run(pinned(1, ["wrk", "-t1", "-c%d" % connections, "-d%ds" % duration,
                                    "-s", str(script),
                                    "http://127.0.0.1:%d/gs-search-people.json" % port]),
                         capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise SystemExit("wrk failed: %s" % out.stderr)
    if "Non-2xx" in out.stdout or "Socket errors" in out.stdout:
        raise SystemExit("wrk saw errors:\n" + out.stdout)
    found = re.search(r"Requests/sec:\s+([0-9.]+)", out.stdout)
    if not found:
        raise SystemExit("cannot read wrk's output:\n" + out.stdout)
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=int, default=100_000)
    parser.add_argument("--duration", type=int, default=8, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--method", choices=("POST", "GET"), default="POST",
                        help="POST a form body (as GroupServer's clients do) or GET a query")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("bench/hooks needs wrk (apt-get install wrk)")
    rng = random.Random(42)
    work = Path(tempfile.mkdtemp(prefix="mailhub-bench-hooks-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        started = time.monotonic()
        db = work / "mailhub.sqlite"
        token, users = seed(db, args.profiles, rng)
        print("seeded %d profiles in %.1f s" % (args.profiles, time.monotonic() - started))
        dsn = "sqlite:///" + str(db)
        started = time.monotonic()
        hub, hub_port, how = start_mailhub(work, dsn, token, users[0], work / "mailhub.log")
        procs.append(hub)
        print("mailhub (%s) ready in %.1f s" % (how, time.monotonic() - started))
        status, sample = post(hub_port, "token=%s&search&user=%s" % (token, users[0]))
        if status != 200 or not json.loads(sample).get("id"):
            raise SystemExit("mailhub answered %d %r" % (status, sample[:200]))
        (work / "body.json").write_bytes(sample)
        bare_port = free_port()
        bare = subprocess.Popen(pinned(0, [sys.executable, str(HERE / "serve.py"), "bare",
                                           str(work / "body.json"), str(bare_port)]),
                                stdout=subprocess.PIPE)
        procs.append(bare)
        assert bare.stdout is not None
        bare.stdout.readline()
        script = work / "search.lua"
        lua_script(script, token, users, args.method)
        # Warm both (mailhub's JSON cache, the bare server's code paths).
        load(hub_port, script, 2, args.connections)
        load(bare_port, script, 1, args.connections)
        rates: dict[str, list[float]] = {"bare": [], "mailhub": []}
        print("wrk -t1 -c%d -d%ds, %s, %d bytes per answer, %d rounds"
              % (args.connections, args.duration, args.method, len(sample), args.rounds))
        for number in range(1, args.rounds + 1):
            for name, port in (("bare", bare_port), ("mailhub", hub_port)):
                rate = load(port, script, args.duration, args.connections)
                rates[name].append(rate)
                print("  round %d %-8s %9.0f requests/s" % (number, name, rate))
        best_bare, best_hub = max(rates["bare"]), max(rates["mailhub"])
        print("bare twisted.web:      %9.0f requests/s" % best_bare)
        print("mailhub search hook:   %9.0f requests/s" % best_hub)
        print("ratio mailhub/bare:    %9.2f   (target 0.50)" % (best_hub / best_bare))
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
