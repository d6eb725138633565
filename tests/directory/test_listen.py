"""PostgreSQL LISTEN/NOTIFY: a running directory hears of a rotation as it commits.

Real PostgreSQL, real reactor. The directory's poll interval is an hour, so
only the notification can make it see the change: each test waits for the
notification to be applied (never a sleep), then proves the old token is
refused.
"""

from __future__ import annotations

import io
import time
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailhub import cli
from mailhub.directory.listen import ChangeListener
from mailhub.directory.model import Email, Profile, new_profile_id
from mailhub.directory.service import Directory
from mailhub.directory.sql import StoreService
from tests.support.postgres import SERVER, throwaway_database

OLD = "OldTokenOldTokenOldTokenOldToken"


class ListenTests(TestCase):
    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        databases = throwaway_database()
        self.dsn = databases.__enter__()
        self.addCleanup(databases.__exit__, None, None, None)
        self.database = StoreService(self.dsn, "main", reactor, threads=2)
        self.database.startService()
        self.addCleanup(self.database.stopService)
        self.store = self.database.store
        await self.store.migrate()
        await self.store.set_token(OLD)
        self.directory = Directory(self.store, reactor, poll_interval=3600)
        await self.directory.load()
        self.directory.startService()
        self.addCleanup(self.directory.stopService)
        self.changes: list[tuple[str, str]] = []
        self.waiting: list[tuple[str, Deferred[None]]] = []
        self.directory.on_change.append(self._changed)
        self.listener = ChangeListener(self.dsn, reactor, self.directory.changed_elsewhere)
        self.listener.startService()
        self.addCleanup(self.listener.stopService)
        await self.listening()

    def _changed(self, kind: str, key: str) -> None:
        self.changes.append((kind, key))
        for wanted, d in list(self.waiting):
            if wanted == kind:
                self.waiting.remove((wanted, d))
                d.callback(None)

    def change(self, kind: str) -> Deferred[None]:
        """Fires when the directory has applied a change of ``kind``."""
        d: Deferred[None] = Deferred()
        self.waiting.append((kind, d))
        return d

    async def listening(self) -> None:
        ok = await deferToThread(self.listener.listening.wait, 20)
        self.assertTrue(ok, "the listener never listened")

    def rotate(self) -> Deferred[str]:
        """``mailhub token create DSN``, the command itself, off the reactor thread."""
        def run() -> str:
            out, err = io.StringIO(), io.StringIO()
            code = cli.main(["token", "create", self.dsn], stdout=out, stderr=err)
            assert code == 0, err.getvalue()
            return out.getvalue().splitlines()[1]
        return deferToThread(run)

    async def test_the_old_token_is_refused_once_the_notification_arrives(self) -> None:
        self.assertIsNotNone(self.directory.check_token_cached(OLD))
        seen = self.change("token")
        started = time.monotonic()
        new = await self.rotate()
        await seen
        elapsed = time.monotonic() - started
        self.assertIsNone(self.directory.check_token_cached(OLD))
        self.assertIsNone(await self.directory.check_token(OLD))
        self.assertIsNotNone(self.directory.check_token_cached(new))
        # The poll (an hour here) did not do it: the notification did, promptly.
        self.assertLess(elapsed, 5.0)

    async def test_profile_changes_travel_too(self) -> None:
        profile = Profile(new_profile_id(), "A Person", emails=(Email("a@example.com", True, True),))
        elsewhere = StoreService(self.dsn, "main", reactor, threads=1)
        elsewhere.startService()
        self.addCleanup(elsewhere.stopService)
        seen = self.change("profile")
        await elsewhere.store.create_profile(profile)
        await seen
        self.assertEqual(self.directory.lookup("A@example.com").id, profile.id)  # type: ignore[union-attr]

    async def test_the_listener_comes_back_after_its_connection_is_killed(self) -> None:
        import psycopg

        def kill() -> int:
            with psycopg.connect(SERVER, autocommit=True) as admin:
                row = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = %s AND query LIKE 'LISTEN%%'",
                    (self.dsn.rsplit("/", 1)[1],)).fetchone()
                return int(row[0]) if row else 0

        received = self.listener.received
        self.assertEqual(await deferToThread(kill), 1)
        # The listener notices, waits 0.5 s, listens again, and reads the log once.
        while self.listener.received == received:
            await deferLater(reactor, 0.05, lambda: None)
        await self.listening()
        seen = self.change("token")
        new = await self.rotate()
        await seen
        self.assertIsNone(await self.directory.check_token(OLD))
        self.assertIsNotNone(self.directory.check_token_cached(new))
