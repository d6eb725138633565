"""One failure budget for every instance on the same database.

The :class:`~mailhub.auth.Throttle` lives in each process's memory (its hot
path is a dictionary lookup). :class:`ThrottleSync` makes the instances that
share a database share its failures, with no database write per successful
request:

- every failure the local throttle records (and a success that clears a
  pair's failures, which other instances hold too) is queued in memory, and
  written every ``interval`` seconds in one transaction (nothing is written
  while nothing fails);
- every ``interval`` seconds the instance reads the rows the *other*
  instances wrote since the last read and applies them to its throttle
  (:meth:`~mailhub.auth.Throttle.shared`).

So a failure on instance A counts on instance B at most about two intervals
later (A's next write, then B's next read; plus the queries' own time): the
bound on staleness, 2 s with the default ``[database] throttle_sync = 1``.
An attacker who spreads guesses over N instances gets, within that bound,
the budget of one. At start-up an instance reads the failures still
remembered (the throttle's ``forget_after``, 15 minutes), so a restart does
not wipe an attacker's record either. Rows older than that are pruned.

All database work runs in the store's thread pool (its runner); the reactor
only moves small lists. If the database cannot be reached, the batch is kept
(bounded) and the throttle goes on per process until it can.
"""

from __future__ import annotations

import uuid
from typing import Any, Protocol, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mailhub.auth import Throttle
from mailhub.metrics import Metrics

Row = tuple[str, str, int, bool]


class ThrottleStore(Protocol):
    """What the sync needs of the database (:class:`mailhub.directory.sql.SQLStore`)."""

    def record_throttle(self, instance: str, at: float,
                        rows: Sequence[Row]) -> "Deferred[None]": ...

    def throttle_since(self, seq: int, instance: str, not_before: float,
                       limit: int = 10_000) -> "Deferred[tuple[int, list[Row]]]": ...

    def prune_throttle(self, before: float) -> "Deferred[int]": ...


class ThrottleSync(Service):
    """Writes this instance's throttle outcomes and applies the others'.

    ``interval`` seconds between two rounds (one write if anything failed,
    one read); ``max_rows`` bounds the batch kept in memory (a flood of
    failures from many addresses past it is still throttled here, but
    dropped from what the others learn, and counted in ``dropped``).
    ``instance`` names this process in the table (a fresh random one by
    default: a restarted instance reads its own old rows like another's).
    """

    log = Logger()
    name = "throttle-sync"  # type: ignore[assignment]

    def __init__(self, throttle: Throttle, store: ThrottleStore, clock: IReactorTime,
                 interval: float = 1.0, max_rows: int = 10_000,
                 prune_every: float = 60.0, instance: str | None = None,
                 metrics: Metrics | None = None) -> None:
        self.throttle = throttle
        self.store = store
        self.clock = clock
        self.interval = interval
        self.max_rows = max_rows
        self.prune_every = prune_every
        self.instance = instance or uuid.uuid4().hex
        #: Outcomes not yet written, in order; consecutive failures of one
        #: (login, client) are folded into one row.
        self._pending: list[list[Any]] = []
        self._last_row: dict[tuple[str, str], list[Any]] = {}
        self._seq = 0
        self._next_prune = 0.0
        self._loop: LoopingCall | None = None
        self._lock = DeferredLock()
        self._failing = False
        #: Outcomes left out because the batch was full.
        self.dropped = 0
        #: Rows written and rows applied from other instances (tests, metrics).
        self.written = 0
        self.applied = 0
        self._rows: Any = None
        if metrics is not None:
            self._rows = metrics.counter(
                "mailhub_throttle_shared_rows_total",
                "Failure-throttle rows shared with the other instances on the database "
                "(direction: written, applied, dropped: left out of a full batch)",
                ["direction"])

    # -- the local throttle's outcomes ---------------------------------------------

    def record(self, login: str, client: str, succeeded: bool) -> None:
        """Queue one outcome (the throttle calls this, on the reactor)."""
        key = (login, client)
        row = self._last_row.get(key)
        if not succeeded and row is not None and row[2] < 1_000_000:
            row[2] += 1  # more failures after this pair's last row: fold them in
            return
        if len(self._pending) >= self.max_rows:
            self.dropped += 1
            if self._rows is not None:
                self._rows.labels("dropped").inc()
            return
        row = [login, client, 0 if succeeded else 1, succeeded]
        self._pending.append(row)
        self._last_row[key] = row

    # -- life cycle ----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.throttle.outcomes = self.record
        loop = self._loop = LoopingCall(self._tick)
        loop.clock = self.clock
        loop.start(self.interval, now=True)

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self.throttle.outcomes == self.record:
            self.throttle.outcomes = None
        # The last batch is written before the database's pool stops.
        return self.sync()

    def _tick(self) -> None:
        if not self._lock.locked:  # a slow round is not doubled by the next tick
            self.sync()

    # -- one round -----------------------------------------------------------------

    def sync(self) -> "Deferred[None]":
        """Write the queued outcomes and apply the others'; fires when done
        (after any round already under way)."""
        return Deferred.fromCoroutine(self._locked_sync())

    async def _locked_sync(self) -> None:
        await self._lock.acquire()
        try:
            await self._sync()
        finally:
            self._lock.release()

    async def _sync(self) -> None:
        now = self.clock.seconds()
        rows, self._pending, self._last_row = self._pending, [], {}
        try:
            if rows:
                await self.store.record_throttle(
                    self.instance, now, [(r[0], r[1], r[2], r[3]) for r in rows])
                self.written += len(rows)
                if self._rows is not None:
                    self._rows.labels("written").inc(len(rows))
            seq, remote = await self.store.throttle_since(
                self._seq, self.instance, now - self.throttle.forget_after)
            if now >= self._next_prune:
                self._next_prune = now + self.prune_every
                await self.store.prune_throttle(now - self.throttle.forget_after)
        except Exception as e:
            # Kept for the next round (bounded); meanwhile the throttle works
            # per process.
            self._pending = (rows + self._pending)[-self.max_rows:]
            self._last_row = {}
            if not self._failing:
                self._failing = True
                self.log.warn("the throttle's failures cannot be shared through the "
                              "database ({error}); each instance counts its own until "
                              "it can", error=str(e).splitlines()[0] if str(e) else
                              type(e).__name__)
            return
        if self._failing:
            self._failing = False
            self.log.info("the throttle's failures are shared through the database again")
        self._seq = seq
        for login, client, failures, succeeded in remote:
            self.throttle.shared(login, client, failures, succeeded)
        self.applied += len(remote)
        if self._rows is not None and remote:
            self._rows.labels("applied").inc(len(remote))


__all__ = ["ThrottleStore", "ThrottleSync"]
