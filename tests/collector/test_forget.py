"""Issue 13, forget / opt-out / block list: the engine and CollectorState against the
in-memory CardDAV server (through StubTreq) and the real SQL store on in-memory SQLite.

The user's actions (deleting a card or the book, adding a card to a book) are made
on the fake server's dicts, as a CardDAV client's DELETE or PUT would leave them.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailhub import cli
from mailhub.collector.carddav import BookLayout, CardDAVClient
from mailhub.collector.engine import CollectorEngine
from mailhub.collector.state import (
    BY_MAILHUB, BY_USER, CollectorState, block_entry, blocked, login_key,
)
from mailhub.collector.vcard import contact_uuid
from mailhub.directory.memory import MemoryStore
from mailhub.directory.service import Directory
from mailhub.directory.sql import MIGRATIONS, SQLiteDialect, SQLStore, run_inline
from mailhub.directory.model import User
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from tests.collector.fakes import FakeCardDAV, FakeUsers

ALICE = User(login="alice@example.org", name="Alice", emails=("alice@example.org",), id="A1")
HOME = "/dav/alice@example.org/"
COLLECTED = HOME + "collected/"
PERSONAL = HOME + "personal/"
DAY = 86400.0


def body(**message: Any) -> bytes:
    return json.dumps(message).encode("utf-8")


def card(uid: str, email: str) -> str:
    return ("BEGIN:VCARD\r\nVERSION:3.0\r\nUID:%s\r\nFN:%s\r\nEMAIL:%s\r\nEND:VCARD\r\n"
            % (uid, email, email))


class Instance:
    """One mailhub instance's collector: its engine, its state, its metrics."""

    def __init__(self, test: "ForgetTests", store: Any, **state: Any) -> None:
        self.metrics = Metrics()
        self.state = CollectorState(store, test.clock, **state)
        client = CardDAVClient(StubTreq(test.dav), test.clock, credentials=("svc", "pw"),
                               metrics=self.metrics)
        self.engine = CollectorEngine(
            FakeUsers([ALICE]), client, BookLayout.from_config("http://dav.test/dav/", ""),
            Hub(), self.metrics, test.clock, state=self.state)

    def skipped(self, reason: str) -> float:
        return self.metrics.value("mailhub_collector_skipped_total", {"reason": reason})


class ForgetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dav = FakeCardDAV()
        self.dav.homes.add(HOME)
        self.dav.books[PERSONAL] = {}
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = MemoryStore()
        self.one = Instance(self, self.store)

    def handle(self, *emails: str, instance: Instance | None = None) -> Any:
        engine = (instance or self.one).engine
        return self.successResultOf(engine.handle(body(userId="A1", emails=list(emails))))

    def row(self) -> Any:
        return self.successResultOf(self.store.collector_state("alice@example.org"))

    def delete(self, email: str) -> None:
        del self.dav.books[COLLECTED][contact_uuid(email) + ".vcf"]

    # -- forget --------------------------------------------------------------

    def test_a_contact_the_user_deleted_is_never_collected_again(self) -> None:
        self.handle("Ann <a@x.org>", "b@x.org")
        self.delete("b@x.org")
        outcome = self.handle("Ann <a@x.org>", "b@x.org")
        self.assertEqual(outcome.created, [])
        self.assertEqual(outcome.skipped, {"exists": ["a@x.org"], "forgotten": ["b@x.org"]})
        self.assertNotIn(contact_uuid("b@x.org") + ".vcf", self.dav.cards(COLLECTED))
        self.assertEqual(set(self.row().tombstones), {"b@x.org"})
        self.assertEqual(self.row().tombstones["b@x.org"][1], BY_USER)
        # And again, from memory: no lookup, no database read.
        reads, requests = self.one.state.reads, len(self.dav.log)
        outcome = self.handle("b@x.org")
        self.assertEqual(outcome.skipped, {"forgotten": ["b@x.org"]})
        self.assertEqual((self.one.state.reads, len(self.dav.log)), (reads, requests))
        self.assertEqual(self.one.skipped("forgotten"), 2)

    def test_a_deletion_seen_by_a_lookup_for_another_address_counts_too(self) -> None:
        self.handle("b@x.org")
        self.delete("b@x.org")
        self.handle("new@x.org")  # its lookup syncs the book and sees the deletion
        outcome = self.handle("b@x.org")
        self.assertEqual(outcome.skipped, {"forgotten": ["b@x.org"]})

    def test_re_collecting_known_addresses_reads_the_database_once_per_user(self) -> None:
        self.handle("a@x.org", "b@x.org")
        reads = self.one.state.reads
        for _ in range(5):
            outcome = self.handle("a@x.org", "b@x.org")
            self.assertEqual(outcome.skipped, {"exists": ["a@x.org", "b@x.org"]})
        self.assertEqual(reads, 1)
        self.assertEqual(self.one.state.reads, 1)

    def test_forget_days_lets_the_address_be_collected_again(self) -> None:
        one = self.one = Instance(self, self.store, forget_days=30)
        self.handle("b@x.org")
        self.delete("b@x.org")
        self.assertEqual(self.handle("b@x.org").skipped, {"forgotten": ["b@x.org"]})
        self.clock.advance(29 * DAY)
        self.assertEqual(self.handle("b@x.org").skipped, {"forgotten": ["b@x.org"]})
        self.clock.advance(1 * DAY)
        self.assertEqual(self.handle("b@x.org").created, ["b@x.org"])
        self.assertEqual(one.skipped("forgotten"), 2)

    def test_forget_off_collects_a_deleted_contact_again(self) -> None:
        self.one = Instance(self, self.store, forget=False)
        self.handle("b@x.org")
        self.delete("b@x.org")
        self.assertEqual(self.handle("b@x.org").created, ["b@x.org"])
        self.assertEqual(self.row().tombstones, {})

    def test_the_user_adding_the_address_to_a_book_lifts_the_tombstone(self) -> None:
        self.handle("b@x.org")
        self.delete("b@x.org")
        self.assertEqual(self.handle("b@x.org").skipped, {"forgotten": ["b@x.org"]})
        self.dav.add_card(PERSONAL, "bob.vcf", card("bob", "B@x.org"))
        self.handle("other@x.org")  # a lookup reads the books: the card is seen
        self.assertEqual(self.row().tombstones, {})
        self.assertEqual(self.handle("b@x.org").skipped, {"exists": ["b@x.org"]})
        # Their own card, deleted later: an address like any other again.
        del self.dav.books[PERSONAL]["bob.vcf"]
        self.clock.advance(700)  # past the cache of known addresses
        self.assertEqual(self.handle("b@x.org").created, ["b@x.org"])

    def test_a_card_mailhub_removed_itself_is_not_a_tombstone(self) -> None:
        self.handle("b@x.org", "c@x.org")
        self.successResultOf(self.one.state.removed_by_collector(
            "Alice@Example.org", ["B@x.org"]))
        self.assertEqual(self.row().tombstones["b@x.org"][1], BY_MAILHUB)
        self.delete("b@x.org")
        self.delete("c@x.org")  # this one by the user
        outcome = self.handle("b@x.org", "c@x.org")
        self.assertEqual(outcome.created, ["b@x.org"])
        self.assertEqual(outcome.skipped, {"forgotten": ["c@x.org"]})
        self.assertEqual(set(self.row().tombstones), {"c@x.org"})

    def test_an_announced_removal_never_seen_is_void_once_collected_again(self) -> None:
        self.successResultOf(self.one.state.removed_by_collector("alice@example.org",
                                                                 ["b@x.org"]))
        self.assertEqual(self.handle("b@x.org").created, ["b@x.org"])
        self.assertEqual(self.row().tombstones, {})
        self.delete("b@x.org")
        self.assertEqual(self.handle("b@x.org").skipped, {"forgotten": ["b@x.org"]})

    def test_what_retention_expires_is_not_taken_for_the_users_deletion(self) -> None:
        # As tap wires them: the pass tells the state before each DELETE.
        from mailhub.collector.retention import Retention

        self.handle("b@x.org")
        client = CardDAVClient(StubTreq(self.dav), self.clock, credentials=("svc", "pw"))
        retention = Retention(FakeUsers([ALICE]), client,
                              BookLayout.from_config("http://dav.test/dav/", ""), self.clock,
                              expire_days=30, usage=self.one.engine.usage,
                              on_removed=self.one.state.removed_by_collector)
        self.clock.advance(31 * DAY)
        done = ensureDeferred(retention.run_pass())
        while not done.called:
            self.clock.advance(0)
        self.assertEqual(self.successResultOf(done).expired, 1)
        self.assertNotIn(contact_uuid("b@x.org") + ".vcf", self.dav.cards(COLLECTED))
        # Written to again, the address is collected again: no tombstone.
        outcome = self.handle("b@x.org")
        self.assertEqual(outcome.created, ["b@x.org"])
        self.assertNotEqual(self.row().tombstones.get("b@x.org", (0, ""))[1], BY_USER)

    def test_a_card_deleted_before_any_sync_saw_it_is_still_a_deletion(self) -> None:
        self.handle("b@x.org")    # the copy was read before the PUT: it never held b
        self.delete("b@x.org")
        self.dav.forget_tokens()  # and the next sync reads the book whole
        self.assertEqual(self.handle("b@x.org").skipped, {"forgotten": ["b@x.org"]})

    def test_a_book_read_whole_tells_no_deletion_of_what_it_had_seen(self) -> None:
        self.handle("b@x.org")
        self.handle("new@x.org")  # a sync finds b: mailhub's own write is accounted for
        self.delete("b@x.org")
        self.dav.forget_tokens()  # the copy is read whole again: nothing to compare
        self.assertEqual(self.handle("b@x.org").created, ["b@x.org"])

    # -- opt-out -----------------------------------------------------------------

    def test_deleting_the_collected_book_opts_the_user_out(self) -> None:
        self.handle("a@x.org")
        del self.dav.books[COLLECTED]
        outcome = self.handle("a@x.org", "new@x.org")
        self.assertEqual(outcome.created, [])
        self.assertEqual(sorted(outcome.skipped["opted_out"]), ["a@x.org", "new@x.org"])
        self.assertEqual(list(outcome.skipped), ["opted_out"])
        self.assertNotIn(COLLECTED, self.dav.books)
        self.assertFalse(self.row().collect)
        before = self.dav.methods().count("MKCOL")
        self.assertEqual(self.handle("z@x.org").skipped, {"opted_out": ["z@x.org"]})
        self.assertEqual(self.dav.methods().count("MKCOL"), before)
        self.assertEqual(self.one.skipped("opted_out"), 3)

    def test_book_opt_out_off_makes_the_book_again(self) -> None:
        self.one = Instance(self, self.store, book_opt_out=False)
        self.handle("a@x.org")
        del self.dav.books[COLLECTED]
        self.assertEqual(self.handle("a@x.org").created, ["a@x.org"])
        self.assertTrue(self.row().collect)

    def test_a_book_never_seen_is_made(self) -> None:
        self.assertEqual(self.handle("a@x.org").created, ["a@x.org"])
        self.assertTrue(self.row().book_seen)

    def test_a_book_made_before_the_upgrade_is_seen_then_its_deletion_opts_out(self) -> None:
        self.dav.books[COLLECTED] = {}
        self.handle("a@x.org")
        self.assertTrue(self.row().book_seen)
        self.dav.books.pop(COLLECTED)
        self.assertEqual(self.handle("b@x.org").skipped, {"opted_out": ["b@x.org"]})

    # -- block list ----------------------------------------------------------------

    def test_block_entries_and_matching(self) -> None:
        self.assertEqual(block_entry(" Bob@X.ORG "), "bob@x.org")
        self.assertEqual(block_entry("@Spam.Example."), "@spam.example")
        self.assertIsNone(block_entry("@"))
        self.assertIsNone(block_entry("not an address"))
        entries = frozenset(["bob@x.org", "@spam.example"])
        self.assertTrue(blocked("bob@x.org", entries))
        self.assertTrue(blocked("anyone@spam.example", entries))
        self.assertTrue(blocked("anyone@mx.spam.example", entries))
        self.assertFalse(blocked("anyone@notspam.example", entries))
        self.assertFalse(blocked("carol@x.org", entries))
        self.assertEqual(login_key(" Alice@Example.ORG "), "alice@example.org")


