"""The MailStore Application Integration surface.

Unit tests drive the real Klein resource through StubTreq with in-memory user
sources; the integration tests at the end run a real HTTP listener in front
of a real slapd (site users first, then LDAP), as MailStore would see it.
"""

from __future__ import annotations

import base64
import json
from typing import Any, AsyncIterator

import treq
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site
from zope.interface import implementer

from mailhub.auth import Throttle
from mailhub.config import Config, LDAPSection, MailStoreSection
from mailhub.directory.interfaces import IUserSource
from mailhub.directory.ldap import LDAPService
from mailhub.directory.memory import MemoryStore
from mailhub.directory.model import Email, Profile, User
from mailhub.directory.users import ChainedUserSource, HashingService, SiteUserSource, hash_password
from mailhub.errors import Unavailable
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.web.mailstore import MailStoreIntegration
from tests.support import slapd as fixture
from tests.support.auth import auth_failures
from tests.support.require import free_port
from tests.support.slapd import Slapd

URL = "http://mailhub.example.test/"
CONFIG = Config(mailstore=MailStoreSection(username="mailstore", password="Passw0rd"))


def basic(user: str, password: str) -> dict[bytes, list[bytes]]:
    token = base64.b64encode(("%s:%s" % (user, password)).encode("utf-8"))
    return {b"authorization": [b"Basic " + token]}


GOOD = basic("mailstore", "Passw0rd")


@implementer(IUserSource)
class FakeUsers:
    """Users in memory; ``down`` or ``fail_after`` make it Unavailable."""

    name = "fake"

    def __init__(self, count: int = 3) -> None:
        self.users = [User("user%d" % n, "Nüßlein %d" % n, ("u%d@example.test" % n,),
                           dn="uid=user%d,dc=example,dc=test" % n, source="ldap")
                      for n in range(count)]
        self.passwords = {u.login: "pw-%s" % u.login for u in self.users}
        self.down = False
        self.fail_after: int | None = None
        self.pages_served = 0
        self.closed = False

    def find(self, login: str) -> "Deferred[User | None]":
        return succeed(next((u for u in self.users if u.login == login), None))

    def authenticate(self, login: str, password: str) -> "Deferred[User | None]":
        if self.down:
            return fail(Unavailable("LDAP is unavailable: connection refused"))
        ok = password and self.passwords.get(login) == password
        return succeed(next(u for u in self.users if u.login == login) if ok else None)

    async def pages(self, page_size: int) -> AsyncIterator[list[User]]:
        try:
            if self.down:
                raise Unavailable("LDAP is unavailable: connection refused")
            for start in range(0, len(self.users), page_size):
                if self.fail_after is not None and self.pages_served >= self.fail_after:
                    raise Unavailable("LDAP listing failed: server gone")
                self.pages_served += 1
                yield self.users[start:start + page_size]
        finally:
            self.closed = True


class MailStoreUnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.users = FakeUsers(count=5)
        self.hub = Hub()
        self.events: list[tuple[str, Any]] = []
        for topic in ("login:success", "login:failure"):
            self.hub.global_.topic(topic).subscribe(  # type: ignore[attr-defined]
                lambda data, topic=topic: self.events.append((topic, data)))
        self.metrics = Metrics()
        self.surface = MailStoreIntegration(CONFIG, self.users, self.hub, self.metrics,
                                            self.clock, page_size=2)
        self.stub = StubTreq(self.surface.resource())

    def post(self, body: Any, headers: Any = GOOD) -> tuple[Any, Any]:
        response = self.successResultOf(self.stub.post(URL, data=body, headers=headers))
        raw = self.successResultOf(response.content())
        return response, json.loads(raw)

    def test_list_answers_every_user_as_a_json_array(self) -> None:
        response, body = self.post({"cmd": "list"})
        self.assertEqual(response.code, 200)
        # MailStore's own examples answer text/json (issue 12): the type its client takes.
        self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                         [b"text/json; charset=utf-8"])
        self.assertEqual(len(body), 5)
        self.assertEqual(body[1], {"userName": "user1", "distinguishedName": "uid=user1,dc=example,dc=test",
                                   "fullName": "Nüßlein 1", "emailAddresses": ["u1@example.test"]})
        self.assertEqual(self.users.pages_served, 3)
        self.assertTrue(self.users.closed)
        self.assertEqual(self.metrics.value("mailhub_mailstore_listed_users_total"), 5)

    def test_an_empty_directory_is_an_empty_array(self) -> None:
        self.users.users = []
        self.assertEqual(self.post({"cmd": "list"})[1], [])

    def test_a_source_down_before_the_list_starts_is_a_503_with_a_reason(self) -> None:
        self.users.down = True
        response, body = self.post({"cmd": "list"})
        self.assertEqual(response.code, 503)
        self.assertIn("LDAP is unavailable", body["error"])

    def test_a_source_failing_mid_list_never_gives_a_valid_truncated_list(self) -> None:
        self.users.fail_after = 1
        d = self.stub.post(URL, data={"cmd": "list"}, headers=GOOD)
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        failure = self.failureResultOf(response.content())
        self.assertIsNotNone(failure)
        self.assertTrue(self.users.closed)
        self.assertEqual(self.metrics.value("mailhub_mailstore_list_total", {"result": "failed"}), 1)

    def test_auth_with_the_right_password_succeeds_and_is_published(self) -> None:
        response, body = self.post({"cmd": "auth", "user": "user2", "pass": "pw-user2"})
        self.assertEqual((response.code, body), (200, {"succeeded": True}))
        self.assertEqual(len(self.events), 1)
        topic, data = self.events[0]
        self.assertEqual(topic, "login:success")
        self.assertEqual(data["user"], "user2")
        self.assertEqual(data["source"], "mailstore")
        self.assertEqual(data["at"], "1970-01-01T00:00:00Z")
        self.assertIn("client", data)
        self.assertNotIn("pw-user2", json.dumps(data))
        self.assertEqual(self.metrics.value("mailhub_auth_successes_total", {"surface": "mailstore"}), 1)

    def test_wrong_or_empty_passwords_fail_and_are_published(self) -> None:
        for password in ("nope", ""):
            response, body = self.post({"cmd": "auth", "user": "user2", "pass": password})
            self.assertEqual((response.code, body), (200, {"succeeded": False}))
        self.assertEqual([t for t, _ in self.events], ["login:failure", "login:failure"])
        self.assertEqual(auth_failures(self.metrics, "mailstore"), 2)

    def test_auth_while_the_source_is_down_is_a_503_never_a_success(self) -> None:
        self.users.down = True
        response, body = self.post({"cmd": "auth", "user": "user2", "pass": "pw-user2"})
        self.assertEqual(response.code, 503)
        self.assertIn("LDAP is unavailable", body["error"])
        self.assertEqual(self.events, [])

    def post_later(self, form: dict[str, str], delay: float) -> Any:
        """Post, check the answer waits exactly ``delay`` seconds, return its body."""
        d = self.stub.post(URL, data=form, headers=GOOD)
        self.clock.advance(delay - 0.01)
        self.stub.flush()
        self.assertNoResult(d)
        self.clock.advance(0.01)
        self.stub.flush()
        response = self.successResultOf(d)
        return json.loads(self.successResultOf(response.content()))

    def test_repeated_failures_are_slowed_down_and_a_success_resets(self) -> None:
        wrong = {"cmd": "auth", "user": "user2", "pass": "nope"}
        right = {"cmd": "auth", "user": "user2", "pass": "pw-user2"}
        self.post(wrong)
        self.post(wrong)  # two failures: the next attempt waits 0.25 s
        self.assertEqual(self.post_later(wrong, 0.25), {"succeeded": False})
        self.assertEqual(self.post_later(right, 0.5), {"succeeded": True})
        self.assertEqual(self.post(right)[1], {"succeeded": True})
        # Another user is never slowed down by user2's failures.
        self.assertEqual(self.post({"cmd": "auth", "user": "user3", "pass": "pw-user3"})[1],
                         {"succeeded": True})

    def test_missing_or_wrong_basic_credentials_are_a_401_with_www_authenticate(self) -> None:
        for headers in ({}, basic("mailstore", "wrong"), basic("other", "Passw0rd"),
                        {b"authorization": [b"Basic !!!"]}):
            response, body = self.post({"cmd": "list"}, headers=headers)
            self.assertEqual(response.code, 401)
            self.assertTrue(response.headers.getRawHeaders(b"www-authenticate")[0]
                            .startswith(b"Basic realm="))
            self.assertIn("error", body)

    def test_without_configured_credentials_everything_is_refused(self) -> None:
        surface = MailStoreIntegration(Config(), self.users, self.hub, self.metrics, self.clock)
        stub = StubTreq(surface.resource())
        response = self.successResultOf(stub.post(URL, data={"cmd": "list"},
                                                   headers=basic("", "")))
        self.assertEqual(response.code, 401)

    def test_a_username_without_a_password_refuses_the_empty_password(self) -> None:
        config = Config(mailstore=MailStoreSection(username="mailstore", password=""))
        surface = MailStoreIntegration(config, self.users, self.hub, self.metrics, self.clock)
        stub = StubTreq(surface.resource())
        response = self.successResultOf(stub.post(URL, data={"cmd": "list"},
                                                   headers=basic("mailstore", "")))
        self.assertEqual(response.code, 401)

    def test_unknown_or_missing_cmd_is_a_400_with_a_reason(self) -> None:
        for form in ({"cmd": "delete"}, {}, {"user": "x"}):
            response, body = self.post(form)
            self.assertEqual(response.code, 400)
            self.assertIn("cmd", body["error"])

    def test_auth_without_user_is_a_400(self) -> None:
        response, body = self.post({"cmd": "auth", "pass": "x"})
        self.assertEqual(response.code, 400)

    def test_a_get_is_a_405_in_json(self) -> None:
        response = self.successResultOf(self.stub.get(URL, headers=GOOD))
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"POST"])
        self.assertIn("POST", json.loads(self.successResultOf(response.content()))["error"])

    def test_bad_form_encoding_is_a_400(self) -> None:
        response, body = self.post(b"cmd=auth&user=%ff&pass=x",
                                   headers={**GOOD, b"content-type":
                                            [b"application/x-www-form-urlencoded"]})
        self.assertEqual(response.code, 400)


