"""Every surface checks its secrets through mailhub.auth: one throttle, one metric.

The bugs of issue 10 that lived in the copies: the event stream's failure
table reset by spraying logins, parallel connections multiplying the guess
rate, the calendar endpoint's unchecked, uncounted token guesses, and a flood
of random logins starving the password checks of everyone else.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mailhub.auth import Auth, SiteToken, Throttle
from mailhub.collector.embedded import Guard
from mailhub.config import Config, MailhubSection, MailStoreSection, PushSection
from mailhub.directory.service import Directory
from mailhub.directory.memory import MemoryStore
from mailhub.directory.model import User
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.web.calendar import CalendarCollect
from mailhub.web.events import EventStream
from mailhub.web.hooks import GroupHooks
from mailhub.web.mailstore import MailStoreIntegration
from mailhub.web.push import PushReceiver
from tests.push.fakes import FakeUserSource
from tests.support.auth import FromAddress, auth_failures

ALICE = User(login="alice", name="Alice", emails=("alice@example.org",), id="aliceid")
EVENTS = "http://mailhub.test/api/v1/events"
CALENDAR = "http://mailhub.test/collector/v1/calendar"
MAILSTORE = "http://mailhub.test/"
TOKEN = "SiteTokenSiteTokenSiteToken12345"
ICS = ("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nBEGIN:VEVENT\r\nUID:1\r\n"
       "DTSTART:20240101T100000Z\r\nATTENDEE:mailto:bob@example.org\r\n"
       "END:VEVENT\r\nEND:VCALENDAR\r\n")


class Recorder:
    """A collector work queue that keeps what it is given."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def publish(self, body: bytes) -> Deferred[None]:
        self.bodies.append(body)
        return succeed(None)


