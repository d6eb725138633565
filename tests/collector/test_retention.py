"""Ranking and retention of collected contacts, against the in-memory CardDAV server.

What a user would notice: the ranking properties in their cards (written at
most once a day, whatever the number of messages), contacts nobody wrote to
for expire_days gone, the least recently used gone beyond max_contacts, and
every card they edited or added left alone.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailhub.collector.addresses import address_key
from mailhub.collector.carddav import BookLayout, Card, CardDAVClient
from mailhub.collector.engine import CollectorEngine
from mailhub.collector.retention import (
    FIRST_PASS, RANK_INTERVAL, Retention, RetentionService, Usage, decide,
)
from mailhub.collector.vcard import (
    X_COUNT, X_HASH, X_LAST_USED, Contact, contact_uuid, edited, ranking_of, sign, to_vcard,
    unfold, with_name, with_ranking,
)
from mailhub.directory.model import User
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from tests.collector.fakes import FakeCardDAV, FakeUsers

ALICE = User(login="alice@example.org", name="Alice", emails=("alice@example.org",), id="A1")
BOB = User(login="bob@example.org", name="Bob", emails=("bob@example.org",), id="B2")
HOME = "/dav/alice@example.org/"
COLLECTED = HOME + "collected/"
DAY = 86400.0
START = 1_700_000_000.0


def body(**message: Any) -> bytes:
    return json.dumps(message).encode("utf-8")


def card_of(email: str, fn: str = "", when: float = START, source: str = "mail") -> str:
    return to_vcard(Contact(uid=contact_uuid(email), email=email, fn=fn or email,
                            rev=datetime.fromtimestamp(when, timezone.utc), source=source,
                            count=1, note="Collected automatically."))


class CardOwnershipTests(SynchronousTestCase):
    """X-MAILHUB-HASH tells a card as mailhub wrote it from one its user edited."""

    def test_a_card_mailhub_wrote_is_signed_and_not_edited_in_both_versions(self) -> None:
        for version in ("4.0", "3.0"):
            text = to_vcard(Contact(uid=contact_uuid("j@x.org"), email="j@x.org", fn="J D",
                                    source="mail", count=1), version)
            self.assertTrue(any(line.startswith(X_HASH + ":") for line in unfold(text)))
            self.assertFalse(edited(text))

    def test_what_servers_do_to_a_stored_card_is_not_an_edit(self) -> None:
        text = to_vcard(Contact(uid=contact_uuid("j@x.org"), email="j@x.org", fn="Doe, J",
                                source="mail", count=1), "3.0")
        lines = unfold(text)
        # Reordered, names lower-cased, TYPE=a,b split as vobject writes it,
        # a PRODID and REV of the server's own, CRLF lost.
        inner = [line for line in lines[1:-1] if not line.startswith(("PRODID", "REV"))]
        inner = [line.replace("EMAIL;TYPE=INTERNET,WORK", "email;type=internet;type=work")
                 for line in reversed(inner)]
        rewritten = "\n".join(["BEGIN:VCARD", *inner, "PRODID:-//Radicale//NONSGML//EN",
                               "REV:20300101T000000Z", "END:VCARD"])
        self.assertFalse(edited(rewritten))

    def test_a_changed_name_or_an_added_phone_number_is_an_edit(self) -> None:
        text = card_of("j@x.org", "J D")
        self.assertTrue(edited(text.replace("FN:J D", "FN:Jane Doe")))
        self.assertTrue(edited(text.replace("END:VCARD", "TEL:+33 1 23 45 67 89\r\nEND:VCARD")))

    def test_ranking_and_the_name_mailhub_fills_in_are_not_edits(self) -> None:
        text = card_of("j@x.org")
        ranked = with_ranking(text, 7, datetime(2030, 1, 2, tzinfo=timezone.utc))
        self.assertFalse(edited(ranked))
        self.assertEqual(ranking_of(ranked).count, 7)
        self.assertEqual(ranking_of(ranked).last_used,
                         datetime(2030, 1, 2, tzinfo=timezone.utc))
        self.assertFalse(edited(with_name(ranked, "Jane Doe", "Doe", "Jane")))

    def test_an_edited_card_stays_edited_after_mailhub_ranks_it(self) -> None:
        mine = card_of("j@x.org").replace("END:VCARD", "TEL:123\r\nEND:VCARD")
        self.assertTrue(edited(with_ranking(mine, 2, datetime(2030, 1, 2, tzinfo=timezone.utc))))

    def test_a_card_collected_before_signing_is_mailhubs_unless_changed(self) -> None:
        legacy = to_vcard(Contact(uid=contact_uuid("j@x.org"), email="j@x.org", fn="J"))
        self.assertNotIn(X_HASH, legacy)
        self.assertFalse(edited(legacy))
        self.assertTrue(edited(legacy.replace("END:VCARD", "TEL:1\r\nEND:VCARD")))
        self.assertTrue(edited(legacy.replace("-//mailhub//collector//EN", "-//Thunderbird")))
        self.assertFalse(edited(sign(legacy)))

    def test_a_card_the_user_wrote_is_theirs(self) -> None:
        self.assertTrue(edited("BEGIN:VCARD\r\nVERSION:3.0\r\nUID:abc\r\nFN:Bob\r\n"
                               "EMAIL:bob@x.org\r\nEND:VCARD\r\n"))


class RankingTests(SynchronousTestCase):
    """The engine writes each contact's ranking into its card, at most once a day."""

    def setUp(self) -> None:
        self.dav = FakeCardDAV()
        self.dav.homes.add(HOME)
        self.clock = Clock()
        self.clock.advance(START)
        self.metrics = Metrics()
        client = CardDAVClient(StubTreq(self.dav), self.clock, metrics=self.metrics)
        self.engine = CollectorEngine(
            FakeUsers([ALICE, BOB]), client, BookLayout.from_config("http://dav.test/dav/", ""),
            Hub(), self.metrics, self.clock)

    def collect(self, *emails: str) -> Any:
        return self.successResultOf(self.engine.handle(body(userId="A1", emails=list(emails))))

    def card(self, email: str) -> str:
        return self.dav.cards(COLLECTED)[contact_uuid(email) + ".vcf"]

    def puts(self) -> int:
        return self.dav.methods().count("PUT")

    def test_a_new_contact_says_it_was_used_once_now(self) -> None:
        self.collect("Kim <k@y.org>")
        lines = unfold(self.card("k@y.org"))
        self.assertIn(X_COUNT + ":1", lines)
        self.assertIn(X_LAST_USED + ":20231114T221320Z", lines)

    def test_re_collecting_within_a_day_makes_no_put_and_the_next_day_one(self) -> None:
        self.collect("Kim <k@y.org>")
        puts = self.puts()
        for _ in range(3):
            self.clock.advance(3600)
            self.collect("Kim <k@y.org>")
        self.assertEqual(self.puts(), puts)  # counted in memory only
        self.assertEqual(ranking_of(self.card("k@y.org")).count, 1)
        self.clock.advance(DAY)
        self.collect("Kim <k@y.org>", "other@y.org")
        self.assertEqual(self.puts(), puts + 2)  # the ranking, and other@y.org's creation
        ranking = ranking_of(self.card("k@y.org"))
        self.assertEqual(ranking.count, 5)
        self.assertEqual(ranking.last_used.timestamp(), self.clock.seconds())
        self.assertFalse(edited(self.card("k@y.org")))
        self.assertEqual(self.metrics.value("mailhub_collector_ranked_total"), 1)
        self.collect("Kim <k@y.org>")
        self.assertEqual(self.puts(), puts + 2)  # a day again before the next write

    def test_a_card_collected_before_ranking_gets_its_properties_at_its_first_use(self) -> None:
        self.dav.books[COLLECTED] = {contact_uuid("k@y.org") + ".vcf": to_vcard(Contact(
            uid=contact_uuid("k@y.org"), email="k@y.org", fn="Kim",
            rev=datetime(2020, 1, 1, tzinfo=timezone.utc)))}
        self.collect("Kim <k@y.org>")
        self.assertEqual(self.puts(), 1)
        self.assertEqual(ranking_of(self.card("k@y.org")).count, 1)

    def test_the_users_edits_survive_the_ranking(self) -> None:
        self.collect("Kim <k@y.org>")
        name = contact_uuid("k@y.org") + ".vcf"
        self.dav.books[COLLECTED][name] = self.card("k@y.org").replace(
            "END:VCARD", "TEL:+1 555 0100\r\nEND:VCARD")
        self.clock.advance(DAY)
        self.collect("Kim <k@y.org>")
        self.assertIn("TEL:+1 555 0100", unfold(self.card("k@y.org")))
        self.assertEqual(ranking_of(self.card("k@y.org")).count, 2)
        self.assertTrue(edited(self.card("k@y.org")))

    def test_with_rank_off_cards_carry_no_ranking_and_nothing_is_rewritten(self) -> None:
        client = CardDAVClient(StubTreq(self.dav), self.clock)
        self.engine = CollectorEngine(
            FakeUsers([ALICE]), client, BookLayout.from_config("http://dav.test/dav/", ""),
            Hub(), Metrics(), self.clock, rank=False)
        self.collect("k@y.org")
        self.assertNotIn(X_COUNT, self.card("k@y.org"))
        self.clock.advance(2 * DAY)
        puts = self.puts()
        self.collect("k@y.org")
        self.assertEqual(self.puts(), puts)

    def test_a_failed_ranking_write_does_not_fail_the_message(self) -> None:
        self.collect("k@y.org")
        self.clock.advance(DAY)
        refused = self.dav.do_GET
        self.dav.do_GET = lambda request, path, body: (  # type: ignore[method-assign]
            request.setResponseCode(503), b"")[1]
        outcome = self.collect("k@y.org")
        self.dav.do_GET = refused  # type: ignore[method-assign]
        self.flushLoggedErrors()
        self.assertEqual(outcome.skipped, {"exists": ["k@y.org"]})
        self.collect("k@y.org")  # the uses stay counted, written next time
        self.assertEqual(ranking_of(self.card("k@y.org")).count, 3)


