"""Benchmark: start-up time and memory of ``twistd -n mailhub`` over N profiles (issue 14).

    .venv/bin/python bench/scale/run.py [--sizes 100000,1000000]
                                        [--databases sqlite,postgresql]
                                        [--duration 8] [--rounds 2] [--connections 16]
                                        [--no-search] [--no-restart]

For each database and each size N (and N = 0, the baseline), it fills a
fresh database with N profiles (bench/hooks' rows: a third with two
addresses, 0 to 3 of 20 groups each, a password hash on every fourth;
SQLite: ``executemany`` in one transaction; PostgreSQL: a database
``mailhub_scale_<N>`` on 127.0.0.1:5432, user postgres, filled with
``COPY``), starts the real ``twistd -n mailhub`` on it (pinned to CPU 0,
collector off) and measures:

- ready: seconds from the process's start until ``/healthz?ready`` answers
  200 (polled every 50 ms; /healthz reuses its checks' results for up to
  1 s, so this may be up to 1 s late), and until the directory's
  ``directory loaded`` line appears in twistd's log (after ready when the
  table is built: every surface answers from the database meanwhile);
- at ready, while the table still loads: the ``users`` list, read from the
  database, its time and whether it is byte for byte the list memory gives
  once loaded;
- memory per profile: (VmRSS with N profiles - VmRSS with 0) / N, VmRSS
  read from /proc/<pid>/status 2 s after ready;
- peak: VmHWM after one full ``/gs-site-member-list.json`` ``users`` answer,
  and the same per profile over the 0-profile VmRSS;
- ``/gs-search-people.json``: bench/hooks' method (``wrk`` on CPU 1, POST
  bodies searching 1,000 profiles, rounds alternating with a bare
  twisted.web resource answering the same bytes on CPU 0), the best rate
  of each and their ratio;
- started again: once stopped, twistd is started again on the same data
  folder (where a server that saves its directory table finds it), and its
  ready time and VmRSS measured (``--no-restart`` skips it). With a child
  process building the table, its time and peak (from the log) are shown.

It prints a line per run as it goes, then the curve over N per database and
the growth between sizes (exponent 1 = linear). Targets: ready within 5 s at
1,000,000 profiles, at most 300 bytes of resident memory per profile, a
search-people ratio of 0.5 or more. Needs Debian's ``wrk`` unless
``--no-search`` (``apt-get install wrk``) and, for PostgreSQL, a server at
``MAILHUB_BENCH_PG`` (default postgresql://postgres@127.0.0.1:5432/postgres)
that lets the user create databases.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import http.client
import importlib.util
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _hooks() -> Any:
    """bench/hooks/run.py (its profile generator, wrk method and helpers)."""
    spec = importlib.util.spec_from_file_location("bench_hooks_run",
                                                  ROOT / "bench" / "hooks" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _hooks()
free_port, generate, load, lua_script = (hooks.free_port, hooks.generate, hooks.load,
                                         hooks.lua_script)
pinned, post, seed, stop = hooks.pinned, hooks.post, hooks.seed, hooks.stop

from mailhub.directory.model import new_token  # noqa: E402
from mailhub.directory.sql import PostgreSQLDialect, SQLStore  # noqa: E402

SITE_URL = "https://groups.example.com"
PG_SERVER = os.environ.get("MAILHUB_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
FORM = {"content-type": "application/x-www-form-urlencoded"}
LOADED = b"directory loaded: "


# -- databases ----------------------------------------------------------------

class SQLite:
    name = "sqlite"

    def __init__(self, work: Path, count: int) -> None:
        self.path = work / ("scale-%d.sqlite" % count)
        self.dsn = "sqlite:///" + str(self.path)

    def fill(self, count: int, rng: random.Random, password_hash: str) -> tuple[str, list[str]]:
        return seed(self.path, count, rng, password_hash)  # type: ignore[no-any-return]

    def drop(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(str(self.path) + suffix).unlink(missing_ok=True)


class PostgreSQL:
    name = "postgresql"

    def __init__(self, work: Path, count: int) -> None:
        self.database = "mailhub_scale_%d" % count
        self.dsn = PG_SERVER.rsplit("/", 1)[0] + "/" + self.database

    def _admin(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(PG_SERVER, autocommit=True, connect_timeout=5) as admin:
            admin.execute(statement)

    def fill(self, count: int, rng: random.Random, password_hash: str) -> tuple[str, list[str]]:
        import psycopg

        self.drop()
        self._admin('CREATE DATABASE "%s"' % self.database)
        store = SQLStore(PostgreSQLDialect(self.dsn), "main")
        store.migrate()
        token = new_token()
        store.set_token(token)
        store.close_all()
        (groups, profiles, emails, members), users = generate(count, rng, password_hash)
        tables = [("groups_ (id, name, email, type, privacy)", groups),
                  ("profiles (id, name, nickname, password_hash, created)", profiles),
                  ("emails (address_key, address, profile_id, verified, preferred, position)",
                   [(k, a, p, bool(v), bool(f), n) for k, a, p, v, f, n in emails]),
                  ("memberships (group_id, profile_id)", members)]
        with psycopg.connect(self.dsn) as conn:
            with conn.cursor() as cursor:
                for table, rows in tables:
                    with cursor.copy("COPY %s FROM STDIN" % table) as copy:
                        for row in rows:
                            copy.write_row(row)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("ANALYZE")
        return token, users

    def drop(self) -> None:
        self._admin('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % self.database)


DATABASES: dict[str, Any] = {"sqlite": SQLite, "postgresql": PostgreSQL}


# -- the server ---------------------------------------------------------------

def status_of(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM... of a process, in bytes."""
    found = {}
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Vm") and value.strip().endswith("kB"):
            found[key] = int(value.split()[0]) * 1024
    return found