class MailStoreAgainstSlapd(TestCase):
    """A real HTTP listener, the chain (site users, then a real slapd)."""

    server: Slapd

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = fixture.shared()

    def build(self, urls: tuple[str, ...]) -> None:
        settings = LDAPSection(**self.server.settings(urls=urls, timeout=1.0))
        ldap = LDAPService(reactor, settings, threads=2)
        hashing = HashingService(threads=1)
        for service in (ldap, hashing):
            service.startService()
            self.addCleanup(service.stopService)
        store = MemoryStore()
        store.create_profile(Profile(id="siteSiteSiteSiteSite01", name="Site Admin", emails=(
            Email("admin@site.example.test", preferred=True),)))
        store.set_password_hash("siteSiteSiteSiteSite01", hash_password("admin-pw"))
        site = SiteUserSource(store, reactor, hashing.pool)
        chain = ChainedUserSource([site, ldap.source])
        config = Config(mailstore=MailStoreSection(username="mailstore", password="Passw0rd"),
                        ldap=LDAPSection(page_size=500))
        self.hub = Hub()
        surface = MailStoreIntegration(config, chain, self.hub, Metrics(), reactor,
                                       throttle=Throttle(reactor, base=0.01, max_delay=0.05))
        port = reactor.listenTCP(0, Site(surface.resource()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.url = "http://127.0.0.1:%d/" % port.getHost().port

    async def call(self, form: dict[str, str]) -> tuple[int, Any]:
        response = await treq.post(self.url, data=form, headers=GOOD, persistent=False)
        return response.code, json.loads(await response.content())

    async def _list_and_auth(self) -> None:
        self.build((self.server.url,))
        code, users = await self.call({"cmd": "list"})
        self.assertEqual(code, 200)
        self.assertEqual(len(users), 1 + 1200 + 1)
        self.assertEqual(users[0]["userName"], "admin@site.example.test")
        zoe = next(u for u in users if u["userName"] == "zoe")
        self.assertEqual(zoe["fullName"], "Zoë Ørsted-Ünal")
        self.assertEqual(len(zoe["emailAddresses"]), 3)
        for form, expected in [
            ({"user": "user00005", "pass": fixture.password(5)}, True),
            ({"user": "user00005@example.test", "pass": fixture.password(5)}, True),
            ({"user": "zoe", "pass": fixture.ZOE_PASSWORD}, True),
            ({"user": "admin@site.example.test", "pass": "admin-pw"}, True),
            ({"user": "user00005", "pass": "wrong"}, False),
            ({"user": "user00005", "pass": ""}, False),
            ({"user": "*)(uid=*", "pass": fixture.password(5)}, False),
            ({"user": "*", "pass": fixture.password(5)}, False),
            ({"user": "nobody", "pass": "x"}, False),
        ]:
            code, body = await self.call({"cmd": "auth", **form})
            self.assertEqual((code, body), (200, {"succeeded": expected}), form)

    def test_list_and_auth_against_slapd(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._list_and_auth())

    async def _failover(self) -> None:
        self.build(("ldap://127.0.0.1:%d" % free_port(), self.server.url))
        code, body = await self.call({"cmd": "auth", "user": "user00006",
                                      "pass": fixture.password(6)})
        self.assertEqual((code, body), (200, {"succeeded": True}))
        code, users = await self.call({"cmd": "list"})
        self.assertEqual(len(users), 1202)

    def test_a_first_server_down_fails_over(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._failover())

    async def _hung(self) -> None:
        self.build((self.server.url,))
        self.server.pause()
        try:
            code, body = await self.call({"cmd": "auth", "user": "user00006",
                                          "pass": fixture.password(6)})
            self.assertEqual(code, 503)
            self.assertIn("LDAP is unavailable", body["error"])
            code, body = await self.call({"cmd": "list"})
            self.assertEqual(code, 503)
            # Site users still authenticate while LDAP hangs.
            code, body = await self.call({"cmd": "auth", "user": "admin@site.example.test",
                                          "pass": "admin-pw"})
            self.assertEqual(body, {"succeeded": True})
        finally:
            self.server.resume()

    def test_a_server_that_stops_answering_gives_503(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._hung())
