"""Issues 12 and 13 in the collector: calendar owners, ESN ids, exclusions, provenance.

Units: fakes and StubTreq (the FakeCardDAV), a Clock. The same rules against
the real Radicale are in test_rules_radicale.py.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailhub.collector.carddav import BookLayout, CardDAVClient
from mailhub.collector.engine import CONTACT_ADDED, CollectorEngine
from mailhub.collector.rules import (
    EsnIds, Exclusions, Origin, compile_patterns, esn_ids_of, exclusions_of, note_text,
)
from mailhub.collector.sources import CalendarSource, MailSource, ical_event, jcal_event
from mailhub.collector.vcard import Contact, parse_vcard, to_jcard, to_vcard
from mailhub.config import CollectorSection, parse
from mailhub.directory.model import Email, Group, Profile, User, user_of
from mailhub.errors import ConfigError, ValidationError
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.pubsub.local import LocalPubSub
from mailhub.web.events import _event_keys, _user_keys
from tests.collector.fakes import FakeCardDAV, FakeUsers
from tests.collector.test_sources import ICS, JCAL, Recorder, local_shared

ESN_ALICE = "5f0c1a2b3c4d5e6f70819203"
ALICE_PROFILE = Profile(id="A1", name="Alice", nickname=ESN_ALICE,
                        emails=(Email("alice@example.org"),))
BOB_PROFILE = Profile(id="B2", name="Bob", emails=(Email("bob@example.org"),))
ALICE = user_of(ALICE_PROFILE)
BOB = user_of(BOB_PROFILE)
HOME = "/dav/alice@example.org/"
COLLECTED = HOME + "collected/"


class FakeDirectory:
    """The part of the Directory the collector reads: profiles and groups."""

    def __init__(self, profiles: list[Profile], groups: list[Group] = ()) -> None:  # type: ignore[assignment]
        self._profiles = {p.id: p for p in profiles}
        self.group_list = list(groups)
        self.group_reads = 0

    def profile_by_nickname(self, nickname: str) -> Profile | None:
        return next((p for p in self._profiles.values() if p.nickname == nickname), None)

    def profile(self, profile_id: str) -> Profile | None:
        return self._profiles.get(profile_id)

    def groups(self) -> list[Group]:
        self.group_reads += 1
        return list(self.group_list)


class FakeLDAP:
    """The LDAP user source's ``find_by`` and ``attribute_of``."""

    def __init__(self, users: dict[str, User]) -> None:
        self.users = users  # ESN id -> user
        self.asked: list[str] = []

    def find_by(self, attribute: str, value: str) -> Any:
        assert attribute == "employeeNumber"
        return succeed(self.users.get(value))

    def attribute_of(self, login: str, attribute: str) -> Any:
        self.asked.append(login)
        return succeed(next((k for k, u in self.users.items() if u.login == login), None))


def body(**message: Any) -> bytes:
    return json.dumps(message).encode("utf-8")


def event_of(organizer: str, uid: str = "ev-1") -> list[Any]:
    """A jCal event organised by ``organizer`` with two attendees and Alice."""
    return ["vcalendar", [], [["vevent", [
        ["uid", {}, "text", uid],
        ["organizer", {"cn": "Org"}, "cal-address", "mailto:" + organizer],
        ["attendee", {"cn": "Carol Ng"}, "cal-address", "mailto:carol@x.org"],
        ["attendee", {}, "cal-address", "mailto:alice@example.org"],
    ], []]]]


