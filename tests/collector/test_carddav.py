"""The CardDAV client: error mapping, timeouts, concurrency, templates."""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web._newclient import RequestTransmissionFailed

from mailhub.collector.carddav import (BookLayout, BookMissing, CardDAVClient, CardDAVError,
                                       Lanes)
from mailhub.directory.model import User
from mailhub.errors import Unavailable
from tests.collector.fakes import FakeCardDAV


class Hanging:
    """A treq-like client whose requests never answer (counts them)."""

    def __init__(self) -> None:
        self.pending: list[Deferred] = []
        self.methods: list[str] = []

    def request(self, method: str, url: str, **kw: Any) -> Deferred:
        d: Deferred = Deferred()
        self.pending.append(d)
        self.methods.append(method)
        return d


class Refusing:
    def request(self, method: str, url: str, **kw: Any) -> Deferred:
        return fail(ConnectionRefusedError("nope"))


class StalePool:
    """A treq-like client whose first ``stale`` requests meet a closed pooled connection.

    As Twisted's pool behaves against Radicale's built-in server, which
    answers HTTP/1.0 and closes every connection after one response.
    """

    def __init__(self, real: Any, stale: int) -> None:
        self.real = real
        self.stale = stale
        self.calls = 0

    def request(self, method: str, url: str, **kw: Any) -> Deferred:
        self.calls += 1
        if self.stale > 0:
            self.stale -= 1
            kind = ResponseNeverReceived if self.stale % 2 else RequestTransmissionFailed
            return fail(kind([Failure(ConnectionDone("closed cleanly"))]))
        return self.real.request(method, url, **kw)


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.dav = FakeCardDAV()
        self.client = CardDAVClient(StubTreq(self.dav), self.clock)

    def test_connection_refused_is_unavailable(self) -> None:
        client = CardDAVClient(Refusing(), self.clock)
        self.failureResultOf(Deferred.fromCoroutine(client.list_books("http://x/h/")), Unavailable)

    def test_stale_pooled_connections_are_tried_past_until_a_fresh_one(self) -> None:
        self.dav.books["/h/b/"] = {}
        http = StalePool(StubTreq(self.dav), stale=4)
        client = CardDAVClient(http, self.clock, concurrency=3)
        self.assertTrue(self.successResultOf(Deferred.fromCoroutine(
            client.put_new("http://x/h/b/c.vcf", "one"))))
        self.assertEqual(http.calls, 5)
        self.assertIn("c.vcf", self.dav.books["/h/b/"])

    def test_a_server_that_always_closes_is_unavailable_after_bounded_attempts(self) -> None:
        http = StalePool(Refusing(), stale=100)
        client = CardDAVClient(http, self.clock, concurrency=3)
        self.failureResultOf(Deferred.fromCoroutine(client.get("http://x/h/b/c.vcf")),
                             Unavailable)
        self.assertEqual(http.calls, 5)

    def test_a_timeout_is_unavailable(self) -> None:
        http = Hanging()
        client = CardDAVClient(http, self.clock, timeout=5)
        d = Deferred.fromCoroutine(client.put_new("http://x/h/b/c.vcf", "x"))
        self.assertNoResult(d)
        self.clock.advance(5)
        self.failureResultOf(d, Unavailable)

    def test_no_more_than_concurrency_requests_are_in_flight(self) -> None:
        http = Hanging()
        client = CardDAVClient(http, self.clock, concurrency=2, timeout=100)
        ds = [Deferred.fromCoroutine(client.get("http://x/%d" % i)) for i in range(5)]
        self.assertEqual(len(http.pending), 2)
        self.clock.advance(100)
        self.assertEqual(len(http.pending), 4)
        for d in ds:
            d.addErrback(lambda f: None)
        self.clock.advance(200)

    def test_a_waiting_lookup_goes_before_waiting_puts(self) -> None:
        http = Hanging()
        client = CardDAVClient(http, self.clock, concurrency=1, timeout=100)
        puts = [Deferred.fromCoroutine(client.put_new("http://x/h/b/%d.vcf" % i, "x"))
                for i in range(2)]
        report = Deferred.fromCoroutine(client.find_emails("http://x/h/b/", ["a@x.org"]))
        self.assertEqual(http.methods, ["PUT"])
        http.pending[0].callback(Answered(201))
        self.assertEqual(http.methods, ["PUT", "REPORT"])
        http.pending[1].callback(Answered(207, b'<d:multistatus xmlns:d="DAV:"/>'))
        self.assertEqual(self.successResultOf(report), [])
        self.assertEqual(http.methods, ["PUT", "REPORT", "PUT"])
        http.pending[2].callback(Answered(201))
        self.assertEqual([self.successResultOf(d) for d in puts], [True, True])

    def test_statuses_map_to_transient_or_broken(self) -> None:
        for status, error in [(500, Unavailable), (503, Unavailable), (429, Unavailable),
                              (401, Unavailable), (403, Unavailable), (400, CardDAVError)]:
            self.dav.fail_next = [status]
            self.failureResultOf(Deferred.fromCoroutine(
                self.client.get("http://x/h/b/c.vcf")), error)

    def test_put_into_a_missing_book_says_so(self) -> None:
        self.failureResultOf(Deferred.fromCoroutine(
            self.client.put_new("http://x/h/b/c.vcf", "x")), BookMissing)

    def test_put_new_tells_created_from_existing(self) -> None:
        self.dav.books["/h/b/"] = {}
        self.assertTrue(self.successResultOf(Deferred.fromCoroutine(
            self.client.put_new("http://x/h/b/c.vcf", "one"))))
        self.assertFalse(self.successResultOf(Deferred.fromCoroutine(
            self.client.put_new("http://x/h/b/c.vcf", "two"))))
        self.assertEqual(self.dav.cards("/h/b/")["c.vcf"], "one")

    def test_list_books_of_a_missing_home_is_empty(self) -> None:
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(
            self.client.list_books("http://x/nobody/"))), [])

    def test_unparseable_xml_is_a_carddav_error(self) -> None:
        class Garbage(FakeCardDAV):
            def do_PROPFIND(self, request: Any, path: str, body: bytes) -> bytes:
                request.setResponseCode(207)
                return b"<not xml"
        client = CardDAVClient(StubTreq(Garbage()), self.clock)
        self.failureResultOf(Deferred.fromCoroutine(client.list_books("http://x/h/")),
                             CardDAVError)


