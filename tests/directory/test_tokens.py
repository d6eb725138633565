"""Named, scoped tokens and the overlap on rotation, through the real hooks.

The directory runs on the in-memory store (the real SQL on SQLite, inline)
with a ``Clock``, so the overlap's end and the poll interval are exact.
"""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mailhub.auth import Auth, SiteToken
from mailhub.directory.tokens import (
    MAX_OVERLAP, SCOPES, Grant, TokenRecord, check_name, match, parse_duration, scope_of,
)
from mailhub.errors import ValidationError
from mailhub.web.calendar import CalendarCollect
from tests.auth.test_surfaces import CALENDAR, ICS, Recorder
from tests.support.auth import auth_failures
from tests.web.test_hooks import ALICE, TOKEN, HooksCase, alice_data

SMTP = "SmtpToGsSmtpToGsSmtpToGsSmtpToGs"
NEW = "NewSiteTokenNewSiteTokenNewSite1"
T0 = 1_800_000_000.0  # the clock's "now" in these tests (seconds since the epoch)


class ScopeNameTests(SynchronousTestCase):
    def test_a_hook_is_named_by_its_path_with_or_without_slash_and_json(self) -> None:
        for text in ("gs-group-member-add", "/gs-group-member-add.json",
                     "gs-group-member-add.json", "GS-Group-Member-Add"):
            self.assertEqual(scope_of(text), "gs-group-member-add")
        self.assertEqual(scope_of("/gs-site-member.json"), "gs-site-member-list")
        self.assertEqual(scope_of("calendar"), "calendar")
        self.assertEqual(len(SCOPES), 6)

    def test_an_unknown_hook_or_an_action_name_is_refused(self) -> None:
        for text in ("add", "gs-group-member", "", "hooks", "../etc"):
            self.assertRaises(ValueError, scope_of, text)

    def test_names_and_durations(self) -> None:
        self.assertEqual(check_name("smtp2gs"), "smtp2gs")
        for bad in ("site", "", "Upper", "a b", "x" * 65, "-x"):
            self.assertRaises(ValueError, check_name, bad)
        self.assertEqual(parse_duration("10m"), 600)
        self.assertEqual(parse_duration("90"), 90)
        self.assertEqual(parse_duration("90s"), 90)
        self.assertEqual(parse_duration("1h30m"), 5400)
        self.assertEqual(parse_duration("2d"), 172800)
        for bad in ("", "m", "10x", "-5m", "1.5h", "31d"):
            self.assertRaises(ValueError, parse_duration, bad)
        self.assertEqual(parse_duration("%ds" % MAX_OVERLAP), MAX_OVERLAP)

    def test_match_tells_the_current_the_previous_and_the_expired_secret(self) -> None:
        records = [TokenRecord("site", "A" * 32, previous="B" * 32, previous_until=100.0),
                   TokenRecord("x", "C" * 32, frozenset({"calendar"}))]
        self.assertEqual(match(records, "A" * 32, 0.0), Grant("site"))
        self.assertEqual(match(records, "B" * 32, 99.9),
                         Grant("site", previous=True, until=100.0))
        self.assertTrue(match(records, "B" * 32, 100.0).expired)  # type: ignore[union-attr]
        self.assertEqual(match(records, "C" * 32, 0.0), Grant("x", frozenset({"calendar"})))
        self.assertIsNone(match(records, "D" * 32, 0.0))
        self.assertIsNone(match(records, "", 0.0))


class TokensCase(HooksCase):
    def setUp(self) -> None:
        super().setUp()
        self.clock.advance(T0)
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def named(self, name: str, secret: str, *scopes: str,
              previous_until: float | None = None) -> None:
        self.ok(self.store.set_named_token(name, secret, frozenset(scopes) or None,
                                           previous_until))

    def refresh(self) -> None:
        self.ok(Deferred.fromCoroutine(self.directory.refresh()))

    def add(self, token: str) -> tuple[int, Any]:
        return self.call("/gs-group-member-add.json",
                         {"token": token, "add": "", "groupId": "example",
                          "email": "new@example.net", "fn": "New Person"})

    def texts(self) -> str:
        from twisted.logger import formatEvent
        return "\n".join(formatEvent(e) for e in self.logged)


