"""Large answers are streamed: a bounded chunk per reactor turn, the same bytes as before,
paused while the transport is full, stopped when the client goes away; while the
directory's table loads they are read from the database, page after page, the same
bytes again; before the server has read its groups, a 503 with Retry-After."""

from __future__ import annotations

import gc
import json
import random
from typing import Any
from urllib.parse import urlencode

from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailhub.config import Config, MailhubSection
from mailhub.directory.memory import MemoryStore
from mailhub.directory.model import Email, Group, Profile
from mailhub.directory.service import Directory
from mailhub.errors import Unavailable
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.web.common import json_bytes
from mailhub.web.hooks import GroupHooks
from mailhub.steps import NEVER, TURN, hold_full_collections, paged, sorted_in_steps
from mailhub.web.streaming import BATCH, CHUNK, StreamedBody, json_array, json_values

TOKEN = "0123456789abcdefghijABCDEFGHIJ01"
SITE = "https://groups.example.com"
FORM = {b"content-type": [b"application/x-www-form-urlencoded"]}
URL = "http://127.0.0.1/gs-site-member-list.json"


class TurnClock(Clock):
    """A Clock that, like the reactor, runs a call made during a turn in the next turn."""

    def turn(self) -> None:
        due = [c for c in self.calls if c.getTime() <= self.seconds()]
        for call in due:
            self.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)


def many_profiles(count: int, seed: int = 7) -> list[Profile]:
    """``count`` profiles in random order, two in three members, with non-ASCII names."""
    rng = random.Random(seed)
    profiles = []
    for n in range(count):
        pid = "".join(rng.choice("abcdefghijkLMNOPQRSTUVWXYZ0123456789") for _ in range(22))
        groups = ("example",) if n % 3 else ()
        profiles.append(Profile(id=pid, name="Pérson %d ✓" % n, nickname=None,
                                emails=(Email("p%d@example.com" % n, True, True),
                                        Email("q%d@example.org" % n, n % 2 == 0, False)),
                                groups=groups))
    return profiles


def old_answers(profiles: list[Profile]) -> dict[str, bytes]:
    """What the hooks answered before streaming, built the way they built it."""
    members = sorted((p for p in profiles if p.groups), key=lambda p: p.id)
    return {
        "users": json_bytes([p.id for p in members]),
        "user_groups": b"[" + b",".join(json_bytes(p.data(SITE)) for p in members) + b"]",
    }


class _Store(MemoryStore):
    """A MemoryStore whose table load (``held``), or whose first read of the
    groups (``held_start``), waits for the test to release it."""

    def __init__(self) -> None:
        super().__init__()
        self.held: Deferred[None] | None = None
        self.held_start: Deferred[None] | None = None

    def load_table(self) -> Any:
        loaded = super().load_table()
        if self.held is None:
            return loaded
        held = self.held
        return held.addCallback(lambda _: loaded)

    def load_groups(self) -> Any:
        groups = super().load_groups()
        if self.held_start is None:
            return groups
        held, self.held_start = self.held_start, None
        self.held_start_given = held
        return held.addCallback(lambda _: groups)


class Site:
    """A hooks surface over a directory of ``profiles``, driven by a Clock."""

    def __init__(self, case: SynchronousTestCase, profiles: list[Profile],
                 hold: bool = False, hold_start: bool = False) -> None:
        self.case = case
        self.clock = TurnClock()
        self.store = _Store()
        case.successResultOf(self.store.set_token(TOKEN))
        case.successResultOf(self.store.create_group(Group("example", "Example")))
        for profile in profiles:
            groups = profile.groups
            case.successResultOf(self.store.create_profile(
                Profile(profile.id, profile.name, profile.nickname, profile.emails)))
            for group in groups:
                case.successResultOf(self.store.add_member(group, profile.id))
        if hold:
            self.store.held = Deferred()
        if hold_start:
            self.store.held_start = Deferred()
        # A load left waiting would keep the garbage collector paused.
        case.addCleanup(self.release)
        self.directory = Directory(self.store, self.clock)
        self.loading = Deferred.fromCoroutine(self.directory.load())
        config = Config(mailhub=MailhubSection(site_url=SITE + "/", max_body=1024 * 1024))
        self.hooks = GroupHooks(self.directory, config, Metrics(), Hub())
        self.http = StubTreq(self.hooks.resource())

    def request(self, action: str, url: str = URL) -> Deferred[Any]:
        body = urlencode({"token": TOKEN, action: ""}).encode()
        return self.http.request("POST", url, data=body, headers=FORM)

    def release(self) -> None:
        """Let every held load finish."""
        for held in (self.store.held_start, getattr(self.store, "held_start_given", None),
                     self.store.held):
            if held is not None and not held.called:
                held.callback(None)

    def release_start(self) -> None:
        """Let the directory's first read of the groups finish."""
        held = self.store.held_start_given
        held.callback(None)

    def answer(self, action: str) -> tuple[Any, bytes, int]:
        return self.answer_at(URL, action)

    def answer_at(self, url: str, action: str) -> tuple[Any, bytes, int]:
        """(response, body, reactor turns it took after the first)."""
        d = self.request(action, url)
        self.http.flush()
        response = self.case.successResultOf(d)
        content = response.content()
        turns = 0
        while not content.called:
            turns += 1
            self.case.assertLess(turns, 100_000, "the answer never ended")
            self.clock.turn()
            self.http.flush()
        body = self.case.successResultOf(content)
        return response, body, turns


