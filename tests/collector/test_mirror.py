"""The local copies of users' books: exact after every change, bounded, and a
query wherever the server does not do sync-collection."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from mailhub.collector.carddav import (BookLayout, CardDAVClient, Changes, SyncRefused,
                                       TokenExpired)
from mailhub.collector.engine import CollectorEngine
from mailhub.collector.mirror import BookMirror
from mailhub.collector.vcard import Contact, contact_uuid, to_vcard
from mailhub.directory.model import User
from mailhub.errors import Unavailable
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from tests.collector.fakes import CountingTokens, FakeCardDAV, FakeUsers

ALICE = User(login="alice@example.org", emails=("alice@example.org",), id="A1")
HOME = "/dav/alice@example.org/"
PERSONAL = HOME + "personal/"
COLLECTED = HOME + "collected/"
URL = "http://dav.test"


def card(email: str, name: str = "Someone") -> str:
    return to_vcard(Contact(uid=contact_uuid(email), email=email, fn=name))


class Harness(SynchronousTestCase):
    """An engine, its mirror and a fake server with a personal book."""

    mirror_size = 1000
    server = FakeCardDAV

    def setUp(self) -> None:
        self.dav = self.server()
        self.dav.homes.add(HOME)
        self.dav.books[PERSONAL] = {}
        self.metrics = Metrics()
        self.client = CardDAVClient(StubTreq(self.dav), Clock(), metrics=self.metrics)
        # The known-address cache would answer for the books: each message
        # here comes after its entries expired.
        self.clock = Clock()
        self.engine = CollectorEngine(
            FakeUsers([ALICE]), self.client, BookLayout.from_config(URL + "/dav/", ""),
            Hub(), self.metrics, self.clock, cache_ttl=1.0, mirror_size=self.mirror_size)

    def collect(self, *emails: str) -> Any:
        self.clock.advance(2)
        body = json.dumps({"userId": "A1", "emails": list(emails)}).encode()
        return self.successResultOf(self.engine.handle(body))


class MirrorTests(Harness):
    def test_a_card_added_between_two_messages_is_seen(self) -> None:
        self.assertEqual(self.collect("a@x.org").created, ["a@x.org"])
        self.dav.add_card(PERSONAL, "b.vcf", card("B@X.org"))
        outcome = self.collect("b@x.org", "c@x.org")
        self.assertEqual(outcome.created, ["c@x.org"])
        self.assertEqual(outcome.skipped, {"exists": ["b@x.org"]})

    def test_a_card_deleted_between_two_messages_is_collected_again(self) -> None:
        self.dav.add_card(PERSONAL, "b.vcf", card("b@x.org"))
        self.assertEqual(self.collect("b@x.org").skipped, {"exists": ["b@x.org"]})
        del self.dav.books[PERSONAL]["b.vcf"]
        self.assertEqual(self.collect("b@x.org").created, ["b@x.org"])

    def test_a_card_whose_address_changed_answers_for_its_new_address_only(self) -> None:
        self.dav.add_card(PERSONAL, "b.vcf", card("old@x.org"))
        self.assertEqual(self.collect("old@x.org").skipped, {"exists": ["old@x.org"]})
        self.dav.add_card(PERSONAL, "b.vcf", card("new@x.org"))
        outcome = self.collect("old@x.org", "new@x.org")
        self.assertEqual(outcome.created, ["old@x.org"])
        self.assertEqual(outcome.skipped, {"exists": ["new@x.org"]})

    def test_after_the_first_lookup_only_the_changes_are_sent(self) -> None:
        for i in range(20):
            self.dav.add_card(PERSONAL, "p%d.vcf" % i, card("p%d@x.org" % i))
        self.collect("a@x.org")
        sent: list[int] = []
        real = self.client.changes

        async def counting(book: str, token: str) -> Changes | None:
            changes = await real(book, token)
            if book.endswith("/personal/") and changes is not None:
                sent.append(len(changes.changed))
            return changes

        self.client.changes = counting  # type: ignore[method-assign]
        self.dav.add_card(PERSONAL, "q.vcf", card("q@x.org"))
        self.assertEqual(self.collect("q@x.org").skipped, {"exists": ["q@x.org"]})
        self.collect("r@x.org")
        self.assertEqual(sent, [1, 0])
        # personal: 20 cards and q; collected: a (r is PUT after the lookup).
        self.assertEqual(len(self.engine.books), 22)
        self.assertEqual(self.metrics.value("mailhub_collector_mirror_cards"), 22)

    def test_the_collectors_own_cards_are_known_to_the_next_message(self) -> None:
        self.collect("a@x.org")
        self.engine.known.forget(ALICE.login)
        before = self.dav.methods().count("PUT")
        self.assertEqual(self.collect("A@x.org").skipped, {"exists": ["A@x.org"]})
        self.assertEqual(self.dav.methods().count("PUT"), before)

    def test_an_expired_token_reads_the_whole_book_again(self) -> None:
        self.dav.add_card(PERSONAL, "b.vcf", card("b@x.org"))
        self.collect("a@x.org")
        self.dav.forget_tokens()
        self.dav.add_card(PERSONAL, "c.vcf", card("c@x.org"))
        outcome = self.collect("b@x.org", "c@x.org", "d@x.org")
        self.assertEqual(outcome.created, ["d@x.org"])
        self.assertEqual(sorted(outcome.skipped["exists"]), ["b@x.org", "c@x.org"])
        self.assertEqual(
            self.metrics.value("mailhub_collector_mirror_syncs_total", {"kind": "full"}), 3)

    def test_a_truncated_answer_is_followed_to_its_end(self) -> None:
        self.dav.sync_page = 3
        for i in range(10):
            self.dav.add_card(PERSONAL, "p%d.vcf" % i, card("p%d@x.org" % i))
        outcome = self.collect("p9@x.org", "new@x.org")
        self.assertEqual(outcome.skipped, {"exists": ["p9@x.org"]})
        self.assertEqual(outcome.created, ["new@x.org"])
        for i in range(5):
            del self.dav.books[PERSONAL]["p%d.vcf" % i]
        self.assertEqual(self.collect("p0@x.org", "p5@x.org").skipped,
                         {"exists": ["p5@x.org"]})

    def test_a_server_without_sync_collection_is_queried_instead(self) -> None:
        self.dav.sync = False
        self.dav.add_card(PERSONAL, "b.vcf", card("b@x.org"))
        self.assertEqual(self.collect("b@x.org", "a@x.org").skipped, {"exists": ["b@x.org"]})
        self.dav.add_card(PERSONAL, "c.vcf", card("c@x.org"))
        self.assertEqual(self.collect("c@x.org").skipped, {"exists": ["c@x.org"]})
        self.assertEqual(len(self.engine.books), 0)
        # Each book was offered sync-collection once, then only queried.
        self.assertEqual(self.metrics.value("mailhub_collector_mirror_syncs_total",
                                            {"kind": "full"}), 2)

    def test_a_failing_server_fails_the_lookup_and_the_next_one_is_exact(self) -> None:
        self.collect("a@x.org")
        self.dav.add_card(PERSONAL, "b.vcf", card("b@x.org"))
        real, calls = self.client.changes, []

        async def failing_once(book: str, token: str) -> Changes | None:
            if not calls:
                calls.append(book)
                raise Unavailable("CardDAV server error 503")
            return await real(book, token)

        self.client.changes = failing_once  # type: ignore[method-assign]
        self.clock.advance(2)
        failure = self.failureResultOf(self.engine.handle(
            json.dumps({"userId": "A1", "emails": ["b@x.org"]}).encode()))
        failure.trap(Unavailable)
        self.assertEqual(self.collect("b@x.org").skipped, {"exists": ["b@x.org"]})


class ServerQuirksTests(Harness):
    def test_a_removal_spelt_otherwise_than_the_card_still_removes_it(self) -> None:
        self.dav.add_card(PERSONAL, "b.vcf", card("b@x.org"))
        self.assertEqual(self.collect("b@x.org").skipped, {"exists": ["b@x.org"]})
        answer = self.dav._multistatus

        def quoting(request: Any, responses: list[str]) -> bytes:
            # Removed members only: absolute, with the "@" percent-encoded.
            return answer(request, [r.replace("<d:href>/dav/alice@", "<d:href>" + URL +
                                              "/dav/alice%40") if "404" in r else r
                                    for r in responses])

        self.dav._multistatus = quoting  # type: ignore[method-assign]
        del self.dav.books[PERSONAL]["b.vcf"]
        self.assertEqual(self.collect("b@x.org").created, ["b@x.org"])

    def test_an_expired_token_on_a_continuation_page_reads_the_book_again(self) -> None:
        self.collect("a@x.org")
        self.dav.sync_page = 2
        for i in range(5):
            self.dav.add_card(PERSONAL, "p%d.vcf" % i, card("p%d@x.org" % i))
        real, pages = self.client.changes, []

        async def forgetting(book: str, token: str) -> Changes | None:
            pages.append(token)
            if len(pages) == 3:  # the second page of personal's changes
                self.dav.forget_tokens()
            return await real(book, token)

        self.client.changes = forgetting  # type: ignore[method-assign]
        outcome = self.collect("p4@x.org", "p0@x.org", "q@x.org")
        self.assertEqual(sorted(outcome.skipped["exists"]), ["p0@x.org", "p4@x.org"])
        self.assertEqual(outcome.created, ["q@x.org"])
        self.assertGreater(len(self.engine.books), 0)  # still copied, not queried

    def test_a_server_truncating_without_sending_anything_is_unavailable(self) -> None:
        self.collect("a@x.org")
        stuck = Changes("t-same", [], [], more=True)

        async def truncating(book: str, token: str) -> Changes | None:
            return Changes(token, [], [], more=True) if token else stuck

        self.client.changes = truncating  # type: ignore[method-assign]
        self.clock.advance(2)
        d = self.engine.handle(json.dumps({"userId": "A1", "emails": ["b@x.org"]}).encode())
        self.failureResultOf(d, Unavailable)

    def test_a_copy_holds_no_photo_and_a_name_fill_keeps_it(self) -> None:
        photo = "PHOTO;ENCODING=b;TYPE=JPEG:" + "A" * 5000 + "\r\n"
        nameless = ("BEGIN:VCARD\r\nVERSION:3.0\r\nUID:u1\r\nFN:\r\n"
                    "EMAIL:n@x.org\r\n" + photo + "END:VCARD\r\n")
        self.collect("a@x.org")
        self.dav.add_card(COLLECTED, "u1.vcf", nameless)
        self.assertEqual(self.collect("Nora <n@x.org>").named, ["n@x.org"])
        self.assertTrue(all("PHOTO" not in c.text for copy in self.engine.books._copies.values()
                            for c in copy.cards.values()))
        filled = self.dav.cards(COLLECTED)["u1.vcf"]
        self.assertIn("FN:Nora\r\n", filled)
        self.assertIn("A" * 5000, filled.replace("\r\n ", ""))

    def test_sync_collection_is_offered_again_an_hour_after_a_refusal(self) -> None:
        self.dav.sync = False
        self.collect("a@x.org")
        self.collect("b@x.org")
        self.dav.sync = True
        self.collect("b2@x.org")
        self.assertEqual(len(self.engine.books), 0)  # not offered again yet
        self.clock.advance(3600)
        self.dav.add_card(PERSONAL, "c.vcf", card("c@x.org"))
        self.assertEqual(self.collect("c@x.org").skipped, {"exists": ["c@x.org"]})
        self.assertEqual(len(self.engine.books), 4)  # c; a, b and b2 in collected


class CountingTokensTests(Harness):
    """Tokens that count per book, as SabreDAV and Nextcloud make them."""

    server = CountingTokens

    def test_a_collected_book_deleted_and_made_anew_starts_a_new_copy(self) -> None:
        self.assertEqual(self.collect("a@x.org").created, ["a@x.org"])
        self.assertEqual(self.collect("c@x.org").created, ["c@x.org"])
        self.dav.delete_book(COLLECTED)
        self.assertEqual(self.collect("b@x.org").created, ["b@x.org"])
        self.assertEqual(self.collect("a@x.org").created, ["a@x.org"])

    def test_a_book_made_anew_is_forgotten_also_when_its_url_is_spelt_otherwise(
            self) -> None:
        # As Radicale writes hrefs: "@" as "%40", unlike the configured layout.
        answer = self.dav._multistatus
        self.dav._multistatus = lambda request, responses: answer(  # type: ignore
            request, [r.replace("/dav/alice@", "/dav/alice%40") for r in responses])
        self.assertEqual(self.collect("a@x.org").created, ["a@x.org"])
        self.assertEqual(self.collect("c@x.org").created, ["c@x.org"])
        self.dav.delete_book(COLLECTED)
        self.assertEqual(self.collect("b@x.org").created, ["b@x.org"])
        self.assertEqual(self.collect("d@x.org").created, ["d@x.org"])
        self.assertEqual(self.collect("a@x.org").created, ["a@x.org"])

    def test_a_personal_book_made_anew_between_two_lookups_is_read_again(self) -> None:
        for i in range(3):
            self.dav.add_card(PERSONAL, "p%d.vcf" % i, card("p%d@x.org" % i))
        self.collect("a@x.org")
        self.dav.add_card(PERSONAL, "p3.vcf", card("p3@x.org"))
        self.collect("b@x.org")  # personal's copy is at token 2
        self.dav.delete_book(PERSONAL)
        self.dav.books[PERSONAL] = {"z.vcf": card("z@x.org")}  # token 1 now
        outcome = self.collect("p0@x.org", "z@x.org")
        self.assertEqual(outcome.created, ["p0@x.org"])
        self.assertEqual(outcome.skipped, {"exists": ["z@x.org"]})


class NoCopiesTests(Harness):
    mirror_size = 0

    def test_with_no_copies_every_lookup_queries_every_book(self) -> None:
        self.dav.add_card(PERSONAL, "b.vcf", card("b@x.org"))
        self.assertEqual(self.collect("b@x.org", "a@x.org").skipped, {"exists": ["b@x.org"]})
        self.assertEqual(self.collect("c@x.org").created, ["c@x.org"])
        self.assertEqual(len(self.engine.books), 0)
        self.assertEqual(self.metrics.value("mailhub_collector_mirror_syncs_total",
                                            {"kind": "full"}), 0)
        # personal, then personal and collected: one query each.
        self.assertEqual(self.dav.methods().count("REPORT"), 3)


class BoundTests(Harness):
    mirror_size = 5

    def test_a_book_larger_than_the_bound_is_queried_and_not_kept(self) -> None:
        for i in range(6):
            self.dav.add_card(PERSONAL, "p%d.vcf" % i, card("p%d@x.org" % i))
        self.assertEqual(self.collect("p3@x.org").skipped, {"exists": ["p3@x.org"]})
        self.dav.add_card(PERSONAL, "q.vcf", card("q@x.org"))
        self.assertEqual(self.collect("q@x.org").skipped, {"exists": ["q@x.org"]})
        self.assertLessEqual(len(self.engine.books), 5)

    def test_least_recently_used_books_go_first(self) -> None:
        dav = FakeCardDAV()
        mirror = BookMirror(CardDAVClient(StubTreq(dav), Clock()), 7, Clock())
        books = [URL + "/dav/u%d/b/" % i for i in range(3)]
        for n, book in enumerate(books):
            dav.books[book.removeprefix(URL)] = {
                "c%d.vcf" % i: card("c%d@x.org" % i) for i in range(2)}
        for book in books:
            self.successResultOf(mirror.find(book, ["c0@x.org"], ["c0@x.org"]))
        self.assertEqual(len(mirror), 4)
        found = self.successResultOf(mirror.find(books[0], ["c1@x.org"], ["c1@x.org"]))
        self.assertEqual([c.url for c in found], [books[0] + "c1.vcf"])


class ChangesTests(SynchronousTestCase):
    """The client's sync-collection REPORT, against what servers answer."""

    def answer(self, code: int, body: bytes) -> CardDAVClient:
        class Canned(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                request.setResponseCode(code)
                return body

        return CardDAVClient(StubTreq(Canned()), Clock())

    def test_removed_changed_and_truncated_members_are_told_apart(self) -> None:
        client = self.answer(207, (
            '<d:multistatus xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:carddav">'
            "<d:response><d:href>/b/1.vcf</d:href><d:propstat><d:prop><d:getetag>\"e1\""
            "</d:getetag><c:address-data>BEGIN:VCARD\r\nEMAIL:a@x.org\r\nEND:VCARD\r\n"
            "</c:address-data></d:prop><d:status>HTTP/1.1 200 OK</d:status></d:propstat>"
            "</d:response><d:response><d:href>/b/2.vcf</d:href><d:status>HTTP/1.1 404 "
            "Not Found</d:status></d:response><d:response><d:href>/b/</d:href><d:status>"
            "HTTP/1.1 507 Insufficient Storage</d:status></d:response>"
            "<d:sync-token>t2</d:sync-token></d:multistatus>").encode())
        changes = self.successResultOf(client.changes(URL + "/b/", "t1"))
        assert changes is not None
        self.assertEqual(changes.token, "t2")
        self.assertEqual([(c.url, c.etag) for c in changes.changed], [(URL + "/b/1.vcf", '"e1"')])
        self.assertEqual(changes.removed, [URL + "/b/2.vcf"])
        self.assertTrue(changes.more)

    def test_a_forgotten_token_and_an_unsupported_report_are_told_apart(self) -> None:
        expired = self.answer(403, b'<d:error xmlns:d="DAV:"><d:valid-sync-token/></d:error>')
        self.failureResultOf(expired.changes(URL + "/b/", "t1"), TokenExpired)
        for code in (400, 403, 405, 501):
            refused = self.answer(code, b'<d:error xmlns:d="DAV:"><d:supported-report/>'
                                        b"</d:error>")
            self.failureResultOf(refused.changes(URL + "/b/", ""), SyncRefused)
        no_token = self.answer(207, b'<d:multistatus xmlns:d="DAV:"/>')
        self.failureResultOf(no_token.changes(URL + "/b/", ""), SyncRefused)
        self.failureResultOf(self.answer(503, b"").changes(URL + "/b/", ""), Unavailable)
        self.assertIsNone(self.successResultOf(self.answer(404, b"").changes(URL + "/b/", "")))
