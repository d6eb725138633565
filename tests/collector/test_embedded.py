"""The /dav/ Guard: throttled, counted and published logins; a cache that forgets.

Unit tests: the Guard is driven as a WSGI application with a fake reactor
whose ``callFromThread`` runs at once (so ``blockingCallFromThread`` works
without threads when nothing waits), and through :meth:`Guard.check` with a
``Clock`` where the throttle makes an attempt wait.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Callable

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailhub.auth import Throttle
from mailhub.collector.embedded import Guard
from mailhub.directory.model import User
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from tests.collector.fakes import FakeUsers
from tests.support.auth import auth_failures

ALICE = User(login="alice@example.org", emails=("alice@example.org",), id="A1")
CLIENT = "192.0.2.7"


class _ReactorNow(Clock):
    """A Clock whose callFromThread runs the call at once, in the caller's thread."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        f(*args, **kw)


class _App:
    """The WSGI application behind the Guard: records who it was called for."""

    def __init__(self) -> None:
        self.users: list[str | None] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        self.users.append(environ.get("REMOTE_USER"))
        start_response("207 Multi-Status", [("Content-Type", "text/xml")])
        return [b"<multistatus/>"]


def _basic(login: str, password: str) -> str:
    return "Basic " + base64.b64encode(("%s:%s" % (login, password)).encode()).decode()