class CommandLineTests(SynchronousTestCase):
    """``mailhub user set`` on a SQLite file, seen by a running instance's state
    through the directory's change log (as another process's change is)."""

    def setUp(self) -> None:
        # A system temp folder: trial's mktemp writes into the working directory.
        self.folder = Path(tempfile.mkdtemp(prefix="mailhub-forget-"))
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.ini = self.folder / "mailhub.ini"
        self.ini.write_text("[mailhub]\ndata = %s\n" % (self.folder / "data"))
        self.assertEqual(self.mailhub("user", "add", "alice@example.org", "--name", "Alice")[0], 0)
        self.store = SQLStore(SQLiteDialect(str(self.folder / "data" / "mailhub.sqlite")),
                              runner=run_inline)
        self.addCleanup(self.store.close_all)
        self.assertEqual(self.successResultOf(self.store.migrate()), len(MIGRATIONS))
        self.dav = FakeCardDAV()
        self.dav.homes.add(HOME)
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.directory = Directory(self.store, self.clock)
        self.successResultOf(ensureDeferred(self.directory.load()))
        self.one = Instance(self, self.store)  # type: ignore[arg-type]
        self.directory.on_change.append(self.one.state.directory_changed)

    def mailhub(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = cli.main([*argv, "--config", str(self.ini)], stdin=io.StringIO(),
                        stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    def handle(self, *emails: str) -> Any:
        return self.successResultOf(self.one.engine.handle(body(userId="A1",
                                                                emails=list(emails))))

    def follow(self) -> None:
        self.successResultOf(ensureDeferred(self.directory.refresh()))

    def test_collect_off_then_on(self) -> None:
        self.assertEqual(self.handle("a@x.org").created, ["a@x.org"])
        code, out, err = self.mailhub("user", "set", "Alice@example.org", "collect=off")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("alice@example.org: collect=off", out)
        self.follow()
        self.assertEqual(self.handle("b@x.org").skipped, {"opted_out": ["b@x.org"]})
        # Meanwhile the user deletes the book; on again, it is made again.
        self.dav.books.pop(COLLECTED)
        self.assertEqual(self.mailhub("user", "set", "alice@example.org", "collect=on")[0], 0)
        self.follow()
        self.assertEqual(self.handle("b@x.org").created, ["b@x.org"])
        self.assertIn(COLLECTED, self.dav.books)

    def test_block_and_unblock(self) -> None:
        code, out, _ = self.mailhub("user", "set", "alice@example.org", "block=Bob@x.org",
                                    "block=@spam.example")
        self.assertEqual(code, 0)
        self.assertIn("blocked: @spam.example, bob@x.org", out)
        self.follow()
        outcome = self.handle("bob@x.org", "x@mail.spam.example", "c@x.org")
        self.assertEqual(outcome.created, ["c@x.org"])
        self.assertEqual(outcome.skipped, {"blocked": ["bob@x.org", "x@mail.spam.example"]})
        self.assertEqual(self.one.skipped("blocked"), 2)
        self.mailhub("user", "set", "alice@example.org", "unblock=bob@x.org")
        self.follow()
        self.assertEqual(self.handle("bob@x.org").created, ["bob@x.org"])

    def test_unforget(self) -> None:
        self.handle("b@x.org")
        del self.dav.books[COLLECTED][contact_uuid("b@x.org") + ".vcf"]
        self.assertEqual(self.handle("b@x.org").skipped, {"forgotten": ["b@x.org"]})
        code, out, _ = self.mailhub("user", "set", "alice@example.org")
        self.assertIn("forgotten: b@x.org", out)
        self.mailhub("user", "set", "alice@example.org", "unforget=B@x.org")
        self.follow()
        self.assertEqual(self.handle("b@x.org").created, ["b@x.org"])

    def test_bad_settings_say_what_is_wrong(self) -> None:
        for setting, why in (("collect=maybe", "collect is on or off"),
                             ("colour=red", "expected NAME=VALUE"),
                             ("block=nobody", "expected an address")):
            code, _, err = self.mailhub("user", "set", "alice@example.org", setting)
            self.assertEqual(code, 1, setting)
            self.assertIn(why, err)

    def test_an_other_instance_honours_the_tombstone_after_the_change_log(self) -> None:
        two = Instance(self, self.store)  # type: ignore[arg-type]
        self.directory.on_change.append(two.state.directory_changed)
        self.handle("a@x.org")
        # Instance two has read alice's state and copied her book (no b yet).
        self.assertEqual(self.successResultOf(two.engine.handle(
            body(userId="A1", emails=["a@x.org"]))).skipped, {"exists": ["a@x.org"]})
        self.assertIsNotNone(two.state.cached("alice@example.org"))
        self.handle("b@x.org")
        del self.dav.books[COLLECTED][contact_uuid("b@x.org") + ".vcf"]
        self.handle("new@x.org")  # instance one sees the deletion
        # Instance two's copy never held b: only the database can tell it.
        self.follow()             # instance two reads the change log
        self.assertIsNone(two.state.cached("alice@example.org"))
        outcome = self.successResultOf(two.engine.handle(
            body(userId="A1", emails=["b@x.org"])))
        self.assertEqual(outcome.skipped, {"forgotten": ["b@x.org"]})