class CountingLookup:
    """The site token's store lookup, counting how often it is asked."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, token: str) -> Deferred[bool]:
        self.calls += 1
        return succeed(token == TOKEN)


class Case(SynchronousTestCase):
    """One Auth shared by the surfaces, as tap.py wires it, on a Clock."""

    def setUp(self) -> None:
        self.clock, self.metrics, self.hub = Clock(), Metrics(), Hub()
        self.clock.advance(1_700_000_000)
        self.users = FakeUserSource()
        self.users.add(ALICE, "wonderland")
        self.auth = Auth(self.clock, self.metrics, self.hub, self.make_throttle())
        self.stream = EventStream(Config(push=PushSection(keepalive=15.0)), self.hub,
                                  self.metrics, self.users, self.clock, auth=self.auth)
        self.events = StubTreq(FromAddress(self.stream.resource()))

    def tearDown(self) -> None:
        self.stream.close()
        self.clock.advance(3600)  # let every held refusal be answered
        self.events.flush()

    def make_throttle(self) -> Throttle:
        return Throttle(self.clock)

    def checks(self, login: str | None = None) -> int:
        """Password checks the user source has made (for ``login``, or all)."""
        return len([a for a in self.users.asked if login is None or a == login])

    def get(self, login: str, password: str, client: str) -> Deferred[Any]:
        d = self.events.get(EVENTS, auth=(login, password), headers={"X-Test-Client": client})
        self.events.flush()
        return d

    def answered(self, d: Deferred[Any], step: float = 1.0) -> Any:
        """The response, advancing the clock while a refusal is held."""
        done: list[Any] = []
        d.addBoth(lambda result: done.append(result) or result)
        for _ in range(100):
            if done:
                break
            self.clock.advance(step)
            self.events.flush()
        return self.successResultOf(d)


class EventStreamThrottleTests(Case):
    def test_spraying_ten_thousand_logins_does_not_reset_the_throttle(self) -> None:
        for _ in range(3):
            self.assertEqual(self.answered(self.get("alice", "guess", "192.0.2.1")).code, 401)
        for n in range(10_001):
            self.assertEqual(self.answered(self.get("spray%d" % n, "x", "203.0.113.9")).code,
                             401)
        # Alice's fourth failure from her attacker's address still earns its
        # doubled delay: nothing the sprayer did forgot the first three.
        d = self.get("alice", "guess", "192.0.2.1")
        self.clock.advance(0.99)
        self.events.flush()
        self.assertNoResult(d)
        self.clock.advance(0.01)
        self.events.flush()
        self.assertEqual(self.successResultOf(d).code, 401)

    def make_throttle(self) -> Throttle:
        if self._testMethodName.startswith("test_spraying"):
            # A budget the sprayer never exhausts, so each of its logins is
            # checked and remembered (a smaller one would refuse it sooner).
            return Throttle(self.clock, client_free=100_000)
        return Throttle(self.clock)

    def test_parallel_connections_do_not_multiply_the_guess_rate(self) -> None:
        for _ in range(2):
            self.answered(self.get("alice", "guess", "192.0.2.1"))
        before = self.checks("alice")
        pending = [self.get("alice", "guess-%d" % n, "192.0.2.1") for n in range(10)]
        # Ten connections at once: the attempts take the pair's slots one
        # delay (0.25 s) apart, so at most one is checked per 0.25 s.
        counts = [self.checks("alice") - before]
        for _ in range(12):
            self.clock.advance(0.25)
            self.events.flush()
            counts.append(self.checks("alice") - before)
        self.assertLessEqual(counts[0], 1)
        self.assertTrue(all(b - a <= 1 for a, b in zip(counts, counts[1:])), counts)
        self.assertLess(counts[-1], 10)
        for d in pending:
            self.assertEqual(self.answered(d).code, 401)

    def test_an_address_over_its_budget_is_refused_without_asking_the_user_source(
            self) -> None:
        pending = [self.get("random%d" % n, "x", "203.0.113.9") for n in range(100)]
        checked = self.checks()
        # Ten free failures, then doubling slots until they lie 15 s ahead.
        self.assertLess(checked, 20)
        d = self.get("alice", "wonderland", "203.0.113.9")
        self.assertEqual(self.successResultOf(d).code, 401)  # at once, unchecked
        self.assertEqual(self.checks(), checked)
        self.assertGreater(auth_failures(self.metrics, "events", "throttled"), 80)
        # The real user elsewhere is neither refused nor slowed down.
        d = self.get("alice", "wonderland", "192.0.2.1")
        self.assertEqual(self.successResultOf(d).code, 200)
        self.stream.close()
        self.events.flush()
        for d in pending:
            self.answered(d)


class StarvationTests(Case):
    """50 addresses spraying the event stream; MailStore's cmd=auth elsewhere."""

    def test_a_flood_of_random_logins_does_not_hold_up_another_clients_login(self) -> None:
        users = FakeUserSource()
        users.add(ALICE, "wonderland")
        config = Config(mailstore=MailStoreSection(username="mailstore", password="pw"))
        mailstore = MailStoreIntegration(config, self.users, self.hub, self.metrics,
                                         self.clock, auth=self.auth)
        stub = StubTreq(FromAddress(mailstore.resource()))
        pending = [self.get("random-%d-%d" % (c, n), "x", "198.51.100.%d" % c)
                   for n in range(40) for c in range(50)]
        # 2,000 guesses: each address had its ten free failures and a few
        # spaced ones checked; the rest were refused before any hashing.
        self.assertLessEqual(self.checks(), 50 * 17)
        flood = self.checks()
        d = stub.post(MAILSTORE, auth=("mailstore", "pw"),
                      data={"cmd": "auth", "user": "alice", "pass": "wonderland"},
                      headers={"X-Test-Client": "10.0.0.5"})
        stub.flush()
        response = self.successResultOf(d)  # answered at once: nothing to wait for
        self.assertEqual(json.loads(self.successResultOf(response.content())),
                         {"succeeded": True})
        self.assertEqual(self.checks(), flood + 1)
        for d in pending:
            self.answered(d)


class CalendarTokenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock, self.metrics = Clock(), Metrics()
        self.lookup = CountingLookup()
        self.out = Recorder()
        token = SiteToken(Auth(self.clock, self.metrics), "calendar", self.lookup)
        self.http = StubTreq(FromAddress(CalendarCollect(self.out, token).resource()))
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def post(self, token: str, client: str = "192.0.2.1") -> Deferred[Any]:
        d = self.http.post(CALENDAR + "?user=alice@example.org", data=ICS.encode(),
                           headers={"Authorization": "Bearer " + token,
                                    "Content-Type": "text/calendar",
                                    "X-Test-Client": client})
        self.http.flush()
        return d

    def test_a_bad_token_is_logged_counted_and_slowed_down(self) -> None:
        self.assertEqual(self.successResultOf(self.post("guess-1")).code, 403)
        held = self.post("guess-2")  # the second failure in a row earns 0.25 s
        self.assertNoResult(held)
        # Meanwhile the right token is answered at once.
        self.assertEqual(self.successResultOf(self.post(TOKEN)).code, 202)
        self.clock.advance(0.25)
        self.http.flush()
        self.assertEqual(self.successResultOf(held).code, 403)
        self.assertEqual(auth_failures(self.metrics, "calendar", "wrong"), 2)
        self.assertEqual(self.metrics.value("mailhub_auth_successes_total",
                                            {"surface": "calendar"}), 1)
        refused = [e for e in self.logged
                   if e.get("surface") == "calendar" and e.get("reason") == "wrong"]
        self.assertEqual([e["client"] for e in refused], ["192.0.2.1", "192.0.2.1"])
        self.assertNotIn("guess", repr(self.logged))

    def test_a_guessing_address_is_refused_before_the_token_is_looked_up(self) -> None:
        pending = [self.post("guess-%d" % n, "203.0.113.9") for n in range(200)]
        self.assertLess(self.lookup.calls, 30)
        self.assertGreater(auth_failures(self.metrics, "calendar", "throttled"), 150)
        # Another address is not refused.
        self.assertEqual(self.successResultOf(self.post(TOKEN, "192.0.2.1")).code, 202)
        self.clock.advance(3600)
        self.http.flush()
        for d in pending:
            self.assertEqual(self.successResultOf(d).code, 403)


class OneMetricTests(SynchronousTestCase):
    """Each surface counts its refusals in mailhub_auth_failures_total{surface, reason}."""

    def setUp(self) -> None:
        self.clock, self.metrics, self.hub = Clock(), Metrics(), Hub()
        self.auth = Auth(self.clock, self.metrics, self.hub)
        self.users = FakeUserSource()
        self.users.add(ALICE, "wonderland")

    def status(self, resource: Any, method: str, url: str, **kw: Any) -> int:
        stub = StubTreq(resource)
        d = stub.request(method, url, **kw)
        stub.flush()
        done: list[Any] = []
        d.addBoth(lambda result: done.append(result) or result)
        while not done:  # a refusal held for the delay it earned
            self.clock.advance(1)
            stub.flush()
        return int(self.successResultOf(d).code)

    def test_every_surface_counts_its_failures_under_its_own_label(self) -> None:
        config = Config(push=PushSection(username="dovecot", password="pw"),
                        mailstore=MailStoreSection(username="mailstore", password="pw"),
                        mailhub=MailhubSection(site_url="http://site.test/"))
        store = MemoryStore()
        self.successResultOf(store.set_token(TOKEN))
        directory = Directory(store, self.clock)
        self.successResultOf(Deferred.fromCoroutine(directory.load()))
        hooks = GroupHooks(directory, config, self.metrics, self.hub, auth=self.auth)
        self.assertEqual(self.status(hooks.resource(), "POST",
                                     "http://x/gs-group-groups.json?get&token=wrong"), 403)
        calendar = CalendarCollect(Recorder(), SiteToken(self.auth, "calendar",
                                                         CountingLookup()))
        self.assertEqual(self.status(calendar.resource(), "POST",
                                     CALENDAR + "?user=a&token=wrong", data=ICS), 403)
        push = PushReceiver(config, self.hub, self.metrics, self.clock, auth=self.auth)
        for path in ("/preliminary/http-notify/v1/notify", "/push/v1/notify"):
            self.assertEqual(self.status(push.resource(), "PUT", "http://x" + path,
                                         data=b"{}", auth=("dovecot", "wrong")), 401)
        stream = EventStream(config, self.hub, self.metrics, self.users, self.clock,
                             auth=self.auth)
        self.assertEqual(self.status(stream.resource(), "GET", EVENTS,
                                     auth=("alice", "wrong")), 401)
        stream.close()
        mailstore = MailStoreIntegration(config, self.users, self.hub, self.metrics,
                                         self.clock, auth=self.auth)
        self.assertEqual(self.status(mailstore.resource(), "POST", MAILSTORE,
                                     auth=("mailstore", "wrong"), data={"cmd": "list"}), 401)
        self.assertEqual(self.status(mailstore.resource(), "POST", MAILSTORE,
                                     auth=("mailstore", "pw"),
                                     data={"cmd": "auth", "user": "alice", "pass": "no"}), 200)
        guard = Guard(object(), self.users, self.clock, auth=self.auth)
        self.assertIsNone(self.successResultOf(guard.check("alice", "no", "192.0.2.1")))

        surfaces = ("hooks", "calendar", "push-ox", "push-lua", "events",
                    "mailstore-service", "mailstore", "dav")
        self.assertEqual({s: auth_failures(self.metrics, s, "wrong") for s in surfaces},
                         {s: 1.0 for s in surfaces})
        exposition = self.metrics.exposition().decode()
        for old in ("mailhub_push_auth_failures_total", "mailhub_sse_auth_failures_total",
                    "mailhub_mailstore_unauthorized_total", "mailhub_mailstore_auth_total",
                    "mailhub_dav_logins_total"):
            self.assertNotIn(old, exposition)