class ExclusionTests(SynchronousTestCase):
    def test_default_patterns_catch_robots_bounces_and_return_paths(self) -> None:
        rules = Exclusions()
        for address in ("noreply@x.org", "no-reply@x.org", "do-not-reply@x.org",
                        "donotreply@x.org", "noreply+abc@x.org", "mailer-daemon@x.org",
                        "postmaster@x.org", "bounce@x.org", "bounces+a=b.org@lists.x.org",
                        "bounce-123@x.org", "list-bounces+alice=example.org@lists.x.org",
                        "owner-dev@lists.x.org", "dev-request@lists.x.org",
                        "srs0=abcd=ex.org=bob@fwd.x.org", "prvs=1234abcd=bob@x.org"):
            self.assertEqual(rules.reason(address), "robot", address)
        for address in ("bob@x.org", "replyto@x.org", "noreplies-welcome.team@x.org",
                        "bouncer@x.org", "post.master.chef@x.org", "jean-luc@x.org",
                        "a+b@x.org"):
            self.assertIsNone(rules.reason(address), address)

    def test_configured_globs_domains_and_defaults_off(self) -> None:
        rules = Exclusions(patterns=["alerts-*@*", "*@notify.example.com"],
                           domains=["spam.example", ".junk.org"])
        self.assertEqual(rules.reason("alerts-db@x.org"), "robot")
        self.assertEqual(rules.reason("anyone@notify.example.com"), "robot")
        self.assertEqual(rules.reason("a@spam.example"), "excluded_domain")
        self.assertEqual(rules.reason("a@mx.spam.example"), "excluded_domain")
        self.assertEqual(rules.reason("a@junk.org"), "excluded_domain")
        self.assertIsNone(rules.reason("a@notspam.example"))
        # Domains compare as address keys do: IDNA and Unicode spellings alike.
        idn = Exclusions(defaults=False, domains=["xn--bcher-kva.de"],
                         lists=lambda: ["Liste@XN--BCHER-KVA.example"])
        self.assertEqual(idn.reason("a@bücher.de"), "excluded_domain")
        self.assertEqual(idn.reason("liste@bücher.example"), "mailing_list")
        self.assertIsNone(Exclusions(defaults=False).reason("noreply@x.org"))
        self.assertIsNone(compile_patterns((), defaults=False))

    def test_the_sites_mailing_lists_are_read_again_after_the_ttl(self) -> None:
        clock = Clock()
        directory = FakeDirectory([], [Group(id="dev", name="Dev", email="Dev@Lists.x.org")])
        rules = Exclusions(defaults=False, lists=lambda: [g.email for g in directory.groups()],
                           clock=clock, lists_ttl=30)
        self.assertEqual(rules.reason("dev@lists.x.org"), "mailing_list")
        self.assertIsNone(rules.reason("ops@lists.x.org"))
        directory.group_list.append(Group(id="ops", name="Ops", email="ops@lists.x.org"))
        self.assertIsNone(rules.reason("ops@lists.x.org"))  # read at most every 30 s
        self.assertEqual(directory.group_reads, 1)
        clock.advance(30)
        self.assertEqual(rules.reason("ops@lists.x.org"), "mailing_list")
        self.assertEqual(directory.group_reads, 2)

    def test_the_section_builds_the_rules(self) -> None:
        config = parse("[collector]\nexclude_addresses = *@robots.x.org\n"
                       "exclude_domains = spam.example\nexclude_lists = no\n")
        directory = FakeDirectory([], [Group(id="dev", name="Dev", email="dev@x.org")])
        rules = exclusions_of(config.collector, directory, Clock())
        self.assertEqual(rules.reason("r2@robots.x.org"), "robot")
        self.assertEqual(rules.reason("a@spam.example"), "excluded_domain")
        self.assertIsNone(rules.reason("dev@x.org"))
        self.assertEqual(exclusions_of(CollectorSection(), directory, Clock())
                         .reason("dev@x.org"), "mailing_list")


class ConfigTests(SynchronousTestCase):
    def test_defaults_and_bad_values(self) -> None:
        section = CollectorSection()
        self.assertEqual(section.calendar, "organizer")
        self.assertEqual(section.esn_id_profile, "")
        self.assertEqual(section.esn_id_attribute, "")
        self.assertTrue(section.exclude_defaults)
        self.assertTrue(section.exclude_lists)
        self.assertIn("{source}", section.note)
        self.assertEqual(parse("[collector]\ncalendar = all\n").collector.calendar, "all")
        for bad in ("calendar = attendee", "esn_id_profile = email"):
            with self.assertRaises(ConfigError) as caught:
                parse("[collector]\n%s\n" % bad)
            self.assertIn(bad.split(" ")[0], str(caught.exception))


