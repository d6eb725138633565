"""The failure throttle is shared by the instances on one database.

Two "instances" here are two throttles, each with its own :class:`ThrottleSync`
and its own :class:`SQLStore` object, on one SQLite file, run inline so the
Deferreds fire at once; time is a :class:`Clock`. The real processes on one
PostgreSQL are in ``test_shared_throttle_processes.py``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailhub.auth import Throttle
from mailhub.directory.sql import MIGRATIONS, SQLiteDialect, SQLStore, run_inline
from mailhub.errors import Unavailable
from mailhub.shared_throttle import ThrottleSync

ATTACKER = "203.0.113.9"


class CountingStore(SQLStore):
    """The real store, counting its write transactions."""

    def __init__(self, path: str) -> None:
        super().__init__(SQLiteDialect(path), "main", runner=run_inline)
        self.writes = 0
        #: While true, every transaction fails as an unreachable server's would.
        self.broken = False

    def _transact(self, work: Any, write: bool = False) -> Any:
        if self.broken:
            raise Unavailable("database unreachable: connection refused")
        return super()._transact(work, write)

    def _write(self, work: Any) -> Any:
        self.writes += 1
        return super()._write(work)


class Instance:
    def __init__(self, path: str, clock: Clock, interval: float = 1.0) -> None:
        self.store = CountingStore(path)
        self.throttle = Throttle(clock, base=0.25, max_delay=15.0, free=1, login_free=3,
                                 client_free=10, forget_after=900.0)
        self.sync = ThrottleSync(self.throttle, self.store, clock, interval=interval)


class SharedThrottleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)  # seconds since the epoch, as a real clock's
        # A folder of the system's, not trial's mktemp (relative to the working
        # folder: under pytest, the source tree).
        folder = tempfile.TemporaryDirectory(prefix="mailhub-throttle-")
        self.addCleanup(folder.cleanup)
        path = str(Path(folder.name) / "mailhub.sqlite")
        self.path = path
        self.assertEqual(self.successResultOf(CountingStore(path).migrate()), len(MIGRATIONS))
        self.a = self.instance()
        self.b = self.instance()

    def instance(self) -> Instance:
        instance = Instance(self.path, self.clock)
        instance.sync.startService()
        self.addCleanup(lambda: instance.sync.running and instance.sync.stopService())
        return instance

    def fail_on(self, instance: Instance, times: int, login: str = "alice",
                client: str = ATTACKER) -> None:
        for _ in range(times):
            instance.throttle.after(login, client, False)

    def test_failures_on_one_instance_delay_the_next_guess_on_another(self) -> None:
        self.fail_on(self.a, 4)
        self.assertEqual(self.b.throttle.delay_of("alice", ATTACKER), 0.0)
        self.clock.advance(1.0)  # A writes its batch, B reads it
        self.clock.advance(1.0)
        self.assertGreater(self.b.throttle.delay_of("alice", ATTACKER), 0.0)

    def test_guesses_spread_over_two_instances_meet_one_budget(self) -> None:
        # The attacker alternates between A and B as fast as they let it,
        # every guess wrong; each instance learns of the other's within a
        # round. Refused once the shared slots lie past max_delay.
        def guesses_until_refused(a: Instance, b: Instance) -> int | None:
            for n in range(200):
                instance = a if n % 2 == 0 else b
                if instance.throttle.before("alice", ATTACKER) is None:
                    return n
                instance.throttle.after("alice", ATTACKER, False)
                self.clock.advance(1.0)
            return None

        refused_at = guesses_until_refused(self.a, self.b)
        # The same two instances without the sync (per process, as before):
        # each has its own budget, so the attacker gets about twice as many.
        apart = guesses_until_refused(Instance(self.path, self.clock),
                                      Instance(self.path, self.clock))
        alone = Instance(self.path + "-alone", self.clock).throttle
        alone_refused = None
        for n in range(200):
            if alone.before("alice", ATTACKER) is None:
                alone_refused = n
                break
            alone.after("alice", ATTACKER, False)
            self.clock.advance(1.0)
        self.assertIsNotNone(refused_at)
        assert refused_at is not None and alone_refused is not None and apart is not None
        self.assertLess(refused_at, apart)
        # Two instances sharing the budget refuse about as soon as one alone
        # (within the few guesses the interval lets through), not twice later.
        self.assertLessEqual(refused_at, alone_refused + 4)

    def test_a_success_writes_nothing(self) -> None:
        self.clock.advance(1.0)
        before = self.a.store.writes
        for _ in range(1000):
            self.a.throttle.before("bob", "192.0.2.1")
            self.a.throttle.after("bob", "192.0.2.1", True)
        for _ in range(5):
            self.clock.advance(1.0)
        self.assertEqual(self.a.store.writes, before)

    def test_failures_are_written_in_one_batch_per_interval(self) -> None:
        self.clock.advance(1.0)
        before = self.a.store.writes
        self.fail_on(self.a, 50, client="198.51.100.1")
        self.fail_on(self.a, 50, login="bob", client="198.51.100.2")
        self.clock.advance(1.0)
        self.assertEqual(self.a.store.writes, before + 1)
        self.assertEqual(self.a.sync.written, 2)  # one row per (login, client)

    def test_a_success_after_failures_resets_the_pair_everywhere(self) -> None:
        self.fail_on(self.a, 5)
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        self.assertGreater(self.b.throttle.delay_of("alice", ATTACKER), 0.0)
        self.clock.advance(20.0)  # past the slots the failures reserved
        self.a.throttle.after("alice", ATTACKER, True)
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        self.assertEqual(self.b.throttle.before("alice", ATTACKER), 0.0)

    def test_an_instance_started_later_learns_the_failures_still_remembered(self) -> None:
        self.fail_on(self.a, 6)
        self.clock.advance(1.0)
        late = self.instance()  # its first round runs at start
        self.assertGreater(late.throttle.delay_of("alice", ATTACKER), 0.0)

    def test_failures_older_than_the_throttles_memory_are_forgotten(self) -> None:
        self.fail_on(self.a, 6)
        self.clock.advance(1.0)
        self.clock.advance(1000.0)  # past forget_after (900 s)
        late = self.instance()
        self.assertEqual(late.throttle.delay_of("alice", ATTACKER), 0.0)
        # And the table was pruned (its newest row stays, so numbers never go back).
        self.clock.advance(60.0)
        rows = self.a.store._transact(
            lambda tx: tx.one("SELECT count(*) FROM throttle_events"))
        self.assertEqual(rows, (1,))

    def test_an_unreachable_database_keeps_the_batch_for_later(self) -> None:
        self.clock.advance(1.0)
        written = self.a.sync.written
        self.a.store.broken = True
        self.fail_on(self.a, 6)
        self.clock.advance(1.0)
        self.assertEqual(self.a.sync.written, written)
        # Locally the throttle goes on.
        self.assertGreater(self.a.throttle.delay_of("alice", ATTACKER), 0.0)
        self.a.store.broken = False
        self.clock.advance(1.0)
        self.assertEqual(self.a.sync.written, written + 1)
        self.clock.advance(1.0)
        self.assertGreater(self.b.throttle.delay_of("alice", ATTACKER), 0.0)

    def test_the_batch_in_memory_is_bounded(self) -> None:
        self.a.sync.max_rows = 10
        for n in range(30):
            self.a.throttle.after("user%d" % n, ATTACKER, False)
        self.assertEqual(self.a.sync.dropped, 20)
        self.clock.advance(1.0)
        self.assertEqual(self.a.sync.written, 10)

    def test_stopping_writes_the_last_batch(self) -> None:
        self.clock.advance(1.0)
        self.fail_on(self.a, 3)
        self.successResultOf(self.a.sync.stopService())
        self.assertEqual(self.a.sync.written, 1)
        # And the throttle no longer reports to a stopped sync.
        self.assertIsNone(self.a.throttle.outcomes)