class ServiceCredentialTests(SynchronousTestCase):
    """The push receivers' Basic credentials: throttled, yet Dovecot never waits."""

    URL = "http://mailhub.test/preliminary/http-notify/v1/notify"
    BODY = json.dumps({"user": "alice", "event": "messageNew", "folder": "INBOX",
                       "imap-uidvalidity": 1, "imap-uid": 1}).encode()

    def setUp(self) -> None:
        self.clock, self.metrics = Clock(), Metrics()
        self.auth = Auth(self.clock, self.metrics)
        config = Config(push=PushSection(username="dovecot", password="pw"))
        self.receiver = PushReceiver(config, Hub(), self.metrics, self.clock, auth=self.auth)
        self.http = StubTreq(FromAddress(self.receiver.resource()))

    def put(self, password: str, client: str) -> int:
        d = self.http.put(self.URL, data=self.BODY, auth=("dovecot", password),
                          headers={"X-Test-Client": client})
        self.http.flush()
        return int(self.successResultOf(d).code)  # always at once: nothing waits

    def test_a_guessing_address_is_refused_unchecked_and_dovecot_is_not(self) -> None:
        self.assertEqual(self.put("pw", "192.0.2.10"), 200)  # Dovecot
        codes = [self.put("guess-%d" % n, "203.0.113.9") for n in range(100)]
        self.assertEqual(set(codes), {401})
        self.assertGreater(auth_failures(self.metrics, "push-ox", "throttled"), 80)
        self.assertLess(auth_failures(self.metrics, "push-ox", "wrong"), 20)
        # Even the right password is refused to the guessing address, unchecked...
        self.assertEqual(self.put("pw", "203.0.113.9"), 401)
        # ...and Dovecot's deliveries go on.
        self.assertEqual(self.put("pw", "192.0.2.10"), 200)
        self.clock.advance(3600)
        self.assertEqual(self.put("pw", "203.0.113.9"), 200)

    def test_dovecot_is_exempt_from_its_address_budget_spent_by_someone_else(self) -> None:
        self.assertEqual(self.put("pw", "192.0.2.10"), 200)  # Dovecot, before the attack
        users = FakeUserSource()
        for n in range(100):  # someone on the same host sprays users' passwords
            Deferred.fromCoroutine(self.auth.login("dav", users, "random%d" % n, "x",
                                                   "192.0.2.10"))
        self.assertGreater(auth_failures(self.metrics, "dav", "throttled"), 80)
        self.assertEqual(self.put("pw", "192.0.2.10"), 200)
        self.clock.advance(3600)


class LogTests(SynchronousTestCase):
    def test_a_flood_of_refusals_is_counted_in_full_and_logged_in_brief(self) -> None:
        clock, metrics = Clock(), Metrics()
        auth = Auth(clock, metrics)
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        for _ in range(1000):
            auth.failed("events", "throttled", "203.0.113.9", "someone")
        auth.failed("events", "throttled", "198.51.100.1", "someone")
        clock.advance(10)
        auth.failed("events", "throttled", "203.0.113.9", "someone")
        self.assertEqual(auth_failures(metrics, "events", "throttled"), 1002)
        lines = [e for e in logged if e.get("reason") == "throttled"]
        self.assertEqual([(e["client"], e["suppressed"]) for e in lines],
                         [("203.0.113.9", 0), ("198.51.100.1", 0), ("203.0.113.9", 999)])