class GuardTests(SynchronousTestCase):

    def setUp(self) -> None:
        self.clock = _ReactorNow()
        self.clock.advance(1_700_000_000)
        self.users = FakeUsers([ALICE], {"alice@example.org": "pw-a"})
        self.app = _App()
        self.metrics = Metrics()
        self.hub = Hub()
        self.events: list[tuple[str, Any]] = []
        for topic in ("login:success", "login:failure"):
            self.hub.local.topic(topic).subscribe(self._recorder(topic))
        self.guard = Guard(self.app, self.users, self.clock, hub=self.hub,
                           metrics=self.metrics, clock=self.clock)

    def _recorder(self, topic: str) -> Callable[[Any], None]:
        def record(data: Any) -> None:
            self.events.append((topic, data))
        return record

    def request(self, login: str | None, password: str = "") -> str:
        """The status line the Guard answers with."""
        environ: dict[str, Any] = {"REQUEST_METHOD": "PROPFIND", "PATH_INFO": "/x/",
                                   "SCRIPT_NAME": "/dav", "REMOTE_ADDR": CLIENT}
        if login is not None:
            environ["HTTP_AUTHORIZATION"] = _basic(login, password)
        status: list[str] = []
        self.guard(environ, lambda s, h, exc_info=None: status.append(s))
        return status[0]

    def logins(self, result: str) -> float:
        if result == "success":
            return self.metrics.value("mailhub_auth_successes_total", {"surface": "dav"})
        if result == "failure":  # a wrong or an empty password
            return (auth_failures(self.metrics, "dav", "wrong")
                    + auth_failures(self.metrics, "dav", "empty"))
        return auth_failures(self.metrics, "dav", result)

    def test_a_wrong_password_is_refused_counted_and_published_without_the_password(self) -> None:
        self.assertEqual(self.request("alice@example.org", "guess-1"), "401 Unauthorized")
        self.assertEqual(self.app.users, [])
        self.assertEqual(self.logins("failure"), 1)
        self.assertEqual(self.events, [("login:failure", {
            "user": "alice@example.org", "source": "dav", "client": CLIENT,
            "at": "2023-11-14T22:13:20Z"})])
        self.assertNotIn("guess-1", json.dumps(self.events))

    def test_a_good_password_reaches_radicale_and_is_published_as_a_success(self) -> None:
        self.assertEqual(self.request("alice@example.org", "pw-a"), "207 Multi-Status")
        self.assertEqual(self.app.users, ["alice@example.org"])
        self.assertEqual(self.logins("success"), 1)
        self.assertEqual([(t, d["user"], d["source"]) for t, d in self.events],
                         [("login:success", "alice@example.org", "dav")])
        self.assertNotIn("pw-a", json.dumps(self.events))

    def test_no_credentials_is_a_challenge_not_a_failure(self) -> None:
        self.assertEqual(self.request(None), "401 Unauthorized")
        self.assertEqual((self.logins("failure"), self.events), (0, []))

    def test_an_empty_password_fails_without_asking_the_user_source(self) -> None:
        self.assertEqual(self.request("alice@example.org", ""), "401 Unauthorized")
        self.assertEqual(self.users.authentications, 0)
        self.assertEqual(self.logins("failure"), 1)
        self.assertEqual([t for t, _ in self.events], ["login:failure"])

    def test_repeated_failures_wait_on_the_clock_before_the_password_is_checked(self) -> None:
        for n in range(2):
            d = self.guard.check("alice@example.org", "guess-%d" % n, CLIENT)
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.users.authentications, 2)
        # The third attempt from the same client waits before the check.
        d = self.guard.check("alice@example.org", "pw-a", CLIENT)
        self.assertNoResult(d)
        self.assertEqual(self.users.authentications, 2)
        self.clock.advance(0.25)
        self.assertEqual(self.successResultOf(d), ALICE)
        self.assertEqual(self.users.authentications, 3)
        self.assertEqual((self.logins("failure"), self.logins("success")), (2, 1))

    def test_a_wait_longer_than_a_worker_may_hold_is_refused_at_once(self) -> None:
        throttle = Throttle(self.clock)
        guard = Guard(self.app, self.users, self.clock, hub=self.hub, metrics=self.metrics,
                      clock=self.clock, throttle=throttle, max_wait=2.0)
        for n in range(6):
            throttle.after("alice@example.org", CLIENT, False)
        d = guard.check("alice@example.org", "pw-a", CLIENT)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.users.authentications, 0)
        self.assertEqual(self.logins("throttled"), 1)
        self.assertEqual([t for t, _ in self.events], ["login:failure"])
        # Once the pair's delay has run down, the right password works again
        # (after the account's own, shorter, delay: a worker may wait that).
        self.clock.advance(16)
        d = guard.check("alice@example.org", "pw-a", CLIENT)
        self.clock.advance(throttle.max_delay)
        self.assertEqual(self.successResultOf(d), ALICE)

    def test_a_burst_of_requests_checks_the_password_once(self) -> None:
        for _ in range(3):
            self.assertEqual(self.request("alice@example.org", "pw-a"), "207 Multi-Status")
        self.assertEqual(self.users.authentications, 1)
        self.assertEqual(self.logins("success"), 1)

    def test_remembered_logins_expire_within_seconds(self) -> None:
        self.request("alice@example.org", "pw-a")
        self.clock.advance(10)
        self.request("alice@example.org", "pw-a")
        self.assertEqual(self.users.authentications, 2)

    def test_the_cache_holds_no_password(self) -> None:
        self.request("alice@example.org", "pw-a")
        held = repr(self.guard._logins)
        self.assertNotIn("pw-a", held)
        self.assertNotIn(repr(b"pw-a")[2:-1], held)

    def test_after_a_password_change_the_old_one_stops_working(self) -> None:
        self.assertEqual(self.request("alice@example.org", "pw-a"), "207 Multi-Status")
        self.users.passwords["alice@example.org"] = "pw-new"
        # The directory's change log reports the profile change.
        self.guard.directory_changed("profile", "A1")
        self.assertEqual(self.request("alice@example.org", "pw-a"), "401 Unauthorized")
        self.assertEqual(self.request("alice@example.org", "pw-new"), "207 Multi-Status")

    def test_a_removed_user_is_refused_after_invalidation(self) -> None:
        self.assertEqual(self.request("alice@example.org", "pw-a"), "207 Multi-Status")
        self.users.users.clear()
        self.guard.invalidate()
        self.assertEqual(self.request("alice@example.org", "pw-a"), "401 Unauthorized")

    def test_other_changes_keep_remembered_logins(self) -> None:
        self.request("alice@example.org", "pw-a")
        self.guard.directory_changed("group", "g1")
        self.request("alice@example.org", "pw-a")
        self.assertEqual(self.users.authentications, 1)

    def test_a_check_overtaken_by_an_invalidation_is_not_remembered(self) -> None:
        invalidate_during_check = self.users.authenticate

        def authenticate(login: str, password: str) -> Any:
            self.guard.invalidate()
            return invalidate_during_check(login, password)

        self.users.authenticate = authenticate  # type: ignore[method-assign]
        self.assertEqual(self.request("alice@example.org", "pw-a"), "207 Multi-Status")
        self.assertEqual(self.guard._logins, {})

    def test_user_source_down_is_counted_as_unavailable_not_as_a_failure(self) -> None:
        self.users.down = True
        self.assertEqual(self.request("alice@example.org", "pw-a"), "503 Service Unavailable")
        self.assertEqual((self.logins("unavailable"), self.logins("failure")), (1, 0))
        self.assertEqual(self.events, [])