def get(port: int, path: str, timeout: float = 5) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return None


def fetch(port: int, path: str, body: str) -> tuple[int, int, float, str]:
    """(status, bytes, seconds, SHA-256) of one POST, its answer read in 64 KiB reads."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", path, body=body, headers=FORM)
    response = conn.getresponse()
    size = 0
    digest = hashlib.sha256()
    while chunk := response.read(65536):
        size += len(chunk)
        digest.update(chunk)
    conn.close()
    return response.status, size, time.monotonic() - started, digest.hexdigest()


class LogWatcher(threading.Thread):
    """Notes when the directory's ``directory loaded`` line appears in the log
    (read every 20 ms: the log's own time stamps are whole seconds)."""

    def __init__(self, log: Path) -> None:
        super().__init__(daemon=True)
        self.log = log
        self.seen_at: float | None = None
        self.line = ""
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                text = self.log.read_bytes()
            except OSError:
                text = b""
            at = text.find(LOADED)
            if at >= 0 and b"\n" in text[at:]:
                self.seen_at = time.monotonic()
                self.line = text[at:].split(b"\n", 1)[0].decode(errors="replace")
                return
            time.sleep(0.02)


def twistd_command() -> str:
    beside = Path(sys.executable).parent / "twistd"
    found = str(beside) if beside.exists() else shutil.which("twistd")
    if not found:
        raise SystemExit("twistd not found beside %s nor on PATH" % sys.executable)
    return found


def log_tail(log: Path) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    except OSError:
        return "(no log)"


def start(args: argparse.Namespace, argv: list[str], log: Path, port: int,
          count: int, while_loading: Any = None
          ) -> tuple[subprocess.Popen[bytes], float, float, str]:
    """Start twistd; (the process, seconds to ready, seconds to the
    ``directory loaded`` line, the line) once ``/healthz?ready`` says 200
    and the line is there. ``while_loading()`` is called at ready if the
    line is not there yet."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=str(ROOT), stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    watcher = LogWatcher(log)
    watcher.start()
    try:
        deadline = started + args.timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit("twistd exited with %s; its log ends:\n%s"
                                 % (proc.returncode, log_tail(log)))
            if time.monotonic() > deadline:
                raise SystemExit("twistd not ready after %d s; its log ends:\n%s"
                                 % (args.timeout, log_tail(log)))
            if get(port, "/healthz?ready") == 200:
                ready_at = time.monotonic()
                break
            time.sleep(0.05)
        if while_loading is not None and watcher.seen_at is None:
            while_loading()
        watcher.join(args.timeout)
    except BaseException:
        watcher.running = False
        stop(proc)
        raise
    watcher.running = False
    loaded_at = watcher.seen_at if watcher.seen_at is not None else float("nan")
    if watcher.line and int(watcher.line.split()[2]) != count:
        stop(proc)
        raise SystemExit("twistd logged %r, expected %d profiles" % (watcher.line, count))
    return proc, ready_at - started, loaded_at - started, watcher.line


def run_one(args: argparse.Namespace, work: Path, db: Any, count: int, token: str,
            users: list[str]) -> dict[str, Any]:
    """Start twistd on ``db``, measure it, stop it; then start it again on the
    same data folder (where a server that saves its directory finds it)."""
    port = free_port()
    label = "%s-%d" % (db.name, count)
    config = work / ("mailhub-%s.ini" % label)
    config.write_text("[mailhub]\nlisten = tcp:%d:interface=127.0.0.1\ndata = %s\nsite_url = %s\n"
                      "[database]\ndsn = %s\n[collector]\nenabled = no\n"
                      % (port, work / ("data-" + label), SITE_URL, db.dsn))
    result: dict[str, Any] = {"database": db.name, "profiles": count}
    try:
        log = work / ("twistd-%s.log" % label)
        argv = pinned(0, [twistd_command(), "-n", "--pidfile=", "--logfile", str(log),
                          "mailhub", "--config", str(config)])
        def users_while_loading() -> None:
            status, size, seconds, digest = fetch(port, "/gs-site-member-list.json",
                                                  "token=%s&users" % token)
            if status != 200:
                raise SystemExit("users answered %d while the table loaded" % status)
            result["early"] = size, seconds, digest, not log.read_bytes().count(LOADED)

        proc, result["ready"], result["loaded"], result["how"] = start(
            args, argv, log, port, count, users_while_loading if count else None)
        try:
            time.sleep(2)
            memory = status_of(proc.pid)
            result["rss"], result["hwm_ready"] = memory["VmRSS"], memory["VmHWM"]
            child = re.search(rb"built by a child process: .*? in ([0-9.]+) s, at most "
                              rb"([0-9.]+) MiB", log.read_bytes())
            if child:
                result["child"] = float(child.group(1)), float(child.group(2)) * 1048576
            if count:
                status, size, seconds, digest = fetch(port, "/gs-site-member-list.json",
                                                      "token=%s&users" % token)
                if status != 200:
                    raise SystemExit("/gs-site-member-list.json users answered %d" % status)
                result["users_bytes"], result["users_seconds"] = size, seconds
                if "early" in result and result["early"][2] != digest:
                    raise SystemExit("the users list read while the table loaded differs "
                                     "from the one memory gives")
                time.sleep(1)
                memory = status_of(proc.pid)
                result["hwm"], result["rss_after"] = memory["VmHWM"], memory["VmRSS"]
                if not args.no_search:
                    result.update(search(args, work, port, token, users))
        finally:
            stop(proc)
        if not args.no_restart:
            log = work / ("twistd-%s-again.log" % label)
            argv = pinned(0, [twistd_command(), "-n", "--pidfile=", "--logfile", str(log),
                              "mailhub", "--config", str(config)])
            proc, ready, loaded, how = start(args, argv, log, port, count)
            try:
                time.sleep(2)
                result["again"] = ready, loaded, status_of(proc.pid)["VmRSS"], how
            finally:
                stop(proc)
    finally:
        shutil.rmtree(work / ("data-" + label), ignore_errors=True)
    return result


def search(args: argparse.Namespace, work: Path, port: int, token: str,
           users: list[str]) -> dict[str, float]:
    """bench/hooks' /gs-search-people.json measurement against this twistd."""
    status, sample = post(port, "token=%s&search&user=%s" % (token, users[0]))
    if status != 200 or b'"id"' not in sample:
        raise SystemExit("/gs-search-people.json answered %d %r" % (status, sample[:200]))
    body = work / "body.json"
    body.write_bytes(sample)
    bare_port = free_port()
    bare = subprocess.Popen(pinned(0, [sys.executable, str(ROOT / "bench" / "hooks" / "serve.py"),
                                       "bare", str(body), str(bare_port)]),
                            stdout=subprocess.PIPE)
    try:
        assert bare.stdout is not None
        bare.stdout.readline()
        script = work / "search.lua"
        lua_script(script, token, users, "POST")
        load(port, script, 2, args.connections)
        load(bare_port, script, 1, args.connections)
        rates: dict[str, list[float]] = {"bare": [], "mailhub": []}
        for _ in range(args.rounds):
            for name, where in (("bare", bare_port), ("mailhub", port)):
                rates[name].append(load(where, script, args.duration, args.connections))
    finally:
        stop(bare)
    best_bare, best_hub = max(rates["bare"]), max(rates["mailhub"])
    return {"bare": best_bare, "mailhub": best_hub, "ratio": best_hub / best_bare}


# -- report -------------------------------------------------------------------

def mb(n: float) -> str:
    return "%.0f MB" % (n / 1e6)


def per_profile(result: dict[str, Any], base: dict[str, Any], key: str) -> str:
    if not result["profiles"] or key not in result:
        return "-"
    return "%.0f B" % ((result[key] - base["rss"]) / result["profiles"])


def line(result: dict[str, Any], base: dict[str, Any] | None) -> str:
    text = ("%-10s %9d profiles: ready %.1f s (directory loaded %.1f s), VmRSS %s"
            % (result["database"], result["profiles"], result["ready"], result["loaded"],
               mb(result["rss"])))
    if base is not None and result["profiles"]:
        text += " = %s per profile" % per_profile(result, base, "rss")
    if "hwm" in result:
        text += ("; users answer %.1f MB in %.1f s, VmHWM after it %s (%s per profile)"
                 % (result["users_bytes"] / 1e6, result["users_seconds"], mb(result["hwm"]),
                    per_profile(result, base or result, "hwm")))
    if "early" in result:
        text += ("; at ready, users answer %.1f MB in %.1f s (the same bytes; %s)"
                 % (result["early"][0] / 1e6, result["early"][1],
                    "the table still loading when it ended" if result["early"][3]
                    else "the table loaded meanwhile"))
    if "child" in result:
        text += "; child build %.1f s, its peak %s" % (result["child"][0], mb(result["child"][1]))
    if "again" in result:
        text += ("; started again: ready %.1f s (loaded %.1f s), VmRSS %s"
                 % (result["again"][0], result["again"][1], mb(result["again"][2])))
    if result.get("how"):
        text += "; first start logged %r" % result["how"]
    if "ratio" in result:
        text += ("; search-people %.0f/s vs bare %.0f/s = %.2f"
                 % (result["mailhub"], result["bare"], result["ratio"]))
    return text


def table(results: list[dict[str, Any]]) -> None:
    head = ("database", "profiles", "seeded", "ready", "loaded", "VmRSS", "B/profile",
            "VmHWM ready", "VmHWM users", "B/profile", "users at ready", "users answer",
            "bare/s", "mailhub/s",
            "ratio", "again: ready", "loaded", "VmRSS")
    rows = [head]
    bases = {r["database"]: r for r in results if r["profiles"] == 0}
    for r in results:
        base = bases.get(r["database"], r)
        rows.append((r["database"], "{:,}".format(r["profiles"]), "%.0f s" % r["seeded"],
                     "%.1f s" % r["ready"], "%.1f s" % r["loaded"], mb(r["rss"]),
                     per_profile(r, base, "rss"), mb(r["hwm_ready"]),
                     mb(r["hwm"]) if "hwm" in r else "-", per_profile(r, base, "hwm"),
                     ("%.1f s%s" % (r["early"][1], "" if r["early"][3] else "*"))
                     if "early" in r else "-",
                     ("%.1f MB %.1f s" % (r["users_bytes"] / 1e6, r["users_seconds"]))
                     if "users_bytes" in r else "-",
                     "%.0f" % r["bare"] if "bare" in r else "-",
                     "%.0f" % r["mailhub"] if "mailhub" in r else "-",
                     "%.2f" % r["ratio"] if "ratio" in r else "-",
                     "%.1f s" % r["again"][0] if "again" in r else "-",
                     "%.1f s" % r["again"][1] if "again" in r else "-",
                     mb(r["again"][2]) if "again" in r else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for number, row in enumerate(rows):
        print("  ".join(cell.rjust(w) if i else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(row, widths))))
        if number == 0:
            print("  ".join("-" * w for w in widths))
    # Growth between consecutive sizes: t ~ N**k; k = 1 is linear.
    for name, base in bases.items():
        sized = [r for r in results if r["database"] == name and r["profiles"]]
        for a, b in zip(sized, sized[1:]):
            scale = math.log(b["profiles"] / a["profiles"])
            memory = math.log((b["rss"] - base["rss"]) / max(1, a["rss"] - base["rss"])) / scale
            # The log's line times the load to 20 ms; /healthz only to its 1 s reuse.
            key = "loaded" if not any(math.isnan(r["loaded"]) for r in (a, b, base)) else "ready"
            loading = math.log(max(1e-3, b[key] - base[key]) /
                               max(1e-3, a[key] - base[key])) / scale
            what = "directory loaded" if key == "loaded" else "ready"
            print("%s %s -> %s profiles: memory over 0 grows as N^%.2f, %s time over 0 as "
                  "N^%.2f (1 = linear)" % (name, "{:,}".format(a["profiles"]),
                                           "{:,}".format(b["profiles"]), memory, what, loading))
    print("users at ready: the list asked for as soon as /healthz?ready said 200, while "
          "the table loaded (read from the database; * the table loaded before it ended)")
    print("targets: ready within 5 s at 1,000,000 profiles; at most 300 B per profile; "
          "search-people ratio 0.50 or more")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000",
                        help="profile counts, comma-separated (0, the baseline, is added)")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk measurement")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=900, help="seconds to wait for ready")
    parser.add_argument("--no-restart", action="store_true",
                        help="skip the second start on the same data folder")
    parser.add_argument("--no-search", action="store_true",
                        help="skip the /gs-search-people.json rate (no wrk needed)")
    args = parser.parse_args()
    sizes = sorted({0} | {int(s.replace("_", "")) for s in args.sizes.split(",") if s})
    names = [n.strip() for n in args.databases.split(",") if n.strip()]
    for name in names:
        if name not in DATABASES:
            raise SystemExit("unknown database %r (sqlite, postgresql)" % name)
    if not args.no_search and not shutil.which("wrk"):
        raise SystemExit("bench/scale needs wrk for the search rate (apt-get install wrk), "
                         "or --no-search")
    from mailhub.directory.users import hash_password

    password_hash = hash_password("bench-scale-password")
    began = time.monotonic()
    print("bench/scale %s UTC, load average %.1f, sizes %s, databases %s"
          % (datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
             os.getloadavg()[0], ", ".join("{:,}".format(s) for s in sizes), ", ".join(names)),
          flush=True)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mailhub-bench-scale-") as tmp:
        work = Path(tmp)
        for name in names:
            base = None
            for count in sizes:
                db = DATABASES[name](work, count)
                seeding = time.monotonic()
                try:
                    token, users = db.fill(count, random.Random(14), password_hash)
                    seeded = time.monotonic() - seeding
                    result = run_one(args, work, db, count, token, users)
                finally:
                    db.drop()
                result["seeded"] = seeded
                if count == 0:
                    base = result
                results.append(result)
                print("%s (seeded in %.0f s)" % (line(result, base), seeded), flush=True)
    print()
    table(results)
    print("whole run: %.0f s" % (time.monotonic() - began))


if __name__ == "__main__":
    main()
