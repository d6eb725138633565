"""How long a replaced token stays accepted by another instance on PostgreSQL.

One store service rotates the site token (as ``mailhub token create`` does,
from another connection); a second one, with a Directory and a
ChangeListener and a poll interval of an hour, stands for a running
instance. For each rotation: the time from the writer's commit to the
moment that instance refuses the old token. Baseline beside it: the
worst case of polling at the default ``poll_interval`` (0.25 s).

    .venv/bin/python bench/tokens/run.py [ROUNDS] [DSN-of-an-admin-database]
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred

from mailhub.directory.listen import ChangeListener
from mailhub.directory.model import new_token
from mailhub.directory.service import Directory
from mailhub.directory.sql import StoreService


async def main(reactor: Any, rounds: int, admin: str) -> None:
    import psycopg

    name = "mailhub_bench_%d" % int(time.time())
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute('CREATE DATABASE "%s"' % name)
    dsn = admin.rsplit("/", 1)[0] + "/" + name
    writer = StoreService(dsn, "main", reactor, threads=1)
    reader = StoreService(dsn, "main", reactor, threads=2)
    try:
        for service in (writer, reader):
            service.startService()
        await writer.store.migrate()
        old = new_token()
        await writer.store.set_token(old)
        directory = Directory(reader.store, reactor, poll_interval=3600)
        await directory.load()
        waiting: list[Deferred[None]] = []

        def changed(kind: str, key: str) -> None:
            # Copied first: a callback resumes the loop below, which waits again.
            ready = list(waiting)
            waiting.clear()
            for d in ready:
                d.callback(None)

        directory.on_change.append(changed)
        listener = ChangeListener(dsn, reactor, directory.changed_elsewhere)
        listener.startService()
        while not listener.listening.is_set():
            await task.deferLater(reactor, 0.05, lambda: None)
        await task.deferLater(reactor, 0.2, lambda: None)
        delays = []
        for _ in range(rounds):
            seen: Deferred[None] = Deferred()
            waiting.append(seen)
            new = new_token()
            await writer.store.set_token(new)
            committed = time.perf_counter()
            await seen
            assert directory.check_token_cached(old) is None, "the old token is still accepted"
            delays.append((time.perf_counter() - committed) * 1000)
            old = new
        await listener.stopService()
        delays.sort()
        print("rounds %d: old token refused after the commit in median %.1f ms, "
              "p95 %.1f ms, max %.1f ms (polling at 0.25 s: up to 250 ms)"
              % (rounds, statistics.median(delays), delays[int(0.95 * (rounds - 1))],
                 delays[-1]))
    finally:
        for service in (writer, reader):
            await service.stopService()  # type: ignore[misc]
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)


if __name__ == "__main__":
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    admin = sys.argv[2] if len(sys.argv) > 2 else "postgresql://postgres@127.0.0.1:5432/postgres"
    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, rounds, admin)))