class RetentionTests(SynchronousTestCase):
    """A pass removes expired and over-the-cap contacts, never the user's own."""

    def setUp(self) -> None:
        self.dav = FakeCardDAV()
        self.dav.homes.add(HOME)
        self.dav.books[COLLECTED] = {}
        self.clock = Clock()
        self.clock.advance(START + 100 * DAY)
        self.metrics = Metrics()
        self.client = CardDAVClient(StubTreq(self.dav), self.clock)
        self.told: list[tuple[str, list[str], list[str]]] = []

    def retention(self, **kw: Any) -> Retention:
        def on_removed(user_id: str, addresses: list[str]) -> Deferred[None]:
            # What the book still holds when told: nothing is deleted before.
            self.told.append((user_id, sorted(addresses), sorted(self.dav.cards(COLLECTED))))
            return succeed(None)
        kw.setdefault("on_removed", on_removed)
        return Retention(FakeUsers([ALICE, BOB]), self.client,
                         BookLayout.from_config("http://dav.test/dav/", ""), self.clock,
                         metrics=self.metrics, **kw)

    def run_pass(self, retention: Retention) -> Any:
        d = Deferred.fromCoroutine(retention.run_pass())
        for _ in range(10):  # the pass lets the reactor turn between pages
            self.clock.advance(0)
        return self.successResultOf(d)

    def put(self, email: str, days_ago: float, edit: str = "") -> str:
        name = contact_uuid(email) + ".vcf"
        text = with_ranking(card_of(email, when=START), 1,
                            datetime.fromtimestamp(self.clock.seconds() - days_ago * DAY,
                                                   timezone.utc))
        if edit:
            text = text.replace("END:VCARD", edit + "\r\nEND:VCARD")
        self.dav.books[COLLECTED][name] = text
        return name

    def names(self) -> set[str]:
        return set(self.dav.cards(COLLECTED))

    def test_contacts_unused_for_expire_days_go_and_the_user_is_told_first(self) -> None:
        old = self.put("old@x.org", 31)
        recent = self.put("recent@x.org", 29)
        report = self.run_pass(self.retention(expire_days=30))
        self.assertEqual(self.names(), {recent})
        self.assertEqual(self.told, [("alice@example.org", ["old@x.org"], sorted([old, recent]))])
        self.assertEqual((report.users, report.cards, report.expired), (2, 2, 1))
        self.assertEqual(self.metrics.value("mailhub_collector_removed_total",
                                            {"reason": "expired"}), 1)
        self.assertIn("DELETE", self.dav.methods())

    def test_an_edited_contact_is_kept_past_expiry_and_not_counted(self) -> None:
        edited_card = self.put("kept@x.org", 400, edit="TEL:+1 555 0100")
        mine = "bob.vcf"
        self.dav.books[COLLECTED][mine] = ("BEGIN:VCARD\r\nVERSION:3.0\r\nUID:b\r\nFN:B\r\n"
                                           "EMAIL:b@x.org\r\nEND:VCARD\r\n")
        fresh = [self.put("n%d@x.org" % i, i) for i in range(2)]
        report = self.run_pass(self.retention(expire_days=30, max_contacts=2))
        self.assertEqual(self.names(), {edited_card, mine, *fresh})
        self.assertEqual(report.users_own, 2)
        self.assertEqual(self.told, [])

    def test_over_the_cap_the_least_recently_used_go(self) -> None:
        names = {i: self.put("n%d@x.org" % i, i) for i in range(5)}
        self.run_pass(self.retention(max_contacts=3))
        self.assertEqual(self.names(), {names[0], names[1], names[2]})
        self.assertEqual(self.told[0][1], ["n3@x.org", "n4@x.org"])
        self.assertEqual(self.metrics.value("mailhub_collector_removed_total",
                                            {"reason": "over_limit"}), 2)

    def test_a_card_edited_between_the_read_and_the_delete_stays(self) -> None:
        name = self.put("old@x.org", 90)

        def edit_meanwhile(user_id: str, addresses: list[str]) -> Deferred[None]:
            self.dav.books[COLLECTED][name] += "TEL:1\r\n"
            return succeed(None)

        report = self.run_pass(self.retention(expire_days=30, on_removed=edit_meanwhile))
        self.assertEqual(self.names(), {name})
        self.assertEqual((report.expired, report.kept_changed), (0, 1))

    def test_uses_counted_in_memory_and_not_yet_written_keep_a_contact(self) -> None:
        usage = Usage(self.clock)
        name = self.put("old@x.org", 31)
        usage.used("alice@example.org", address_key("old@x.org"))
        self.run_pass(self.retention(expire_days=30, usage=usage))
        self.assertEqual(self.names(), {name})

    def test_a_server_without_sync_collection_is_read_with_a_query(self) -> None:
        self.dav.sync = False  # a 403 on sync-collection, as Radicale on a non-book
        recent = self.put("recent@x.org", 1)
        self.put("old@x.org", 31)
        retention = self.retention(expire_days=30)
        self.run_pass(retention)
        self.assertEqual(self.names(), {recent})
        self.put("old@x.org", 31)
        before = self.dav.methods().count("REPORT")
        self.run_pass(retention)  # the query at once, without asking for a sync again
        self.assertEqual(self.dav.methods().count("REPORT") - before, 2)  # alice's, bob's
        self.assertEqual(self.names(), {recent})

    def test_a_large_book_is_assessed_a_slice_at_a_time(self) -> None:
        for i in range(45):
            self.put("n%d@x.org" % i, 40)
        d = Deferred.fromCoroutine(self.retention(expire_days=30).run_pass())
        self.assertNoResult(d)  # the reactor turns between slices of cards
        self.assertEqual(len(self.names()), 45)
        for _ in range(10):
            self.clock.advance(0)
        self.assertEqual(self.successResultOf(d).expired, 45)
        self.assertEqual(self.names(), set())

    def test_a_failing_book_does_not_stop_the_pass(self) -> None:
        self.dav.books["/dav/bob@example.org/collected/"] = {}
        self.put("old@x.org", 31)
        self.dav.fail_next = [500]  # alice's read fails
        report = self.run_pass(self.retention(expire_days=30, concurrency=1))
        self.assertEqual((report.users, report.failed), (2, 1))

    def test_decide_keeps_the_most_recent_and_the_most_used_among_equals(self) -> None:
        when = datetime.fromtimestamp(START, timezone.utc)
        cards = [Card("/c/%d" % n, "", with_ranking(card_of("n%d@x.org" % n), n, when))
                 for n in (1, 5, 3)]
        decision = decide(cards, START, max_contacts=2)
        self.assertEqual([d.email for d in decision.doomed], ["n1@x.org"])