class StreamedAnswerTests(SynchronousTestCase):
    def test_user_groups_of_a_large_site_is_streamed_over_many_turns_with_the_same_bytes(
            self) -> None:
        profiles = many_profiles(3000)
        site = Site(self, profiles)
        response, body, turns = site.answer("user_groups")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                         [b"application/json; charset=utf-8"])
        self.assertEqual(body, old_answers(profiles)["user_groups"])
        # Written a bounded chunk per reactor turn, not in one go.
        self.assertGreaterEqual(turns, len(body) // (CHUNK * 2))
        self.assertGreater(turns, 3)

    def test_users_of_a_large_site_is_streamed_with_the_same_bytes(self) -> None:
        profiles = many_profiles(12_000)
        site = Site(self, profiles)
        response, body, turns = site.answer("users")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, old_answers(profiles)["users"])
        self.assertGreater(turns, 1)

    def test_small_answers_end_in_the_first_turn(self) -> None:
        profiles = many_profiles(30)
        site = Site(self, profiles)
        for action in ("users", "user_groups"):
            response, body, turns = site.answer(action)
            self.assertEqual(turns, 0)
            self.assertEqual(body, old_answers(profiles)[action])

    def test_an_empty_site_answers_an_empty_list(self) -> None:
        site = Site(self, [])
        for action in ("users", "user_groups"):
            response, body, turns = site.answer(action)
            self.assertEqual((response.code, body), (200, b"[]"))


class StartupTests(SynchronousTestCase):
    """While the directory's table loads, the lists are read from the database: the
    same bytes, never 200 []; before the groups are read, 503 with Retry-After."""

    def test_lists_are_read_from_the_database_while_the_table_loads(self) -> None:
        profiles = many_profiles(2600)  # several pages of BATCH
        site = Site(self, profiles, hold=True)
        self.assertNoResult(site.loading)
        self.assertTrue(site.directory.answering)
        self.assertFalse(site.directory.loaded)
        expected = old_answers(profiles)
        for action in ("users", "user_groups"):
            response, body, turns = site.answer(action)
            self.assertEqual(response.code, 200, action)
            self.assertEqual(body, expected[action], action)
            # A turn at least per page read from the database.
            pages = -(-sum(1 for p in profiles if p.groups) // BATCH)
            self.assertGreaterEqual(turns, pages, action)
        response, body, _ = site.answer_at("http://127.0.0.1/gs-group-groups.json", "get")
        self.assertEqual(response.code, 200)
        self.assertEqual([g["id"] for g in json.loads(body)], ["example"])
        # A member added while the table loads is listed (the database has it).
        newcomer = Profile("0-new", "New", None, (Email("new@example.com", True, True),))
        self.successResultOf(site.store.create_profile(newcomer))
        self.successResultOf(site.store.add_member("example", newcomer.id))
        _, body, _ = site.answer("users")
        self.assertEqual(json.loads(body)[0], "0-new")
        assert site.store.held is not None
        site.store.held.callback(None)
        self.successResultOf(site.loading)
        self.assertTrue(site.directory.loaded)
        _, from_memory, _ = site.answer("users")
        self.assertEqual(from_memory, body)

    def test_lists_are_503_with_retry_after_until_the_groups_are_read(self) -> None:
        profiles = many_profiles(50)
        site = Site(self, profiles, hold=True, hold_start=True)
        self.assertFalse(site.directory.answering)
        for path, action in ((URL, "users"), (URL, "user_groups"),
                             ("http://127.0.0.1/gs-group-groups.json", "get")):
            response, body, _ = site.answer_at(path, action)
            self.assertEqual(response.code, 503, action)
            self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"5"])
            self.assertTrue(response.headers.getRawHeaders(b"content-type")[0]
                            .startswith(b"application/json"))
            answer = json.loads(body)
            self.assertEqual(answer["status"], 503)
            self.assertIn("starting", answer["message"][0])
        site.release_start()
        self.assertTrue(site.directory.answering)
        response, body, _ = site.answer("users")
        self.assertEqual((response.code, body), (200, old_answers(profiles)["users"]))

    def test_a_database_failure_mid_list_ends_the_answer_short_never_complete(
            self) -> None:
        site = Site(self, many_profiles(1200), hold=True)
        calls = []

        def failing(after: str, limit: int) -> Deferred[list[str]]:
            calls.append(after)
            if len(calls) > 1:
                return fail(Unavailable("the database went away"))
            return MemoryStore.member_ids(site.store, after, limit)

        site.store.member_ids = failing  # type: ignore[method-assign]
        d = site.request("users")
        site.http.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)  # sent before the failure
        content = response.content()
        for _ in range(1000):
            if content.called:
                break
            site.clock.turn()
            site.http.flush()
        # Not a well-formed list: the client sees a cut answer, not a short list.
        got = content.result if not isinstance(content.result, Failure) else b""
        content.addErrback(lambda _: None)
        self.assertFalse(got.endswith(b"]"), got[-20:])
        self.assertEqual(len(calls), 2)


