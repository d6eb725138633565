"""The directory's table saved in the data folder: a restart reads it, catches
up with the change log, and falls back to the database at any doubt."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from mailhub.directory import snapshot
from mailhub.directory.memory import MemoryStore
from mailhub.directory.model import Email, Group, Profile
from mailhub.directory.service import Directory
from mailhub.directory.table import BY_ID, BY_LOGIN, ProfileTable


def temporary(case: TestCase) -> Path:
    """A new folder, removed after the test."""
    made = Path(tempfile.mkdtemp(prefix="mailhub-table-"))
    case.addCleanup(shutil.rmtree, made, True)
    return made


def profiles(count: int) -> list[Profile]:
    return [Profile(id="p%04d" % n, name="Pérson %d" % n, nickname="n%d" % n if n % 5 == 0 else None,
                    emails=(Email("P%d@Example.org" % n, True, n % 2 == 0),
                            Email("q%d@example.net" % n, n % 3 == 0, False)),
                    groups=("g",) if n % 2 else (), has_password=n % 4 == 0)
            for n in range(count)]


def everything(table_or_directory: Any) -> list[list[Profile]]:
    return [[p for batch in table_or_directory.walk(order, 7) for p in batch]
            for order in (BY_ID, BY_LOGIN)]


class CountingStore(MemoryStore):
    """A MemoryStore that counts how often the whole table is read."""

    def __init__(self) -> None:
        super().__init__()
        self.table_reads = 0

    def load_table(self) -> Any:
        self.table_reads += 1
        return super().load_table()


class FileTests(TestCase):
    def setUp(self) -> None:
        self.path = temporary(self) / snapshot.FILENAME
        odd = Profile(id="odd", name="with\x00nul", emails=(Email("odd@example.org"),))
        self.table = ProfileTable.build(profiles(50) + [odd])
        self.mark = snapshot.Mark("sqlite /x site=main", 12, "2026-12-02T16:00:00")

    def test_a_table_is_read_back_as_it_was_saved(self) -> None:
        snapshot.write(self.path, self.table.state(), self.mark)
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)
        found = snapshot.read(self.path)
        assert found is not None
        mark, table = found
        self.assertEqual(mark, self.mark)
        self.assertEqual(everything(table), everything(self.table))
        self.assertEqual(table.get("odd"), self.table.get("odd"))
        self.assertEqual(table.id_by_email("q9@EXAMPLE.net"), "p0009")
        self.assertEqual(table.id_by_nickname("n10"), "p0010")
        # Still a table that changes.
        table.put(Profile(id="p0001", name="New"))
        self.assertEqual(table.get("p0001").name, "New")  # type: ignore[union-attr]
        self.assertIsNone(table.id_by_email("p1@example.org"))

    def test_no_file_a_damaged_one_or_one_cut_short_is_none(self) -> None:
        self.assertIsNone(snapshot.read(self.path))
        snapshot.write(self.path, self.table.state(), self.mark)
        whole = self.path.read_bytes()
        self.path.write_bytes(whole[:-100])
        self.assertIsNone(snapshot.read(self.path))
        damaged = bytearray(whole)
        damaged[len(whole) // 2] ^= 0xFF
        self.path.write_bytes(bytes(damaged))
        self.assertIsNone(snapshot.read(self.path))
        self.path.write_bytes(whole.replace(snapshot.MAGIC, b"MAILHUB-DIRECTORY-TABLE 0\n"))
        self.assertIsNone(snapshot.read(self.path))
        self.path.write_bytes(whole + b"x")
        self.assertIsNone(snapshot.read(self.path))


class RestartTests(TestCase):
    """A Directory over one store, started again: the saved table is used
    when it is of this database and its changes can be applied."""

    def setUp(self) -> None:
        self.store = CountingStore()
        self.store.create_group(Group("g", "G"))
        for profile in profiles(30):
            self.store.create_profile(Profile(profile.id, profile.name, profile.nickname,
                                              profile.emails))
            for group in profile.groups:
                self.store.add_member(group, profile.id)
        self.saved = temporary(self) / snapshot.FILENAME

    async def start(self) -> Directory:
        directory = Directory(self.store, reactor, poll_interval=3600, saved=self.saved)
        await directory.load()
        await directory.saves_done()
        return directory

    async def fresh(self) -> list[list[Profile]]:
        """What a directory that reads the database sees."""
        directory = Directory(self.store, reactor, poll_interval=3600)
        await directory.load()
        return everything(directory)

    async def test_a_restart_reads_the_saved_table_and_applies_the_changes_since(self) -> None:
        first = await self.start()
        self.assertEqual(self.store.table_reads, 1)
        self.assertTrue(self.saved.exists())
        # Changes while it is stopped.
        self.store.update_profile("p0003", "Renamed", None)
        self.store.remove_profile("p0004")
        self.store.create_profile(Profile("p9999", "Newcomer", None, (Email("new@example.org"),)))
        self.store.set_email("p0005", Email("extra@example.org", True, False))
        self.store.add_member("g", "p0006")
        del first
        second = await self.start()
        self.assertEqual(self.store.table_reads, 1)  # not read again
        self.assertTrue(second.loaded)
        self.assertEqual(everything(second), await self.fresh())
        self.assertEqual(second.profile_by_email("EXTRA@example.org").id, "p0005")  # type: ignore
        self.assertIsNone(second.profile("p0004"))

    async def test_a_table_of_another_database_is_not_used(self) -> None:
        await self.start()
        other = CountingStore()
        other.create_profile(Profile("z1", "Zed", None, (Email("z@example.org"),)))
        directory = Directory(other, reactor, poll_interval=3600, saved=self.saved)
        await directory.load()
        await directory.saves_done()
        self.assertEqual(other.table_reads, 1)
        self.assertEqual([p.id for b in directory.walk() for p in b], ["z1"])

    async def test_a_table_whose_change_is_not_in_the_log_is_not_used(self) -> None:
        await self.start()
        found = snapshot.read(self.saved)
        assert found is not None
        mark, table = found
        # As after the database was restored from an older backup.
        snapshot.write(self.saved, table.state(), snapshot.Mark(
            mark.identity, mark.seq, "1999-01-01T00:00:00"))
        await self.start()
        self.assertEqual(self.store.table_reads, 2)

    async def test_a_change_made_past_the_log_sends_it_back_to_the_database(self) -> None:
        await self.start()
        # A profile deleted with SQL, not through mailhub: no change logged.
        self.store._transact(lambda tx: tx.execute("DELETE FROM profiles WHERE id = ?",
                                                   ("p0007",)), write=True)
        directory = await self.start()
        self.assertEqual(self.store.table_reads, 2)
        self.assertIsNone(directory.profile("p0007"))
        self.assertEqual(everything(directory), await self.fresh())

    async def test_a_damaged_table_is_not_used(self) -> None:
        await self.start()
        self.saved.write_bytes(self.saved.read_bytes()[:50])
        directory = await self.start()
        self.assertEqual(self.store.table_reads, 2)
        self.assertEqual(everything(directory), await self.fresh())

    async def test_stopping_after_changes_saves_the_table_again(self) -> None:
        directory = await self.start()
        before = self.saved.stat().st_mtime_ns
        self.store.update_profile("p0001", "Changed", None)
        await directory.refresh()
        directory.startService()
        await directory.stopService()
        found = snapshot.read(self.saved)
        assert found is not None
        self.assertGreater(self.saved.stat().st_mtime_ns, before - 1)
        self.assertEqual(found[1].get("p0001").name, "Changed")  # type: ignore[union-attr]


class ChildBuildTests(TestCase):
    """With no usable saved table, a child process reads the database and
    writes one; the directory reads it and applies what changed meanwhile."""

    def database(self, folder: Path) -> str:
        return "sqlite:///%s" % (folder / "site.sqlite")

    def setUp(self) -> None:
        from mailhub.directory.sql import SQLStore, dialect_for, run_inline

        folder = temporary(self)
        self.dsn = self.database(folder)
        self.store = SQLStore(dialect_for(self.dsn), "main", runner=run_inline)
        self.store.migrate()
        self.store.create_group(Group("g", "G"))
        for profile in profiles(40):
            self.store.create_profile(Profile(profile.id, profile.name, profile.nickname,
                                              profile.emails))
        self.saved = folder / snapshot.FILENAME
        self.addCleanup(self.store.close_all)

    async def test_the_table_is_built_by_a_child_process(self) -> None:
        from mailhub.directory.build import in_child

        built: list[Path] = []

        def builder(path: Path) -> Deferred[None]:
            built.append(path)
            d = in_child(reactor, self.dsn, "main", path)
            # A change made while the child reads: the directory applies it.
            self.store.update_profile("p0002", "Changed meanwhile", None)
            return d

        directory = Directory(self.store, reactor, poll_interval=3600, saved=self.saved,
                              builder=builder)
        await directory.load()
        await directory.saves_done()
        self.assertEqual(built, [self.saved])
        self.assertEqual(directory.profile("p0002").name, "Changed meanwhile")  # type: ignore
        fresh = Directory(self.store, reactor, poll_interval=3600)
        await fresh.load()
        self.assertEqual(everything(directory), everything(fresh))

    async def test_a_child_that_fails_says_why_and_the_database_is_read_here(self) -> None:
        from mailhub.directory.build import in_child
        from mailhub.errors import Unavailable

        missing = "sqlite:///%s" % temporary(self).joinpath("no", "such.sqlite")
        with self.assertRaises(Unavailable) as raised:
            await in_child(reactor, "postgresql://nobody@127.0.0.1:1/none", "main", self.saved)
        self.assertIn("build process failed", str(raised.exception))
        self.assertIn("database unreachable", str(raised.exception))
        directory = Directory(self.store, reactor, poll_interval=3600, saved=self.saved,
                              builder=lambda path: in_child(reactor, missing, "main", path))
        await directory.load()
        await directory.saves_done()
        self.assertEqual(directory.count(), 40)


class ChildBuildPostgreSQLTests(ChildBuildTests):
    """The same, the child reading PostgreSQL (its DSN given on its stdin)."""

    def database(self, folder: Path) -> str:
        from tests.support.postgres import throwaway_database

        made = throwaway_database()
        dsn = made.__enter__()
        self.addCleanup(made.__exit__, None, None, None)
        return dsn