class RetentionServiceTests(SynchronousTestCase):
    """Passes run on the injected clock, every retention_interval, never two at once."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.passes: list[Deferred[Any]] = []

        class Counting(Retention):
            def run_pass(inner) -> Any:  # type: ignore[override]
                d: Deferred[Any] = Deferred()
                self.passes.append(d)
                return d

        self.retention = Counting(FakeUsers([]), CardDAVClient(StubTreq(FakeCardDAV()),
                                                                self.clock),
                                  BookLayout.from_config("http://dav.test/dav/", ""),
                                  self.clock, expire_days=30)

    def test_passes_start_after_the_first_delay_and_then_every_interval(self) -> None:
        service = RetentionService(self.retention, self.clock, interval=RANK_INTERVAL)
        service.startService()
        self.clock.advance(FIRST_PASS - 1)
        self.assertEqual(len(self.passes), 0)
        self.clock.advance(1)
        self.assertEqual(len(self.passes), 1)
        self.clock.advance(RANK_INTERVAL)  # still running: skipped
        self.assertEqual(len(self.passes), 1)
        self.passes[0].callback(None)
        self.clock.advance(RANK_INTERVAL)
        self.assertEqual(len(self.passes), 2)
        self.passes[1].callback(None)
        service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_nothing_runs_when_neither_rule_is_set(self) -> None:
        self.retention.expire_after = 0
        service = RetentionService(self.retention, self.clock, interval=60)
        service.startService()
        self.clock.advance(10 * DAY)
        self.assertEqual(self.passes, [])
        service.stopService()