class NamedTokenTests(TokensCase):
    def test_a_named_token_works_on_its_hooks_only(self) -> None:
        self.named("smtp2gs", SMTP, "gs-group-member-add", "gs-search-people")
        self.assertEqual(self.add(SMTP)[0], 200)
        self.assertEqual(self.search(ALICE.id, token=SMTP), (200, alice_data()))
        status, body = self.call("/gs-group-groups.json", {"token": SMTP, "get": ""})
        self.assertEqual(status, 403)
        self.assertEqual(body["status"], 100)
        self.assertEqual(auth_failures(self.metrics, "hooks", "scope"), 1)
        self.assertEqual(auth_failures(self.metrics, "hooks", "wrong"), 0)
        self.assertIn("token smtp2gs from 127.0.0.1 is not allowed on gs-group-groups",
                      self.texts())
        self.assertEqual([r["detail"] for r in self.audit()],
                         ["hook=/gs-group-groups.json token=scope"])
        self.assertNotIn(SMTP, repr(self.logged) + repr(self.audit()))
        # The site token still works everywhere.
        self.assertEqual(self.call("/gs-group-groups.json", {"token": TOKEN, "get": ""})[0], 200)

    def test_a_scope_refusal_is_not_slowed_down_as_a_guess(self) -> None:
        self.named("reader", SMTP, "gs-search-people")
        for _ in range(5):
            self.assertEqual(self.add(SMTP)[0], 403)  # answered at once, no Clock advance
        self.assertEqual(auth_failures(self.metrics, "hooks", "scope"), 5)

    def test_a_named_tokens_success_does_not_forgive_guesses_at_the_other_tokens(self) -> None:
        from tests.web.test_hooks import BASE
        self.named("reader", SMTP, "gs-search-people")
        self.assertEqual(self.search(ALICE.id, token="guess-1")[0], 403)
        held = self.http.post(BASE + "/gs-search-people.json",
                              data={"token": "guess-2", "user": ALICE.id, "search": ""})
        self.http.flush()
        self.clock.advance(0.25)
        self.http.flush()
        self.assertEqual(self.successResultOf(held).code, 403)
        self.assertEqual(self.search(ALICE.id, token=SMTP)[0], 200)
        # The next guess is still slowed down: the named token's success
        # trusted the address for that token only.
        again = self.http.post(BASE + "/gs-search-people.json",
                               data={"token": "guess-3", "user": ALICE.id, "search": ""})
        self.http.flush()
        self.assertNoResult(again)
        self.clock.advance(15)
        self.http.flush()
        self.assertEqual(self.successResultOf(again).code, 403)

    def test_the_alias_path_is_the_member_list_scope(self) -> None:
        self.named("lister", SMTP, "gs-site-member-list")
        self.assertEqual(self.call("/gs-site-member.json", {"token": SMTP, "users": ""})[0], 200)
        self.assertEqual(self.call("/gs-site-member-list.json",
                                   {"token": SMTP, "users": ""})[0], 200)

    def test_a_revoked_token_is_refused_after_the_next_poll(self) -> None:
        self.named("smtp2gs", SMTP, "gs-search-people")
        self.assertEqual(self.search(ALICE.id, token=SMTP)[0], 200)
        self.assertTrue(self.ok(self.store.revoke_token("smtp2gs")))
        self.refresh()
        self.assertEqual(self.search(ALICE.id, token=SMTP)[0], 403)
        self.assertFalse(self.ok(self.store.revoke_token("smtp2gs")))
        self.assertIn("token smtp2gs revoked", self.texts())

    def test_a_new_named_token_needs_a_hook_and_a_rotation_keeps_them(self) -> None:
        d = self.store.set_named_token("x", SMTP, None, None)
        self.failureResultOf(d, ValidationError)
        self.named("x", SMTP, "gs-search-people")
        self.named("x", "Y" * 32)
        records = {r.name: r for r in self.ok(self.store.load_tokens())}
        self.assertEqual(records["x"].scopes, frozenset({"gs-search-people"}))
        self.assertEqual(records["x"].secret, "Y" * 32)
        self.assertIsNone(records["x"].previous)

    def test_rotation_of_a_named_token_is_published_with_its_name(self) -> None:
        seen: list[object] = []
        self.directory.hub = self.hub
        self.hub.global_.topic("token:rotated").subscribe(seen.append)
        self.named("smtp2gs", SMTP, "gs-search-people")
        self.refresh()
        self.assertEqual(seen, [{"site": "main", "name": "smtp2gs"}])