class Answered:
    """A treq-like response with a status and a body."""

    def __init__(self, code: int, body: bytes = b"") -> None:
        from twisted.web.http_headers import Headers
        self.code = code
        self.headers = Headers()
        self._body = body

    def content(self) -> Deferred:
        return succeed(self._body)


class LanesTests(SynchronousTestCase):
    def test_urgent_waiters_first_then_first_come_first_served(self) -> None:
        lanes = Lanes(1)
        order: list[str] = []
        held = lanes.acquire(urgent=False)
        self.successResultOf(held)
        for name, urgent in (("put1", False), ("put2", False), ("report", True)):
            lanes.acquire(urgent).addCallback(lambda _, n: order.append(n), name)
        for _ in range(3):
            lanes.release()
        self.assertEqual(order, ["report", "put1", "put2"])
        lanes.release()
        self.assertEqual(lanes.free, 1)

    def test_a_cancelled_waiter_gives_up_its_place(self) -> None:
        lanes = Lanes(1)
        lanes.acquire(urgent=False)
        gone = lanes.acquire(urgent=True)
        kept = lanes.acquire(urgent=False)
        gone.cancel()
        self.failureResultOf(gone)
        lanes.release()
        self.successResultOf(kept)
        self.assertEqual(lanes.free, 0)

    def test_when_short_fires_once_less_than_a_round_of_requests_waits(self) -> None:
        lanes = Lanes(2)
        self.successResultOf(lanes.when_short())
        for _ in range(5):
            lanes.acquire(urgent=False)
        short = lanes.when_short()
        self.assertNoResult(short)  # 3 wait for 2 slots
        lanes.release()
        self.assertNoResult(short)  # 2 still wait
        lanes.release()
        self.successResultOf(short)

    def test_run_releases_the_slot_after_a_failure(self) -> None:
        lanes = Lanes(1)
        failed = lanes.run(False, lambda: fail(RuntimeError("boom")))
        self.failureResultOf(failed, RuntimeError)
        self.assertEqual(lanes.free, 1)


class LayoutTests(SynchronousTestCase):
    def test_default_layout_is_user_under_the_url(self) -> None:
        layout = BookLayout.from_config("https://dav.example.org/radicale", "")
        user = User(login="a b@x.org", id="42")
        self.assertEqual(layout.book(user), "https://dav.example.org/radicale/a%20b@x.org/collected/")
        self.assertEqual(layout.home(user), "https://dav.example.org/radicale/a%20b@x.org/")
        self.assertEqual(layout.book_name, "collected")

    def test_nextcloud_template_with_id(self) -> None:
        layout = BookLayout.from_config(
            "", "https://c.example.org/remote.php/dav/addressbooks/users/{id}/collected")
        user = User(login="a@x.org", id="42")
        self.assertEqual(layout.home(user),
                         "https://c.example.org/remote.php/dav/addressbooks/users/42/")

    def test_a_template_without_user_is_refused(self) -> None:
        self.assertRaises(ValueError, BookLayout.from_config, "", "https://x/books/")
