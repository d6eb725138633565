"""The collector engine against an in-memory CardDAV server, through StubTreq."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailhub.collector.carddav import BookLayout, CardDAVClient
from mailhub.collector.addresses import parse_entries
from mailhub.collector.engine import CONTACT_ADDED, Coalescer, CollectorEngine, decode_message
from mailhub.collector.vcard import Contact, contact_uuid, parse_vcard, to_vcard
from mailhub.directory.interfaces import IUserSource
from mailhub.directory.model import User
from mailhub.errors import Unavailable, ValidationError
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from tests.collector.fakes import FakeCardDAV, FakeUsers

ALICE = User(login="alice@example.org", name="Alice", emails=("alice@example.org",
                                                             "a.liddell@example.org"), id="A1")
BOB = User(login="bob@example.org", name="Bob", emails=("bob@example.org",), id="B2")
HOME = "/dav/alice@example.org/"
COLLECTED = HOME + "collected/"


def body(**message: Any) -> bytes:
    return json.dumps(message).encode("utf-8")


class EngineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dav = FakeCardDAV()
        self.dav.homes.add(HOME)
        self.dav.books[HOME + "personal/"] = {}
        self.users = FakeUsers([ALICE, BOB])
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.metrics = Metrics()
        self.hub = Hub()
        self.events: list[Any] = []
        self.hub.local.topic(CONTACT_ADDED).subscribe(self.events.append)
        self.stub = StubTreq(self.dav)
        client = CardDAVClient(self.stub, self.clock, credentials=("svc", "pw"),
                               metrics=self.metrics)
        self.engine = CollectorEngine(
            self.users, client, BookLayout.from_config("http://dav.test/dav/", ""),
            self.hub, self.metrics, self.clock)

    def handle(self, **message: Any) -> Any:
        return self.successResultOf(self.engine.handle(body(**message)))

    def test_fake_user_source_is_an_IUserSource(self) -> None:
        self.assertTrue(verifyObject(IUserSource, self.users))

    def test_new_addresses_become_contacts_in_a_collected_book_made_on_demand(self) -> None:
        outcome = self.handle(userId="A1", emails=["John Doe <john@x.org>", "k@y.org"])
        self.assertEqual(sorted(outcome.created), ["john@x.org", "k@y.org"])
        cards = self.dav.cards(COLLECTED)
        self.assertEqual(len(cards), 2)
        john = self.dav.cards(COLLECTED)[contact_uuid("john@x.org") + ".vcf"]
        self.assertIn("FN:John Doe\r\n", john)
        self.assertIn("N:Doe;John;;;\r\n", john)
        self.assertIn("EMAIL;TYPE=work:john@x.org\r\n", john)
        self.assertEqual(self.metrics.value("mailhub_collector_collected_total"), 2)
        self.assertIn("MKCOL", self.dav.methods())

    def test_every_request_carries_the_configured_basic_credentials(self) -> None:
        self.handle(userId="A1", emails=["k@y.org"])
        self.assertTrue(self.dav.auth)
        self.assertTrue(all(a == b"Basic c3ZjOnB3" for a in self.dav.auth))

    def test_user_id_wins_over_user_email(self) -> None:
        outcome = self.handle(userId="A1", userEmail="bob@example.org", emails=["k@y.org"])
        self.assertEqual(outcome.user, "alice@example.org")

    def test_user_email_resolves_when_there_is_no_user_id(self) -> None:
        outcome = self.handle(userEmail="BOB@example.org", emails=["k@y.org"])
        self.assertEqual(outcome.user, "bob@example.org")
        self.assertEqual(len(self.dav.cards("/dav/bob@example.org/collected/")), 1)

    def test_poison_messages_fail_with_a_validation_error_saying_why(self) -> None:
        cases = {
            b"not json": "not valid JSON",
            b"\xff\xfe": "not valid UTF-8",
            b"[1]": "must be a JSON object",
            body(emails=["a@b.org"]): "no user",
            body(userId="A1"): "no emails",
            body(userId="A1", emails="a@b.org"): "not a list",
            body(userId="A1", emails=[]): "empty",
            body(userId="nobody", emails=["a@b.org"]): "unknown user",
            body(userId=["A1"], emails=["a@b.org"]): "must be a string",
        }
        for raw, why in cases.items():
            failure = self.failureResultOf(self.engine.handle(raw), ValidationError)
            self.assertIn(why, str(failure.value), raw)
        self.assertEqual(self.metrics.value("mailhub_collector_failed_total",
                                            {"kind": "poison"}), len(cases))
        self.assertEqual(self.dav.books.get(COLLECTED), None)

    def test_a_user_made_a_moment_ago_is_found_once_the_users_have_caught_up(self) -> None:
        carol = User(login="carol@example.org", emails=("carol@example.org",), id="C3")
        caught_up: list[int] = []

        async def refresh() -> None:
            # The database has her already; the users in memory follow it.
            caught_up.append(1)
            if carol not in self.users.users:
                self.users.users.append(carol)

        self.users.on_catch_up = refresh
        engine = CollectorEngine(
            self.users, CardDAVClient(self.stub, self.clock, credentials=("svc", "pw")),
            BookLayout.from_config("http://dav.test/dav/", ""), self.hub, self.metrics,
            self.clock)
        outcome = self.successResultOf(engine.handle(body(userId="C3", emails=["k@y.org"])))
        self.assertEqual((outcome.user, outcome.created), ("carol@example.org", ["k@y.org"]))
        self.assertEqual(caught_up, [1])
        # Known users cost no catching up; unknown ones are still poison after it.
        self.successResultOf(engine.handle(body(userId="C3", emails=["l@y.org"])))
        self.assertEqual(caught_up, [1])
        self.failureResultOf(engine.handle(body(userId="nobody", emails=["a@b.org"])),
                             ValidationError)
        self.assertEqual(caught_up, [1, 1])

    def test_a_card_the_server_refuses_for_good_is_reported_and_the_rest_collected(self) -> None:
        refused = COLLECTED + contact_uuid("bad@x.org") + ".vcf"
        put = self.dav.do_PUT

        def strict_put(request: Any, path: str, data: bytes) -> bytes:
            if path == refused:
                request.setResponseCode(415)
                return b"unsupported"
            return put(request, path, data)

        self.dav.do_PUT = strict_put  # type: ignore[method-assign]
        outcome = self.handle(userId="A1", emails=["bad@x.org", "good@x.org"])
        self.assertEqual(outcome.created, ["good@x.org"])
        self.assertEqual([email for email, _ in outcome.rejected], ["bad@x.org"])
        self.assertIn("415", outcome.rejected[0][1])

    def test_a_lookup_the_server_refuses_for_good_is_dead_lettered_with_the_reason(self) -> None:
        self.dav.do_REPORT = lambda request, path, data: (  # type: ignore[method-assign]
            request.setResponseCode(400) or b"no such query")
        failure = self.failureResultOf(self.engine.handle(body(userId="A1", emails=["k@y.org"])),
                                       ValidationError)
        self.assertIn("refused", str(failure.value))
        self.assertIn("400", str(failure.value))

    def test_deeply_nested_json_is_poison(self) -> None:
        failure = self.failureResultOf(self.engine.handle(b"[" * 100_000), ValidationError)
        self.assertIn("nested too deeply", str(failure.value))

    def test_own_and_site_user_addresses_are_skipped(self) -> None:
        outcome = self.handle(userId="A1", emails=[
            "A.Liddell@EXAMPLE.org", "Bob <bob@example.org>", "new@x.org"])
        self.assertEqual(outcome.created, ["new@x.org"])
        self.assertEqual(outcome.skipped, {"own": ["A.Liddell@example.org"],
                                           "site_user": ["bob@example.org"]})
        self.assertEqual(self.metrics.value("mailhub_collector_skipped_total",
                                            {"reason": "site_user"}), 1)

    def test_site_users_are_collected_when_configured_so(self) -> None:
        client = CardDAVClient(StubTreq(self.dav), self.clock)
        engine = CollectorEngine(self.users, client,
                                 BookLayout.from_config("http://dav.test/dav/", ""),
                                 self.hub, self.metrics, self.clock, skip_site_users=False)
        outcome = self.successResultOf(engine.handle(body(userId="A1", emails=["bob@example.org"])))
        self.assertEqual(outcome.created, ["bob@example.org"])

    def test_junk_is_reported_and_the_rest_collected(self) -> None:
        outcome = self.handle(userId="A1", emails=["junk", 42, "ok@x.org"])
        self.assertEqual(outcome.created, ["ok@x.org"])
        self.assertEqual([r for r, _ in outcome.rejected], ["junk", "42"])
        self.assertEqual(self.metrics.value("mailhub_collector_skipped_total",
                                            {"reason": "invalid"}), 2)

    def test_an_address_in_any_book_is_not_collected_again(self) -> None:
        self.dav.add_card(HOME + "personal/", "x.vcf",
                          "BEGIN:VCARD\r\nVERSION:3.0\r\nFN:Known\r\nEMAIL:KNOWN@X.ORG\r\nEND:VCARD\r\n")
        outcome = self.handle(userId="A1", emails=["known@x.org", "other@x.org"])
        self.assertEqual(outcome.created, ["other@x.org"])
        self.assertEqual(outcome.skipped, {"exists": ["known@x.org"]})
        self.assertNotIn("known@x.org", " ".join(self.dav.cards(COLLECTED).values()))

    def test_the_same_address_in_two_forms_is_one_contact_with_the_name(self) -> None:
        outcome = self.handle(userId="A1", emails=["a@x.org", "Ann Example <A@X.org>",
                                                   "a@X.ORG"])
        self.assertEqual(outcome.created, ["A@x.org"])
        (card,) = self.dav.cards(COLLECTED).values()
        self.assertIn("FN:Ann Example", card)
        self.assertEqual(len(self.events), 1)

    def test_redelivery_makes_no_second_contact_and_no_second_event(self) -> None:
        self.handle(userId="A1", emails=["Ann <a@x.org>"])
        self.engine.known.forget("alice@example.org")
        outcome = self.handle(userId="A1", emails=["Ann <a@x.org>"])
        self.assertEqual(outcome.created, [])
        self.assertEqual(len(self.dav.cards(COLLECTED)), 1)
        self.assertEqual(len(self.events), 1)

    def test_a_control_character_in_the_user_is_poison_not_a_retry(self) -> None:
        for message in ({"userId": "\x00", "emails": ["a@x.org"]},
                        {"userEmail": "alice@example.org\x00", "emails": ["a@x.org"]}):
            failure = self.failureResultOf(self.engine.handle(body(**message)), ValidationError)
            self.assertIn("control character", failure.getErrorMessage())
        self.assertEqual(self.dav.log, [])

    def test_known_addresses_are_decided_with_one_sync_of_the_collected_book(self) -> None:
        # Issue 11: a deleted collected book must be noticed at the next
        # message, so known addresses of the collected book cost one request
        # (a sync-collection of it), no longer none; still no PROPFIND of
        # the home, no other book, no PUT.
        self.handle(userId="A1", emails=["Ann <a@x.org>", "b@x.org"])
        before = len(self.dav.log)
        outcome = self.handle(userId="A1", emails=["Ann <a@x.org>", "b@x.org"])
        self.assertEqual(outcome.skipped, {"exists": ["a@x.org", "b@x.org"]})
        self.assertEqual(self.dav.log[before:], [("REPORT", COLLECTED)])

    def test_a_deleted_collected_book_is_noticed_at_the_next_message(self) -> None:
        self.handle(userId="A1", emails=["Ann <a@x.org>", "b@x.org"])
        del self.dav.books[COLLECTED]
        outcome = self.handle(userId="A1", emails=["Ann <a@x.org>", "b@x.org"])
        self.assertEqual(sorted(outcome.created), ["a@x.org", "b@x.org"])
        self.assertEqual(len(self.dav.cards(COLLECTED)), 2)
        self.assertEqual(len(self.events), 4)

    def test_a_collected_book_made_anew_is_noticed_at_the_next_message(self) -> None:
        self.handle(userId="A1", emails=["Ann <a@x.org>", "b@x.org"])
        self.dav.books[COLLECTED] = {}  # deleted, and made again by a client
        self.dav.forget_tokens()        # a new book: the old tokens mean nothing
        outcome = self.handle(userId="A1", emails=["Ann <a@x.org>", "b@x.org"])
        self.assertEqual(sorted(outcome.created), ["a@x.org", "b@x.org"])

    def test_a_book_made_anew_on_a_server_that_keeps_its_tokens_is_noticed(self) -> None:
        # The old token still answers: every card reads as removed.
        self.handle(userId="A1", emails=["Ann <a@x.org>", "b@x.org"])
        self.dav.books[COLLECTED] = {}
        outcome = self.handle(userId="A1", emails=["Ann <a@x.org>", "b@x.org"])
        self.assertEqual(sorted(outcome.created), ["a@x.org", "b@x.org"])

    def test_a_contact_the_user_deleted_is_collected_again_at_the_next_message(self) -> None:
        self.handle(userId="A1", emails=["Ann <a@x.org>", "b@x.org"])
        del self.dav.books[COLLECTED][contact_uuid("b@x.org") + ".vcf"]
        outcome = self.handle(userId="A1", emails=["Ann <a@x.org>", "b@x.org"])
        self.assertEqual(outcome.created, ["b@x.org"])
        self.assertEqual(outcome.skipped, {"exists": ["a@x.org"]})

    def test_known_addresses_of_a_queried_book_are_asked_with_one_query(self) -> None:
        self.dav.sync = False  # the book is queried, not copied
        self.handle(userId="A1", emails=["Ann <a@x.org>"])
        self.handle(userId="A1", emails=["Ann <a@x.org>"])  # sync refused, then queried
        before = len(self.dav.log)
        outcome = self.handle(userId="A1", emails=["Ann <a@x.org>"])
        self.assertEqual(outcome.skipped, {"exists": ["a@x.org"]})
        self.assertEqual(self.dav.log[before:], [("REPORT", COLLECTED)])
        del self.dav.books[COLLECTED]
        outcome = self.handle(userId="A1", emails=["Ann <a@x.org>"])
        self.assertEqual(outcome.created, ["a@x.org"])

    def test_a_known_address_beside_a_new_one_needs_no_check_of_its_own(self) -> None:
        self.handle(userId="A1", emails=["Ann <a@x.org>"])
        before = len(self.dav.log)
        outcome = self.handle(userId="A1", emails=["Ann <a@x.org>", "new@x.org"])
        self.assertEqual(outcome.created, ["new@x.org"])
        self.assertEqual(outcome.skipped, {"exists": ["a@x.org"]})
        # One lookup (the home, then each book once) and the PUT.
        self.assertEqual(sorted(self.dav.log[before:]), sorted([
            ("PROPFIND", HOME), ("REPORT", HOME + "personal/"), ("REPORT", COLLECTED),
            ("PUT", COLLECTED + contact_uuid("new@x.org") + ".vcf")]))

    def test_a_deleted_book_is_noticed_by_a_message_with_new_addresses_too(self) -> None:
        self.handle(userId="A1", emails=["Ann <a@x.org>"])
        del self.dav.books[COLLECTED]
        outcome = self.handle(userId="A1", emails=["Ann <a@x.org>", "new@x.org"])
        self.assertEqual(sorted(outcome.created), ["a@x.org", "new@x.org"])

    def test_known_addresses_in_another_book_need_no_request(self) -> None:
        self.dav.add_card(HOME + "personal/", "p.vcf", "BEGIN:VCARD\r\nVERSION:3.0\r\n"
                          "UID:p\r\nFN:Pat\r\nEMAIL:p@x.org\r\nEND:VCARD\r\n")
        self.handle(userId="A1", emails=["Pat <p@x.org>"])
        before = len(self.dav.log)
        outcome = self.handle(userId="A1", emails=["Pat <p@x.org>"])
        self.assertEqual(outcome.skipped, {"exists": ["p@x.org"]})
        self.assertEqual(self.dav.log[before:], [])

    def test_book_checks_of_one_user_in_flight_are_shared(self) -> None:
        self.handle(userId="A1", emails=["Ann <a@x.org>"])
        self.dav.hold.add("REPORT")
        before = len(self.dav.log)
        first = self.engine.handle(body(userId="A1", emails=["Ann <a@x.org>"]))
        self.stub.flush()
        more = [self.engine.handle(body(userId="A1", emails=["Ann <a@x.org>"]))
                for _ in range(5)]
        self.dav.hold.clear()
        self.dav.release()
        self.stub.flush()
        for d in [first, *more]:
            self.assertEqual(self.successResultOf(d).skipped, {"exists": ["a@x.org"]})
        # One check running, the five that came meanwhile share the next.
        self.assertEqual(self.dav.methods()[before:], ["REPORT", "REPORT"])

    def test_the_cache_expires(self) -> None:
        self.handle(userId="A1", emails=["b@x.org"])
        self.clock.advance(601)
        before = len(self.dav.log)
        self.handle(userId="A1", emails=["b@x.org"])
        self.assertGreater(len(self.dav.log), before)

    def test_a_contact_deleted_by_the_user_is_collected_again_after_the_cache(self) -> None:
        self.handle(userId="A1", emails=["b@x.org"])
        self.dav.books[COLLECTED].clear()
        self.clock.advance(601)
        outcome = self.handle(userId="A1", emails=["b@x.org"])
        self.assertEqual(outcome.created, ["b@x.org"])

    def test_a_nameless_collected_contact_gets_the_name(self) -> None:
        self.handle(userId="A1", emails=["ann@x.org"])
        outcome = self.handle(userId="A1", emails=["Ann  Smith <ann@x.org>"])
        self.assertEqual(outcome.named, ["ann@x.org"])
        (card,) = self.dav.cards(COLLECTED).values()
        parsed = parse_vcard(card)
        self.assertEqual(parsed.fn, "Ann Smith")
        self.assertIn("N:Smith;Ann;;;", card)
        self.assertEqual(len(self.events), 1)
        self.assertEqual(self.metrics.value("mailhub_collector_named_total"), 1)

    def test_a_nameless_contact_in_a_personal_book_is_left_alone(self) -> None:
        text = "BEGIN:VCARD\r\nVERSION:4.0\r\nFN:p@x.org\r\nEMAIL:p@x.org\r\nEND:VCARD\r\n"
        self.dav.add_card(HOME + "personal/", "p.vcf", text)
        outcome = self.handle(userId="A1", emails=["Pat <p@x.org>"])
        self.assertEqual(outcome.skipped, {"exists": ["p@x.org"]})
        self.assertEqual(self.dav.cards(HOME + "personal/")["p.vcf"], text)

    def test_a_named_contact_keeps_its_name(self) -> None:
        self.handle(userId="A1", emails=["Ann <ann@x.org>"])
        self.engine.known.forget("alice@example.org")
        self.handle(userId="A1", emails=["Someone Else <ann@x.org>"])
        (card,) = self.dav.cards(COLLECTED).values()
        self.assertIn("FN:Ann\r\n", card)

    def test_a_contact_written_meanwhile_elsewhere_is_named_through_the_412(self) -> None:
        # Another instance wrote the nameless card after our REPORT: PUT says 412.
        self.dav.books[COLLECTED] = {}
        uid = contact_uuid("ann@x.org")
        contact = Contact(uid=uid, email="ann@x.org", fn="ann@x.org")
        original_report = self.dav.do_REPORT

        def report_then_race(request: Any, path: str, raw: bytes) -> bytes:
            answer = original_report(request, path, raw)
            self.dav.books[COLLECTED][uid + ".vcf"] = to_vcard(contact)
            return answer

        self.dav.do_REPORT = report_then_race  # type: ignore[method-assign]
        outcome = self.handle(userId="A1", emails=["Ann <ann@x.org>"])
        self.assertEqual(outcome.created, [])
        self.assertEqual(outcome.named, ["ann@x.org"])
        self.assertEqual(self.events, [])

    def test_the_event_has_esn_payload_with_a_jcard(self) -> None:
        self.handle(userId="A1", emails=["John Doe <john@x.org>"])
        (event,) = self.events
        self.assertEqual(event["contactId"], contact_uuid("john@x.org"))
        # Issue 12: the id the site knows for the user (ESN's payload), not the login.
        self.assertEqual(event["bookHome"], "A1")
        self.assertEqual(event["bookId"], "A1")
        self.assertEqual(event["bookName"], "collected")
        self.assertEqual(event["user"]["_id"], "A1")
        self.assertEqual(event["vcard"][0], "vcard")
        props = {p[0]: p for p in event["vcard"][1]}
        self.assertEqual(props["fn"][3], "John Doe")
        self.assertEqual(props["email"], ["email", {"type": "work"}, "text", "john@x.org"])
        json.dumps(event)

    def test_the_event_is_forwarded_to_the_global_pubsub(self) -> None:
        from mailhub.pubsub.local import LocalPubSub
        global_ = LocalPubSub()
        seen: list[Any] = []
        global_.topic(CONTACT_ADDED).subscribe(seen.append)
        self.hub.global_ = global_
        self.handle(userId="A1", emails=["k@y.org"])
        self.assertEqual(len(seen), 1)

    def test_a_failing_publication_does_not_fail_the_written_contact(self) -> None:
        class BrokenGlobal:
            def topic(self, name: str) -> Any:
                return self

            def publish(self, data: Any) -> Any:
                from twisted.internet.defer import fail
                return fail(RuntimeError("broker down"))

        self.hub.global_ = BrokenGlobal()
        outcome = self.handle(userId="A1", emails=["k@y.org"])
        self.assertEqual(outcome.created, ["k@y.org"])
        self.assertEqual(self.metrics.value("mailhub_collector_publish_failed_total"), 1)
        self.flushLoggedErrors(RuntimeError)

    def test_server_errors_are_transient_and_a_retry_finishes_the_job(self) -> None:
        self.dav.fail_next = [503]
        self.failureResultOf(self.engine.handle(body(userId="A1", emails=["k@y.org"])),
                             Unavailable)
        self.assertEqual(self.metrics.value("mailhub_collector_failed_total",
                                            {"kind": "transient"}), 1)
        outcome = self.handle(userId="A1", emails=["k@y.org"])
        self.assertEqual(outcome.created, ["k@y.org"])

    def test_a_failing_put_fails_the_message_so_it_is_retried(self) -> None:
        self.dav.books[COLLECTED] = {}
        # PROPFIND, REPORT x2 succeed; the first PUT gets a 500.
        original_put = self.dav.do_PUT
        calls = []

        def put(request: Any, path: str, raw: bytes) -> bytes:
            calls.append(path)
            if len(calls) == 1:
                request.setResponseCode(500)
                return b""
            return original_put(request, path, raw)

        self.dav.do_PUT = put  # type: ignore[method-assign]
        self.failureResultOf(self.engine.handle(body(userId="A1", emails=["a@x.org", "b@x.org"])),
                             Unavailable)
        outcome = self.handle(userId="A1", emails=["a@x.org", "b@x.org"])
        self.assertEqual(len(self.dav.cards(COLLECTED)), 2)
        self.assertEqual(len(outcome.created) + len(outcome.skipped.get("exists", [])), 2)

    def test_user_source_down_is_transient(self) -> None:
        self.users.down = True
        self.failureResultOf(self.engine.handle(body(userId="A1", emails=["k@y.org"])),
                             Unavailable)

    def test_a_collected_book_deleted_meanwhile_is_made_again(self) -> None:
        self.handle(userId="A1", emails=["k@y.org"])
        original_propfind = self.dav.do_PROPFIND

        def stale(request: Any, path: str, raw: bytes) -> bytes:
            answer = original_propfind(request, path, raw)
            self.dav.books.pop(COLLECTED, None)
            return answer

        self.dav.do_PROPFIND = stale  # type: ignore[method-assign]
        outcome = self.handle(userId="A1", emails=["n@y.org"])
        self.assertEqual(outcome.created, ["n@y.org"])
        self.assertEqual(list(self.dav.cards(COLLECTED)), [contact_uuid("n@y.org") + ".vcf"])

    def test_a_missing_home_is_made_before_the_book(self) -> None:
        self.dav.homes.clear()
        self.dav.books.clear()
        outcome = self.handle(userId="A1", emails=["k@y.org"])
        self.assertEqual(outcome.created, ["k@y.org"])
        self.assertIn(HOME, self.dav.homes)

    def test_idn_spellings_are_one_address(self) -> None:
        self.dav.add_card(HOME + "personal/", "j.vcf",
                          "BEGIN:VCARD\r\nVERSION:4.0\r\nFN:J\r\nEMAIL:j@xn--bcher-kva.de\r\nEND:VCARD\r\n")
        outcome = self.handle(userId="A1", emails=["Jürgen <J@Bücher.de>"])
        self.assertEqual(outcome.skipped, {"exists": ["J@bücher.de"]})


class CoalescingTests(SynchronousTestCase):
    """Messages of one user in flight together share one lookup."""

    setUp = EngineTests.setUp

    def start(self, user: str, *emails: str) -> Any:
        return self.engine.handle(body(userId=user, emails=list(emails)))

    def release(self) -> None:
        while self.dav.held:
            self.dav.release()
            self.stub.flush()

    def test_messages_arriving_during_a_lookup_share_the_next_one(self) -> None:
        self.dav.books[COLLECTED] = {}
        self.dav.hold = {"PROPFIND"}
        first = self.start("A1", "a@x.org")
        second = self.start("A1", "Bee <b@x.org>", "c@x.org")
        third = self.start("A1", "d@x.org", "a@x.org")
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertNoResult(third)
        self.release()
        outcomes = [self.successResultOf(d) for d in (first, second, third)]
        # One lookup for the first message, one for the two that waited:
        # a PROPFIND and one REPORT per book (personal, collected) each.
        self.assertEqual(self.dav.methods().count("PROPFIND"), 2)
        self.assertEqual(self.dav.methods().count("REPORT"), 4)
        self.assertEqual(outcomes[0].created, ["a@x.org"])
        self.assertEqual(outcomes[1].created, ["b@x.org", "c@x.org"])
        # a@x.org was written by the first message before the batch's lookup.
        self.assertEqual(outcomes[2].created, ["d@x.org"])
        self.assertEqual(outcomes[2].skipped, {"exists": ["a@x.org"]})
        self.assertEqual(len(self.dav.cards(COLLECTED)), 4)
        self.assertEqual(len(self.events), 4)
        self.assertEqual(len(self.engine.lookups), 0)

    def test_one_address_in_two_messages_of_a_batch_is_one_contact(self) -> None:
        self.dav.hold = {"PROPFIND"}
        first = self.start("A1", "z@x.org")
        second = self.start("A1", "Ann <ann@x.org>")
        third = self.start("A1", "ann@X.org")
        self.release()
        for d in (first, second, third):
            self.successResultOf(d)
        self.assertEqual(self.dav.methods().count("MKCOL"), 1)
        cards = self.dav.cards(COLLECTED)
        self.assertEqual(len(cards), 2)
        self.assertIn("FN:Ann\r\n", cards[contact_uuid("ann@x.org") + ".vcf"])
        self.assertEqual(len(self.events), 2)

    def test_a_message_for_another_user_is_not_held_up(self) -> None:
        self.dav.homes.add("/dav/bob@example.org/")
        self.dav.hold = {"PROPFIND"}
        alice = self.start("A1", "a@x.org")
        self.assertEqual(len(self.dav.held), 1)
        self.dav.hold = set()
        bob = self.start("B2", "q@x.org")
        self.assertEqual(self.successResultOf(bob).created, ["q@x.org"])
        self.assertNoResult(alice)
        self.release()
        self.assertEqual(self.successResultOf(alice).created, ["a@x.org"])

    def test_a_failed_shared_lookup_fails_each_message_and_retries_lose_nothing(self) -> None:
        self.dav.books[COLLECTED] = {}
        self.dav.hold = {"PROPFIND"}
        first = self.start("A1", "a@x.org")
        second = self.start("A1", "b@x.org")
        third = self.start("A1", "c@x.org")
        # The first lookup succeeds; the shared one meets a 503.
        self.dav.release()
        self.stub.flush()
        self.dav.fail_next = [503]
        self.release()
        self.assertEqual(self.successResultOf(first).created, ["a@x.org"])
        self.failureResultOf(second, Unavailable)
        self.failureResultOf(third, Unavailable)
        self.assertEqual(self.metrics.value("mailhub_collector_failed_total",
                                            {"kind": "transient"}), 2)
        self.assertEqual(len(self.engine.lookups), 0)
        # The queue redelivers both: nothing was lost.
        self.dav.hold = set()
        self.assertEqual(self.successResultOf(self.start("A1", "b@x.org")).created, ["b@x.org"])
        self.assertEqual(self.successResultOf(self.start("A1", "c@x.org")).created, ["c@x.org"])
        self.assertEqual(len(self.dav.cards(COLLECTED)), 3)

    def test_a_cancelled_waiter_does_not_break_the_batch(self) -> None:
        self.dav.hold = {"PROPFIND"}
        first = self.start("A1", "a@x.org")
        second = self.start("A1", "b@x.org")
        third = self.start("A1", "c@x.org")
        second.cancel()
        self.failureResultOf(second)
        self.release()
        self.assertEqual(self.successResultOf(first).created, ["a@x.org"])
        self.assertEqual(self.successResultOf(third).created, ["c@x.org"])


class CoalescerTests(SynchronousTestCase):
    """The Coalescer on its own, with a find whose answers the test gives."""

    def setUp(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.answers: list[Deferred[Any]] = []
        self.ready: Deferred[None] | None = None

        def find(user: User, recipients: list[Any]) -> Deferred[Any]:
            self.calls.append((user.login, [r.key for r in recipients]))
            d: Deferred[Any] = Deferred()
            self.answers.append(d)
            return d

        def ready() -> Deferred[None]:
            return self.ready if self.ready is not None else succeed(None)

        self.coalescer = Coalescer(find, ready)

    def ask(self, user: User, *emails: str) -> Deferred[Any]:
        recipients = parse_entries(list(emails)).recipients
        return self.coalescer.lookup(user.login, user, list(recipients))

    def test_the_next_batch_gathers_until_the_server_is_ready_for_it(self) -> None:
        first = self.ask(ALICE, "a@x.org")
        self.ready = Deferred()
        second = self.ask(ALICE, "b@x.org")
        self.answers[0].callback({"a@x.org": []})
        self.assertEqual(self.successResultOf(first), {"a@x.org": []})
        third = self.ask(ALICE, "c@x.org")
        self.assertEqual(len(self.calls), 1)  # waiting for ready
        self.ready.callback(None)
        self.assertEqual(self.calls[1], ("alice@example.org", ["b@x.org", "c@x.org"]))
        found: dict[str, list[Any]] = {"b@x.org": [], "c@x.org": []}
        self.answers[1].callback(found)
        self.assertIs(self.successResultOf(second), found)
        self.assertIs(self.successResultOf(third), found)
        self.assertEqual(len(self.coalescer), 0)

    def test_a_failing_ready_check_still_looks_up(self) -> None:
        self.ask(ALICE, "a@x.org")
        self.ready = Deferred()
        second = self.ask(ALICE, "b@x.org")
        self.answers[0].callback({"a@x.org": []})
        self.ready.errback(RuntimeError("broken queue check"))
        self.answers[1].callback({"b@x.org": []})
        self.assertEqual(self.successResultOf(second), {"b@x.org": []})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_users_do_not_share_lookups(self) -> None:
        self.ask(ALICE, "a@x.org")
        bob = self.ask(BOB, "a@x.org")
        self.assertEqual([c[0] for c in self.calls], ["alice@example.org", "bob@example.org"])
        self.answers[1].callback({"a@x.org": []})
        self.successResultOf(bob)
        self.assertEqual(len(self.coalescer), 1)


class DecodeTests(SynchronousTestCase):
    def test_every_problem_is_reported_at_once(self) -> None:
        with self.assertRaises(ValidationError) as caught:
            decode_message(b'{"emails": 3}')
        self.assertEqual(len(caught.exception.messages), 2)

    def test_a_numeric_user_id_is_read_as_text(self) -> None:
        self.assertEqual(decode_message(b'{"userId": 7, "emails": ["a@b.org"]}')["userId"], "7")