class EsnIdTests(SynchronousTestCase):
    def test_site_profiles_by_nickname(self) -> None:
        ids = EsnIds(FakeDirectory([ALICE_PROFILE, BOB_PROFILE]), "nickname")
        self.assertEqual(self.successResultOf(ids.find(ESN_ALICE)), ALICE)
        self.assertIsNone(self.successResultOf(ids.find("ffffffffffffffffffffffff")))
        self.assertEqual(self.successResultOf(ids.id_of(ALICE)), ESN_ALICE)
        self.assertEqual(self.successResultOf(ids.id_of(BOB)), "B2")  # no nickname: profile id

    def test_not_mapped_gives_the_profile_id_else_the_login(self) -> None:
        ids = EsnIds(FakeDirectory([ALICE_PROFILE]))
        self.assertFalse(ids.mapped)
        self.assertIsNone(self.successResultOf(ids.find(ESN_ALICE)))
        self.assertEqual(self.successResultOf(ids.id_of(ALICE)), "A1")
        self.assertEqual(self.successResultOf(ids.id_of(User(login="u", source="ldap"))), "u")

    def test_ldap_users_by_attribute_asked_once(self) -> None:
        dave = User(login="dave", emails=("dave@example.org",), source="ldap")
        ldap = FakeLDAP({"64aa00000000000000000001": dave})
        config = parse("[collector]\nesn_id_attribute = employeeNumber\n")
        ids = esn_ids_of(config.collector, FakeDirectory([]), ldap)
        self.assertTrue(ids.mapped)
        self.assertEqual(self.successResultOf(ids.find("64aa00000000000000000001")), dave)
        self.assertEqual(self.successResultOf(ids.id_of(dave)), "64aa00000000000000000001")
        self.assertEqual(self.successResultOf(ids.id_of(dave)), "64aa00000000000000000001")
        self.assertEqual(ldap.asked, ["dave"])
        self.assertRaises(ValueError, EsnIds, None, "email")


class ProvenanceTests(SynchronousTestCase):
    WHEN = datetime(2026, 12, 2, 3, 4, 5, tzinfo=timezone.utc)

    def contact(self, **kw: Any) -> Contact:
        return Contact(uid="u1", email="j@x.org", fn="J", rev=self.WHEN, **kw)

    def test_both_vcard_versions_carry_note_and_x_properties(self) -> None:
        contact = self.contact(source="mail", ref="<m1@x.org>",
                               note="Collected automatically from sent mail on 2026-12-02.")
        for version in ("4.0", "3.0"):
            lines = to_vcard(contact, version).split("\r\n")
            self.assertIn("NOTE:Collected automatically from sent mail on 2026-12-02.", lines)
            self.assertIn("X-MAILHUB-SOURCE:mail", lines)
            self.assertIn("X-MAILHUB-FIRST-SEEN:20261202T030405Z", lines)
            self.assertIn("X-MAILHUB-MESSAGE-ID:<m1@x.org>", lines)
            self.assertEqual(lines[-2], "END:VCARD")
            self.assertEqual(parse_vcard(to_vcard(contact, version)).emails, ("j@x.org",))
        calendar = to_vcard(self.contact(source="calendar", ref="ev;1"), "4.0")
        self.assertIn("X-MAILHUB-EVENT-UID:ev\\;1\r\n", calendar)
        self.assertNotIn("NOTE", calendar)
        props = {p[0]: p[3] for p in to_jcard(self.contact(source="queue"))[1]}
        self.assertEqual(props["x-mailhub-source"], "queue")

    def test_a_contact_without_a_source_is_written_as_before(self) -> None:
        self.assertNotIn("X-MAILHUB", to_vcard(self.contact()))

    def test_note_wording(self) -> None:
        origin = Origin(source="calendar", ref="ev-1")
        self.assertEqual(note_text("From {source} ({ref}), {date}; {other}", origin, self.WHEN),
                         "From a calendar event (ev-1), 2026-12-02; {other}")
        self.assertEqual(note_text("", origin, self.WHEN), "")

    def test_origin_of_messages(self) -> None:
        self.assertEqual(Origin.of_message({}), Origin("queue"))
        self.assertEqual(Origin.of_message({"source": "forged"}), Origin("queue"))
        self.assertEqual(Origin.of_message({"source": "mail", "messageId": " <a@b> "}),
                         Origin("mail", "<a@b>"))
        self.assertEqual(Origin.of_message({"source": "calendar", "eventUid": "e",
                                            "messageId": "m", "organizer": 3}),
                         Origin("calendar", "e"))


class EngineRuleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dav = FakeCardDAV()
        self.dav.homes.add(HOME)
        self.users = FakeUsers([ALICE, BOB])
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.metrics = Metrics()
        self.hub = Hub()
        self.events: list[Any] = []
        self.hub.local.topic(CONTACT_ADDED).subscribe(self.events.append)
        self.directory = FakeDirectory([ALICE_PROFILE, BOB_PROFILE],
                                       [Group(id="dev", name="Dev", email="dev@lists.x.org")])
        self.engine = self.make()

    def make(self, **kw: Any) -> CollectorEngine:
        client = CardDAVClient(StubTreq(self.dav), self.clock, metrics=self.metrics)
        kw.setdefault("esn_ids", EsnIds(self.directory, "nickname"))
        kw.setdefault("exclusions", exclusions_of(CollectorSection(exclude_domains=(
            "spam.example",)), self.directory, self.clock))
        return CollectorEngine(self.users, client,
                               BookLayout.from_config("http://dav.test/dav/", ""),
                               self.hub, self.metrics, self.clock, **kw)

    def handle(self, **message: Any) -> Any:
        return self.successResultOf(self.engine.handle(body(**message)))

    def skipped(self, reason: str) -> float:
        return self.metrics.value("mailhub_collector_skipped_total", {"reason": reason})

    def test_exclusions_are_skipped_counted_and_never_put(self) -> None:
        outcome = self.handle(userId="A1", emails=[
            "noreply@shop.example", "Dev list <dev@lists.x.org>", "x@mx.spam.example",
            "Carol <carol@x.org>"])
        self.assertEqual(outcome.created, ["carol@x.org"])
        self.assertEqual(outcome.skipped, {"robot": ["noreply@shop.example"],
                                           "mailing_list": ["dev@lists.x.org"],
                                           "excluded_domain": ["x@mx.spam.example"]})
        self.assertEqual((self.skipped("robot"), self.skipped("mailing_list"),
                          self.skipped("excluded_domain")), (1, 1, 1))
        self.assertEqual(len(self.dav.books[COLLECTED]), 1)  # Carol's alone

    def test_an_esn_id_in_the_event_path_resolves_by_the_mapped_nickname(self) -> None:
        outcome = self.handle(userId=ESN_ALICE, emails=["Carol <carol@x.org>"],
                              source="calendar", eventUid="ev-1", organizer="alice@example.org")
        self.assertEqual(outcome.user, "alice@example.org")
        self.assertEqual(outcome.created, ["carol@x.org"])

    def test_an_unknown_owner_falls_back_to_the_organizer_when_a_site_user(self) -> None:
        engine = self.make(esn_ids=EsnIds())
        outcome = self.successResultOf(engine.handle(body(
            userId="64aa00000000000000000009", emails=["carol@x.org"], source="calendar",
            organizer="ALICE@example.org")))
        self.assertEqual(outcome.user, "alice@example.org")
        self.assertEqual(outcome.created, ["carol@x.org"])
        # An organizer from elsewhere: still unknown, dead-lettered.
        failure = self.failureResultOf(engine.handle(body(
            userId="64aa00000000000000000009", emails=["carol@x.org"], source="calendar",
            organizer="mallory@evil.example")), ValidationError)
        self.assertIn("unknown user", str(failure.value))
        # Only calendar events name an organizer worth trusting.
        self.failureResultOf(engine.handle(body(
            userId="64aa00000000000000000009", emails=["carol@x.org"],
            organizer="alice@example.org")), ValidationError)

    def test_an_invitation_received_collects_nothing(self) -> None:
        outcome = self.handle(userId="A1", emails=["Mallory <m@evil.example>", "carol@x.org",
                                                   "junk"],
                              source="calendar", eventUid="spam-1", organizer="m@evil.example")
        self.assertEqual(outcome.created, [])
        self.assertEqual(outcome.skipped, {"not_organizer": ["m@evil.example", "carol@x.org"]})
        self.assertEqual(len(outcome.rejected), 1)
        self.assertEqual(self.skipped("not_organizer"), 2)
        self.assertNotIn(COLLECTED, self.dav.books)

    def test_calendar_all_collects_invitations_too(self) -> None:
        engine = self.make(calendar="all")
        outcome = self.successResultOf(engine.handle(body(
            userId="A1", emails=["carol@x.org"], source="calendar", organizer="m@evil.example")))
        self.assertEqual(outcome.created, ["carol@x.org"])
        self.assertRaises(ValueError, self.make, calendar="attendee")

    def test_mail_and_queue_messages_ignore_the_organizer_rule(self) -> None:
        outcome = self.handle(userId="A1", emails=["carol@x.org"], organizer="m@evil.example")
        self.assertEqual(outcome.created, ["carol@x.org"])

    def test_cards_say_where_they_came_from(self) -> None:
        self.handle(userEmail="alice@example.org", emails=["carol@x.org"], source="mail",
                    messageId="<m1@example.org>")
        self.handle(userId="A1", emails=["dan@x.org"], source="calendar", eventUid="ev-9",
                    organizer="alice@example.org")
        self.handle(userId="A1", emails=["erin@x.org"])
        texts = {parse_vcard(t).emails[0]: t for t in self.dav.books[COLLECTED].values()}
        self.assertIn("X-MAILHUB-SOURCE:mail\r\n", texts["carol@x.org"])
        self.assertIn("X-MAILHUB-MESSAGE-ID:<m1@example.org>\r\n", texts["carol@x.org"])
        self.assertIn("NOTE:Collected automatically from sent mail on 2023-11-14.\r\n",
                      texts["carol@x.org"])
        self.assertIn("X-MAILHUB-EVENT-UID:ev-9\r\n", texts["dan@x.org"])
        self.assertIn("NOTE:Collected automatically from a calendar event on 2023-11-14.",
                      texts["dan@x.org"])
        self.assertIn("X-MAILHUB-SOURCE:queue\r\n", texts["erin@x.org"])
        self.assertIn("X-MAILHUB-FIRST-SEEN:20231114T221320Z\r\n", texts["erin@x.org"])
        jcard = {p[0]: p[3] for p in self.events[0]["vcard"][1]}
        self.assertEqual(jcard["x-mailhub-message-id"], "<m1@example.org>")

    def test_the_note_wording_is_configurable_and_can_be_off(self) -> None:
        self.successResultOf(self.make(note="").handle(body(userId="A1", emails=["c@x.org"])))
        (text,) = self.dav.books[COLLECTED].values()
        self.assertNotIn("NOTE", text)
        self.assertIn("X-MAILHUB-SOURCE:queue", text)

    def test_book_home_is_the_esn_id_and_streams_still_route_the_event(self) -> None:
        self.handle(userId="A1", emails=["carol@x.org"])
        self.handle(userId="B2", emails=["carol@x.org"])
        alice, bob = self.events
        self.assertEqual((alice["bookHome"], alice["bookId"]), (ESN_ALICE, ESN_ALICE))
        self.assertEqual((bob["bookHome"], bob["bookId"]), ("B2", "B2"))
        # The event stream routes on who the event is about: the user's own
        # stream still gets it (by login and addresses), no other does.
        self.assertTrue(_event_keys(alice) & _user_keys(ALICE))
        self.assertFalse(_event_keys(alice) & _user_keys(BOB))
        self.assertTrue(_event_keys(bob) & _user_keys(BOB))