class CalendarScopeTests(TokensCase):
    """The calendar endpoint is a scope like a hook: ``--hook calendar``."""

    def calendar(self, token: str) -> int:
        self.out = Recorder()
        checker = SiteToken(Auth(self.clock, self.metrics), "calendar",
                            self.directory.check_token, self.directory.check_token_cached)
        http = StubTreq(CalendarCollect(self.out, checker).resource())
        d = http.post(CALENDAR + "?user=alice@example.org", data=ICS.encode(),
                      headers={"Authorization": "Bearer " + token,
                               "Content-Type": "text/calendar"})
        http.flush()
        return int(self.successResultOf(d).code)

    def test_a_token_scoped_to_the_calendar_posts_events_and_nothing_else(self) -> None:
        self.named("caldav", SMTP, "calendar")
        self.assertEqual(self.calendar(SMTP), 202)
        self.assertEqual(self.search(ALICE.id, token=SMTP)[0], 403)
        self.named("hooksonly", "H" * 32, "gs-search-people")
        self.assertEqual(self.calendar("H" * 32), 403)
        self.assertEqual(auth_failures(self.metrics, "calendar", "scope"), 1)
        self.assertEqual(self.calendar(TOKEN), 202)


class OverlapTests(TokensCase):
    def test_the_previous_site_token_works_during_the_overlap_then_stops(self) -> None:
        self.ok(self.store.set_token(NEW, T0 + 600))
        self.refresh()
        self.assertIn("token site rotated; the previous one stays valid for 600 s more",
                      self.texts())
        self.assertEqual(self.search(ALICE.id, token=NEW)[0], 200)
        self.clock.advance(599.9)
        self.assertEqual(self.search(ALICE.id, token=TOKEN)[0], 200)
        used = [e for e in self.logged if "previous secret" in e.get("log_format", "")]
        self.assertEqual([(e["name"], e["client"]) for e in used], [("site", "127.0.0.1")])
        self.clock.advance(0.1)
        status, body = self.search(ALICE.id, token=TOKEN)
        self.assertEqual(status, 403)
        self.assertEqual(auth_failures(self.metrics, "hooks", "expired"), 1)
        self.assertIn("the previous secret of token site from 127.0.0.1 refused", self.texts())
        self.assertNotIn(TOKEN, self.texts())
        self.assertNotIn(NEW, self.texts())
        self.assertEqual(self.search(ALICE.id, token=NEW)[0], 200)

    def test_without_an_overlap_the_previous_token_stops_at_once(self) -> None:
        self.ok(self.store.set_token(NEW))
        self.refresh()
        self.assertIn("token site rotated; the previous one is no longer valid", self.texts())
        self.assertEqual(self.search(ALICE.id, token=TOKEN)[0], 403)
        self.assertEqual(auth_failures(self.metrics, "hooks", "wrong"), 1)

    def test_a_named_token_keeps_its_previous_secret_and_scopes_during_its_overlap(self) -> None:
        self.named("smtp2gs", SMTP, "gs-search-people")
        self.named("smtp2gs", "Z" * 32, previous_until=T0 + 60)
        self.refresh()
        self.assertEqual(self.search(ALICE.id, token=SMTP)[0], 200)
        self.assertEqual(self.search(ALICE.id, token="Z" * 32)[0], 200)
        self.assertEqual(self.add(SMTP)[0], 403)  # still limited to its hooks
        self.clock.advance(60)
        self.assertEqual(self.search(ALICE.id, token=SMTP)[0], 403)
        self.assertEqual(self.search(ALICE.id, token="Z" * 32)[0], 200)

    def test_a_second_rotation_drops_the_first_previous_secret(self) -> None:
        self.ok(self.store.set_token(NEW, T0 + 600))
        self.ok(self.store.set_token("Third" * 6 + "33", T0 + 600))
        self.refresh()
        self.assertEqual(self.search(ALICE.id, token=TOKEN)[0], 403)
        self.assertEqual(self.search(ALICE.id, token=NEW)[0], 200)


class PollBoundTests(TokensCase):
    """On SQLite a replaced token is refused at most ``poll_interval`` after
    the change commits (doc/cli.rst), and not a moment later."""

    def test_a_replaced_token_is_refused_within_one_poll_interval(self) -> None:
        self.directory.startService()
        self.addCleanup(self.directory.stopService)
        self.clock.advance(0.25)  # the poll runs every 0.25 s from here
        self.assertIsNotNone(self.directory.check_token_cached(TOKEN))
        self.ok(self.store.set_token(NEW))  # the CLI, elsewhere
        self.clock.advance(0.25)
        self.assertIsNone(self.directory.check_token_cached(TOKEN))
        self.assertEqual(self.search(ALICE.id, token=TOKEN)[0], 403)
        self.assertEqual(self.search(ALICE.id, token=NEW)[0], 200)