class _Request:
    """Just enough of a twisted.web request to drive a StreamedBody."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer: Any = None
        self.finished: Deferred[None] = Deferred()
        self.unregistered = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.unregistered = True

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def notifyFinish(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.finished.addBoth(lambda r: d.errback(r) if isinstance(r, Failure) else d.callback(r))
        return d


def _pieces(count: int, made: list[int]) -> Any:
    for n in range(count):
        made.append(n)
        yield b"x" * 1000


class StreamedBodyTests(SynchronousTestCase):
    def test_nothing_is_made_while_paused_and_all_of_it_after(self) -> None:
        clock, request, made = TurnClock(), _Request(), []
        body = StreamedBody(request, _pieces(1000, made), clock, chunk=10_000)
        done = body.start()
        self.assertEqual(len(request.written), 1)
        request.producer.pauseProducing()
        for _ in range(20):
            clock.turn()
        self.assertEqual(len(request.written), 1)
        self.assertLessEqual(len(made), 11)
        request.producer.resumeProducing()
        while not done.called:
            clock.turn()
            self.assertLessEqual(len(made) - 10 * len(request.written), 10)
        self.successResultOf(done)
        self.assertEqual(len(b"".join(request.written)), 1000 * 1000)
        self.assertTrue(all(len(w) <= 10_000 for w in request.written))
        self.assertTrue(request.unregistered)

    def test_a_client_going_away_stops_production_quietly(self) -> None:
        clock, request, made = TurnClock(), _Request(), []
        pieces = _pieces(1000, made)
        body = StreamedBody(request, pieces, clock, chunk=10_000)
        done = body.start()
        clock.turn()
        request.finished.errback(Failure(ConnectionError("gone")))
        self.failureResultOf(done, CancelledError)
        before = len(made)
        for _ in range(10):
            clock.turn()
        self.assertEqual(len(made), before)
        self.assertEqual(clock.getDelayedCalls(), [])
        # The generator was closed: nothing is held.
        self.assertRaises(StopIteration, next, pieces)

    def test_stop_producing_from_the_transport_stops_it(self) -> None:
        clock, request, made = TurnClock(), _Request(), []
        done = StreamedBody(request, _pieces(1000, made), clock, chunk=10_000).start()
        request.producer.stopProducing()
        self.assertEqual(clock.getDelayedCalls(), [])
        before = len(made)
        clock.turn()
        self.assertEqual(len(made), before)
        # The handler's wait ends once the request knows the connection is lost.
        self.assertNoResult(done)
        request.finished.errback(Failure(ConnectionError("gone")))
        self.failureResultOf(done, CancelledError)

    def test_cancelling_the_handler_stops_it(self) -> None:
        clock, request, made = TurnClock(), _Request(), []
        done = StreamedBody(request, _pieces(1000, made), clock, chunk=10_000).start()
        done.cancel()
        self.failureResultOf(done, CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_an_error_in_the_pieces_fails_the_body(self) -> None:
        def broken() -> Any:
            yield b"[1"
            raise ValueError("boom")

        clock, request = TurnClock(), _Request()
        done = StreamedBody(request, broken(), clock).start()
        self.failureResultOf(done, ValueError)


class WaitedPieceTests(SynchronousTestCase):
    """A piece that is a Deferred (a page read elsewhere) is waited for, the reactor free."""

    def setUp(self) -> None:
        self.clock, self.request = TurnClock(), _Request()
        self.fetches: list[tuple[str, Deferred[list[str]]]] = []

        def fetch(after: str) -> Deferred[list[str]]:
            d: Deferred[list[str]] = Deferred()
            self.fetches.append((after, d))
            return d

        self.pieces = json_array(paged(fetch, str), json_values, batch=2)
        self.body = StreamedBody(self.request, self.pieces, self.clock)
        self.done = self.body.start()

    def written(self) -> bytes:
        return b"".join(self.request.written)

    def test_pages_are_waited_for_and_written_in_order_until_an_empty_one(self) -> None:
        self.assertEqual([after for after, _ in self.fetches], [""])
        for _ in range(5):
            self.clock.turn()
        self.assertEqual((self.written(), len(self.fetches)), (b"[", 1))
        self.fetches[0][1].callback(["a", "b", "c"])
        self.assertEqual(len(self.fetches), 1)  # the next piece in the next turn
        self.clock.turn()
        self.assertEqual([after for after, _ in self.fetches], ["", "c"])
        self.fetches[1][1].callback(["d"])
        self.clock.turn()
        self.fetches[2][1].callback([])
        self.clock.turn()
        self.successResultOf(self.done)
        self.assertEqual(json.loads(self.written()), ["a", "b", "c", "d"])

    def test_paused_while_waiting_it_goes_on_only_once_resumed(self) -> None:
        self.request.producer.pauseProducing()
        self.fetches[0][1].callback(["a"])
        for _ in range(5):
            self.clock.turn()
        self.assertEqual(len(self.fetches), 1)
        self.request.producer.resumeProducing()
        self.clock.turn()
        self.assertEqual(len(self.fetches), 2)

    def test_a_failed_page_fails_the_body_and_a_client_gone_meanwhile_is_quiet(
            self) -> None:
        self.fetches[0][1].errback(Failure(ValueError("the database went away")))
        self.failureResultOf(self.done, ValueError)
        self.assertFalse(self.written().endswith(b"]"))
        # Another answer: the client goes away while a page is read.
        request = _Request()
        fetched: list[Deferred[list[str]]] = []
        done = StreamedBody(request, json_array(paged(
            lambda after: fetched.append(Deferred()) or fetched[-1], str), json_values),
            self.clock).start()
        request.finished.errback(Failure(ConnectionError("gone")))
        self.failureResultOf(done, CancelledError)
        fetched[0].callback(["late"])  # arrives after: nothing more is done
        self.clock.turn()
        self.assertEqual((len(fetched), self.clock.getDelayedCalls()), (1, []))


class FullCollectionTests(SynchronousTestCase):
    """While a large answer is written, no full garbage collection runs
    (bench/stall measured 80 to 300 ms each at a million profiles); the
    young generations are collected as before."""

    def setUp(self) -> None:
        self.before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *self.before)

    def test_holds_nest_and_release_once_each(self) -> None:
        first = hold_full_collections()
        second = hold_full_collections()
        self.assertEqual(gc.get_threshold(), self.before[:2] + (NEVER,))
        first()
        first()  # a second call of the same release changes nothing
        self.assertEqual(gc.get_threshold()[2], NEVER)
        second()
        self.assertEqual(gc.get_threshold(), self.before)

    def test_pauses_of_every_collection_nest_and_leave_it_as_found(self) -> None:
        from mailhub.steps import pause_collections

        self.addCleanup(gc.enable)
        first = pause_collections()
        second = pause_collections()
        self.assertFalse(gc.isenabled())
        first()
        first()  # a second call of the same release changes nothing
        self.assertFalse(gc.isenabled())
        second()
        self.assertTrue(gc.isenabled())
        # Paused while already off (someone else's choice): still off after.
        gc.disable()
        pause_collections()()
        self.assertFalse(gc.isenabled())

    def test_a_streamed_answer_holds_them_until_it_ends(self) -> None:
        clock, request, made = TurnClock(), _Request(), []
        done = StreamedBody(request, _pieces(100, made), clock, chunk=10_000).start()
        self.assertEqual(gc.get_threshold(), self.before[:2] + (NEVER,))
        while not done.called:
            clock.turn()
        self.successResultOf(done)
        self.assertEqual(gc.get_threshold(), self.before)

    def test_an_answer_cut_short_releases_them(self) -> None:
        clock, request, made = TurnClock(), _Request(), []
        done = StreamedBody(request, _pieces(1000, made), clock, chunk=10_000).start()
        clock.turn()
        request.finished.errback(Failure(ConnectionError("gone")))
        self.failureResultOf(done, CancelledError)
        self.assertEqual(gc.get_threshold(), self.before)


class PieceTests(SynchronousTestCase):
    def test_sorted_in_steps_sorts_like_sorted_with_a_turn_per_run(self) -> None:
        rng = random.Random(3)
        items = [rng.randrange(1000) for _ in range(100)]
        out = list(sorted_in_steps(items, key=lambda i: i, keep=lambda i: i % 5 != 0, run=7))
        turns = [i for i in out if i is TURN]
        self.assertEqual(len(turns), 14)
        self.assertEqual([i for i in out if i is not TURN],
                         sorted((i for i in items if i % 5 != 0)))

    def test_json_array_matches_json_bytes_for_every_batch_size(self) -> None:
        values = ["a", "é\"", "\\", "x" * 3, "✓"]
        for batch in (1, 2, 3, 10):
            for n in range(len(values) + 1):
                pieces = json_array(values[:n], json_values, batch=batch)
                self.assertEqual(b"".join(pieces), json_bytes(values[:n]), (batch, n))


class ReadinessTests(SynchronousTestCase):
    def test_healthz_ready_is_503_until_the_groups_are_read_then_says_the_table_loads(
            self) -> None:
        from mailhub.checks import startup_check
        from mailhub.web.ops import Operations

        site = Site(self, many_profiles(10), hold=True, hold_start=True)
        directory = site.directory
        ops = Operations(Metrics(), [startup_check(lambda: directory.answering, lambda: (
            "" if directory.loaded else "the table is loading"))], lambda: {}, site.clock)
        http = StubTreq(ops.resource())

        def ready() -> tuple[int, Any]:
            site.clock.advance(ops.reuse)
            d = http.get("http://127.0.0.1/healthz?ready")
            http.flush()
            response = self.successResultOf(d)
            return response.code, json.loads(self.successResultOf(response.content()))

        code, body = ready()
        self.assertEqual(code, 503)
        self.assertFalse(body["dependencies"]["startup"]["ok"])
        site.release_start()
        code, body = ready()
        self.assertEqual((code, body["dependencies"]["startup"]),
                         (200, {"ok": True, "detail": "done; the table is loading"}))
        site.release()
        code, body = ready()
        self.assertEqual((code, body["dependencies"]["startup"]),
                         (200, {"ok": True, "detail": "done"}))


class LoadTests(SynchronousTestCase):
    def test_the_directory_is_seen_whole_or_not_at_all(self) -> None:
        profiles = many_profiles(40)
        site = Site(self, profiles, hold=True)
        directory = site.directory
        self.assertNoResult(site.loading)
        self.assertFalse(directory.loaded)
        self.assertEqual(list(directory.walk()), [])
        self.assertIsNone(directory.profile(profiles[7].id))
        assert site.store.held is not None
        site.store.held.callback(None)
        self.successResultOf(site.loading)
        self.assertTrue(directory.loaded)
        self.assertEqual([p.id for batch in directory.walk() for p in batch],
                         sorted(p.id for p in profiles))
        self.assertEqual(directory.profile_by_email("P7@example.com").id,  # type: ignore
                         profiles[7].id)


class ClientGoesAwayTests(TestCase):
    """Over a real socket: a client that hangs up mid-answer stops it, quietly."""

    async def test_a_client_hanging_up_mid_answer_stops_the_stream_without_an_error(
            self) -> None:
        from twisted.internet import reactor
        from twisted.internet.task import deferLater
        from twisted.web.server import Site as WebSite

        profiles = many_profiles(3000)
        site = Site(self, profiles)
        directory = Directory(site.store, reactor)  # type: ignore[arg-type]
        await Deferred.fromCoroutine(directory.load())
        config = Config(mailhub=MailhubSection(site_url=SITE + "/", max_body=1024 * 1024))
        hooks = GroupHooks(directory, config, Metrics(), Hub())
        port = reactor.listenTCP(0, WebSite(hooks.resource()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        body = urlencode({"token": TOKEN, "user_groups": ""}).encode()

        def hang_up() -> bytes:
            import socket
            with socket.create_connection(("127.0.0.1", port.getHost().port)) as s:
                s.sendall(b"POST /gs-site-member-list.json HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: application/x-www-form-urlencoded\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                return s.recv(1024)

        from twisted.internet.threads import deferToThread
        first = await deferToThread(hang_up)
        self.assertTrue(first.startswith(b"HTTP/1.1 200"))
        for _ in range(20):
            await deferLater(reactor, 0.02, lambda: None)
        # Nothing left scheduled (trial fails a dirty reactor) and nothing logged as an error.
        self.assertEqual(self.flushLoggedErrors(), [])