class SourceProvenanceTests(SynchronousTestCase):
    def test_the_calendar_source_says_uid_and_organizer(self) -> None:
        global_ = LocalPubSub()
        hub = Hub(LocalPubSub(), global_)
        out = Recorder()
        CalendarSource(out, local_shared(hub)).start()
        event = {"eventPath": "/calendars/%s/cal/ev-7.ics" % ESN_ALICE,
                 "event": event_of("alice@example.org", "ev-7")}
        self.successResultOf(global_.topic("calendar:event:created").publish(event))
        (message,) = out.bodies
        self.assertEqual(message["userId"], ESN_ALICE)
        self.assertEqual((message["source"], message["eventUid"], message["organizer"]),
                         ("calendar", "ev-7", "alice@example.org"))
        self.assertEqual(jcal_event(JCAL), ("1", "jane@x.org"))
        self.assertEqual(ical_event(ICS), ("1", "jane@x.org"))
        self.assertEqual(ical_event("junk"), ("", ""))
        self.assertEqual(jcal_event(None), ("", ""))

    def test_the_mail_source_says_the_message_id(self) -> None:
        hub = Hub()
        out = Recorder()
        MailSource(hub, out, ["Sent"]).start()
        self.successResultOf(hub.local.topic("mail:append").publish(
            {"user": "alice@example.org", "mailbox": "Sent", "to": "carol@x.org",
             "message_id": "<m1@example.org>"}))
        self.assertEqual(out.bodies, [{"userEmail": "alice@example.org",
                                       "emails": ["carol@x.org"], "source": "mail",
                                       "messageId": "<m1@example.org>"}])


class CalendarWebProvenanceTests(SynchronousTestCase):
    def test_the_http_surface_says_calendar_uid_and_organizer(self) -> None:
        from mailhub.auth import Auth, SiteToken
        from mailhub.web.calendar import CalendarCollect
        out = Recorder()
        clock = Clock()
        token = SiteToken(Auth(clock, Metrics()), "calendar", lambda t: succeed(t == "s3cret"))
        http = StubTreq(CalendarCollect(out, token).resource())
        response = self.successResultOf(http.post(
            "http://x/collector/v1/calendar?user=alice@example.org&token=s3cret",
            data=ICS.encode("utf-8"), headers={"Content-Type": "text/calendar"}))
        self.assertEqual(response.code, 202)
        (message,) = out.bodies
        self.assertEqual((message["userEmail"], message["source"], message["eventUid"],
                          message["organizer"]),
                         ("alice@example.org", "calendar", "1", "jane@x.org"))
