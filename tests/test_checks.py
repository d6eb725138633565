"""The health checks (:mod:`mailhub.checks`) with fakes and a Clock.

The same checks answer ``/healthz`` and ``mailhub check``; these tests pin
what each one says. The real servers are in tests/test_cli.py (the command)
and tests/test_checks_agree.py (the command and a running server agree).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import attrs
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from mailhub.checks import (
    Check, Row, Status, amqp_check, carddav_check, data_check, database_check, fixed,
    listen_check, make_checks, run_checks, startup_check,
)
from mailhub.collector.carddav import CardDAVClient
from mailhub.config import CardDAVSection, CollectorSection, Config, MailhubSection
from mailhub.directory.sql import MIGRATIONS, SQLStore, dialect_for, run_inline
from mailhub.metrics import Metrics
from mailhub.pubsub.connection import Refusals
from mailhub.web.ops import Operations
from mailhub.web.site import Root


def scratch(test: SynchronousTestCase) -> Path:
    """A temporary folder of the test's own, removed after it."""
    folder = Path(tempfile.mkdtemp(prefix="mailhub-checks-"))
    test.addCleanup(shutil.rmtree, folder, True)
    return folder


def rows_of(test: SynchronousTestCase, check: Check, clock: Clock | None = None) -> list[Row]:
    return test.successResultOf(Deferred.fromCoroutine(check.run(clock or Clock())))


class CheckTests(SynchronousTestCase):
    def test_a_probe_that_does_not_answer_fails_after_the_timeout(self) -> None:
        clock = Clock()
        never: Deferred[Sequence[Row]] = Deferred()

        async def probe() -> Sequence[Row]:
            return await never

        d = Deferred.fromCoroutine(Check("amqp", probe).run(clock, timeout=5))
        self.assertNoResult(d)
        clock.advance(5)
        self.assertEqual(self.successResultOf(d),
                         [Row("amqp", Status.FAIL, "no answer within 5 s")])

    def test_a_probe_that_raises_fails_with_its_message(self) -> None:
        async def probe() -> Sequence[Row]:
            raise RuntimeError("broken\nsecond line")

        self.assertEqual(rows_of(self, Check("x", probe)), [Row("x", Status.FAIL, "broken")])
        # A probe turns what it expects into rows: anything else is logged.
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_not_configured_is_fine(self) -> None:
        check = fixed("ldap", Status.OFF, "not configured")
        rows = rows_of(self, check)
        self.assertTrue(check.healthy(rows))
        self.assertTrue(rows[0].fine)

    def test_a_failover_dependency_serves_while_any_row_is_fine(self) -> None:
        rows = [Row("ldap", Status.OK, "a"), Row("ldap", Status.FAIL, "b")]
        self.assertTrue(Check("ldap", _none, any_serves=True).healthy(rows))
        self.assertFalse(Check("ldap", _none).healthy(rows))
        self.assertFalse(Check("ldap", _none, any_serves=True).healthy(rows[1:]))

    def test_run_checks_keeps_the_order(self) -> None:
        checks = [fixed("b", Status.OK, "1"), fixed("a", Status.FAIL, "2")]
        results = self.successResultOf(Deferred.fromCoroutine(run_checks(checks, Clock())))
        self.assertEqual([(c.name, [r.detail for r in rows]) for c, rows in results],
                         [("b", ["1"]), ("a", ["2"])])


async def _none() -> Sequence[Row]:
    return []


class StartupTests(SynchronousTestCase):
    def test_the_server_is_not_ready_until_its_start_up_work_is_done(self) -> None:
        done: list[bool] = []
        check = startup_check(lambda: bool(done))
        [row] = rows_of(self, check)
        self.assertEqual(row.status, Status.FAIL)
        self.assertIn("migrating the database schema", row.detail)
        done.append(True)
        self.assertEqual(rows_of(self, check), [Row("startup", Status.OK, "done")])

    def test_what_still_goes_on_once_ready_is_said(self) -> None:
        loading = [True]
        check = startup_check(lambda: True, lambda: "table loading" if loading else "")
        self.assertEqual(rows_of(self, check),
                         [Row("startup", Status.OK, "done; table loading")])
        loading.clear()
        self.assertEqual(rows_of(self, check), [Row("startup", Status.OK, "done")])


class ListenAndDataTests(SynchronousTestCase):
    def test_listen_must_be_an_endpoint_string(self) -> None:
        self.assertEqual(rows_of(self, listen_check(Clock(), "tcp:8080")),
                         [Row("listen", Status.OK, "tcp:8080")])
        [row] = rows_of(self, listen_check(Clock(), "tcp:notaport"))
        self.assertEqual(row.status, Status.FAIL)
        self.assertIn("'tcp:notaport'", row.detail)

    def test_a_data_folder_that_can_be_made_is_fine(self) -> None:
        folder = scratch(self) / "data"
        config = Config(mailhub=MailhubSection(data=str(folder)))
        self.assertEqual(rows_of(self, data_check(config)), [
            Row("data", Status.OK, "%s (made on first start)" % folder.absolute())])

    def test_a_data_folder_under_a_file_fails(self) -> None:
        base = scratch(self)
        (base / "file").write_text("x")
        config = Config(mailhub=MailhubSection(data=str(base / "file" / "data")))
        self.assertEqual(rows_of(self, data_check(config)), [
            Row("data", Status.FAIL, "%s is not a folder" % (base / "file").absolute())])

    def test_a_data_folder_that_is_not_writable_fails(self) -> None:
        if os.geteuid() == 0:
            # root writes anywhere; the check asks os.access, which says so.
            self.assertTrue(os.access("/", os.W_OK))
            return
        folder = scratch(self) / "locked"
        folder.mkdir(mode=0o500)
        config = Config(mailhub=MailhubSection(data=str(folder / "data")))
        [row] = rows_of(self, data_check(config))
        self.assertEqual(row.status, Status.FAIL)
        self.assertIn("not writable", row.detail)


class FakeDatabase:
    """What database_check uses of a StoreService: its dialect and store (run inline)."""

    def __init__(self, dsn: str) -> None:
        self.dialect = dialect_for(dsn)
        self.store = SQLStore(self.dialect, runner=run_inline)


class DatabaseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = scratch(self)
        self.database = FakeDatabase("sqlite:///%s" % (self.folder / "db.sqlite"))
        self.addCleanup(self.database.store.close_all)

    def test_a_missing_sqlite_file_is_fine_and_is_not_made(self) -> None:
        self.assertEqual(rows_of(self, database_check(self.database)), [  # type: ignore[arg-type]
            Row("database", Status.OK, "sqlite: not created yet (made on first start)")])
        self.assertFalse((self.folder / "db.sqlite").exists())

    def test_the_schema_version_is_read(self) -> None:
        self.successResultOf(self.database.store.migrate())
        newest = len(MIGRATIONS)
        self.assertEqual(rows_of(self, database_check(self.database)), [  # type: ignore[arg-type]
            Row("database", Status.OK, "sqlite: schema version %d of %d" % (newest, newest))])

    def test_an_empty_database_is_migrated_on_next_start(self) -> None:
        (self.folder / "db.sqlite").touch()
        self.assertEqual(rows_of(self, database_check(self.database)), [  # type: ignore[arg-type]
            Row("database", Status.OK,
                "sqlite: schema version 0 of %d (migrated on next start)" % len(MIGRATIONS))])

    def test_a_newer_schema_fails(self) -> None:
        self.successResultOf(self.database.store.migrate())
        self.successResultOf(self.database.store._write(
            lambda tx: tx.execute("UPDATE schema_version SET version = 99")))
        [row] = rows_of(self, database_check(self.database))  # type: ignore[arg-type]
        self.assertEqual(row.status, Status.FAIL)
        self.assertIn("schema version 99 is newer", row.detail)

    def test_a_file_that_is_not_a_database_fails(self) -> None:
        (self.folder / "db.sqlite").write_bytes(b"not SQLite at all" * 100)
        [row] = rows_of(self, database_check(self.database))  # type: ignore[arg-type]
        self.assertEqual(row.status, Status.FAIL)
        self.assertTrue(row.detail.startswith("sqlite: "), row.detail)


@attrs.define
class FakeAddress:
    host: str = "broker.example"
    port: int = 5672
    vhost: str = "/"
    username: str = "mailhub"


@attrs.define
class FakeBroker:
    """What amqp_check uses of the Broker: settled(), connected, last_error, refusals."""

    settling: Deferred[None] = attrs.Factory(Deferred)
    connected: bool = False
    last_error: str | None = None
    address: FakeAddress = attrs.Factory(FakeAddress)
    refusals: Refusals = attrs.Factory(Refusals)
    outbox: Any = None

    def settled(self) -> Deferred[None]:
        return self.settling


@attrs.define
class FakePubSub:
    broker: FakeBroker | None


class AMQPTests(SynchronousTestCase):
    def test_without_a_broker_it_is_not_configured(self) -> None:
        self.assertEqual(rows_of(self, amqp_check(FakePubSub(None))),  # type: ignore[arg-type]
                         [Row("amqp", Status.OFF, "not configured: local pubsub only")])

    def test_it_waits_for_the_connection_attempt_then_says_why_it_failed(self) -> None:
        broker = FakeBroker()
        d = Deferred.fromCoroutine(amqp_check(FakePubSub(broker)).run(Clock()))  # type: ignore[arg-type]
        self.assertNoResult(d)
        broker.last_error = "broker.example:5672 refused the channel set-up: 406 PRECONDITION_FAILED"
        broker.settling.callback(None)
        self.assertEqual(self.successResultOf(d), [Row("amqp", Status.FAIL, broker.last_error)])

    def test_a_set_up_connection_is_ok(self) -> None:
        broker = FakeBroker(settling=succeed(None), connected=True)
        self.assertEqual(rows_of(self, amqp_check(FakePubSub(broker))), [  # type: ignore[arg-type]
            Row("amqp", Status.OK, "broker.example:5672, virtual host /, logged in as mailhub")])

    def test_a_refused_declaration_fails_with_its_name_and_the_brokers_reason(self) -> None:
        broker = FakeBroker(settling=succeed(None), connected=True)
        broker.refusals.refused("queue 'collector:email'", "406 PRECONDITION_FAILED - x")
        self.assertEqual(rows_of(self, amqp_check(FakePubSub(broker))), [  # type: ignore[arg-type]
            Row("amqp", Status.FAIL, "broker.example:5672: the broker refused queue "
                "'collector:email': 406 PRECONDITION_FAILED - x")])

    def test_no_answer_in_time_fails(self) -> None:
        clock = Clock()
        d = Deferred.fromCoroutine(amqp_check(FakePubSub(FakeBroker())).run(clock))  # type: ignore[arg-type]
        clock.advance(5)
        self.assertEqual(self.successResultOf(d),
                         [Row("amqp", Status.FAIL, "no answer within 5 s")])


class DAV(Resource):
    """A CardDAV server that answers PROPFIND with ``code``."""

    isLeaf = True

    def __init__(self, code: int) -> None:
        super().__init__()
        self.code = code
        self.seen: list[tuple[bytes, bytes | None, bytes | None]] = []

    def render(self, request: Any) -> bytes:
        self.seen.append((request.method, request.getHeader(b"depth"),
                          request.getHeader(b"authorization")))
        request.setResponseCode(self.code)
        return b"<multistatus xmlns='DAV:'/>"


class Refusing:
    def request(self, method: str, url: str, **kw: Any) -> Deferred[Any]:
        return fail(ConnectionRefusedError("nope"))


def external(username: str = "svc", enabled: bool = True) -> Config:
    return Config(carddav=CardDAVSection(url="http://dav.example/", username=username,
                                         password="dav-secret"),
                  collector=CollectorSection(enabled=enabled))


class CardDAVTests(SynchronousTestCase):
    def client(self, http: Any) -> CardDAVClient:
        return CardDAVClient(http, Clock(), credentials=("svc", "dav-secret"))

    def test_a_multistatus_answer_is_ok(self) -> None:
        dav = DAV(207)
        rows = rows_of(self, carddav_check(external(), self.client(StubTreq(dav)), False))
        self.assertEqual(rows, [Row("carddav", Status.OK,
                                    "http://dav.example/ answered PROPFIND with 207")])
        [(method, depth, authorization)] = dav.seen
        self.assertEqual((method, depth), (b"PROPFIND", b"0"))
        self.assertTrue(authorization and authorization.startswith(b"Basic "))

    def test_refused_credentials_fail_without_the_password(self) -> None:
        rows = rows_of(self, carddav_check(external(), self.client(StubTreq(DAV(401))), False))
        self.assertEqual(rows, [Row("carddav", Status.FAIL, "http://dav.example/ refused svc (401)")])

    def test_an_unreachable_server_fails(self) -> None:
        [row] = rows_of(self, carddav_check(external(), self.client(Refusing()), False))
        self.assertEqual(row.status, Status.FAIL)
        self.assertTrue(row.detail.startswith("http://dav.example/: cannot connect: "), row.detail)

    def test_embedded_is_ok_and_a_disabled_collector_uses_none(self) -> None:
        [row] = rows_of(self, carddav_check(Config(), None, True))
        self.assertEqual(row.status, Status.OK)
        self.assertTrue(row.detail.startswith("embedded, served at /dav/"))
        [row] = rows_of(self, carddav_check(external(enabled=False), None, False))
        self.assertEqual(row, Row("carddav", Status.OFF, "not used: [collector] enabled = no"))


class MakeChecksTests(SynchronousTestCase):
    def test_every_check_in_the_order_the_command_prints(self) -> None:
        checks = make_checks(Config(), Clock(), listen="tcp:8080",
                             database=FakeDatabase("sqlite:///:memory:"),  # type: ignore[arg-type]
                             pubsub=FakePubSub(None), ldap=None,  # type: ignore[arg-type]
                             carddav=None, embedded_dav=True)
        self.assertEqual([c.name for c in checks],
                         ["listen", "data", "database", "amqp", "carddav", "ldap"])
        self.assertEqual(rows_of(self, checks[-1]),
                         [Row("ldap", Status.OFF, "not configured: site users only")])

    def test_a_part_that_could_not_be_built_fails_with_why(self) -> None:
        config = Config()
        checks = make_checks(config, Clock(), listen="tcp:8080", database=None, pubsub=None,
                             ldap=None, carddav=None, embedded_dav=True,
                             unusable={"database": Row("database", Status.FAIL, "bad DSN"),
                                       "amqp": Row("amqp", Status.FAIL, "[amqp] url: bad port")})
        found = {c.name: rows_of(self, c) for c in checks}
        self.assertEqual(found["database"], [Row("database", Status.FAIL, "bad DSN")])
        self.assertEqual(found["amqp"], [Row("amqp", Status.FAIL, "[amqp] url: bad port")])


class HealthzTests(SynchronousTestCase):
    """/healthz shows each check as one dependency."""

    def healthz(self, checks: list[Check], clock: Clock | None = None,
                path: str = "/healthz") -> Deferred[tuple[int, dict[str, Any]]]:
        clock = clock or Clock()
        metrics = Metrics()
        ops = Operations(metrics, checks, lambda: {}, clock)
        root = Root(metrics, {b"healthz": ops.resource()})
        self.stub: Any = StubTreq(root)  # its verbs are made at run time

        async def get() -> tuple[int, dict[str, Any]]:
            response = await self.stub.get("http://h" + path)
            return response.code, json.loads(await response.content())
        return Deferred.fromCoroutine(get())

    def test_ldap_with_one_server_down_is_up_and_says_which(self) -> None:
        async def probe() -> Sequence[Row]:
            return [Row("ldap", Status.OK, "ldap://a: bound as anonymous"),
                    Row("ldap", Status.FAIL, "ldap://b: refused")]

        code, body = self.successResultOf(self.healthz([Check("ldap", probe, any_serves=True)],
                                                       path="/healthz?ready"))
        self.assertEqual(code, 200)
        self.assertEqual(body["dependencies"]["ldap"], {
            "ok": True, "detail": "ldap://a: bound as anonymous; ldap://b: refused"})

    def test_a_check_that_hangs_answers_503_ready_after_the_timeout(self) -> None:
        clock = Clock()
        never: Deferred[Sequence[Row]] = Deferred()

        async def probe() -> Sequence[Row]:
            return await never

        d = self.healthz([Check("amqp", probe), fixed("database", Status.OK, "sqlite")],
                         clock, "/healthz?ready")
        self.assertNoResult(d)
        clock.advance(5)
        self.stub.flush()
        code, body = self.successResultOf(d)
        self.assertEqual(code, 503)
        self.assertEqual(body["status"], "degraded")
        self.assertEqual(body["dependencies"]["amqp"],
                         {"ok": False, "detail": "no answer within 5 s"})
        self.assertEqual(body["dependencies"]["database"], {"ok": True, "detail": "sqlite"})

    def test_requests_share_a_run_and_its_results_serve_for_a_second(self) -> None:
        clock = Clock()
        calls: list[Deferred[Sequence[Row]]] = []

        async def probe() -> Sequence[Row]:
            d: Deferred[Sequence[Row]] = Deferred()
            calls.append(d)
            return await d

        metrics = Metrics()
        ops = Operations(metrics, [Check("database", probe)], lambda: {}, clock)
        stub: Any = StubTreq(Root(metrics, {b"healthz": ops.resource()}))

        def get() -> Deferred[Any]:
            return stub.get("http://h/healthz")

        first, second = get(), get()
        self.assertEqual(len(calls), 1)  # the second request waits for the same run
        calls[0].callback([Row("database", Status.OK, "sqlite: schema version 1 of 1")])
        stub.flush()
        for d in (first, second):
            body = json.loads(self.successResultOf(self.successResultOf(d).content()))
            self.assertEqual(body["dependencies"]["database"],
                             {"ok": True, "detail": "sqlite: schema version 1 of 1"})
        clock.advance(0.5)
        self.successResultOf(get())
        self.assertEqual(len(calls), 1)  # fresh results answer
        clock.advance(0.5)
        third = get()
        self.assertEqual(len(calls), 2)  # a second later, the checks run again
        calls[1].callback([Row("database", Status.FAIL, "sqlite: database is locked")])
        stub.flush()
        body = json.loads(self.successResultOf(self.successResultOf(third).content()))
        self.assertEqual(body["dependencies"]["database"],
                         {"ok": False, "detail": "sqlite: database is locked"})


class OutboxOnHealthzTests(SynchronousTestCase):
    """``/healthz`` shows the AMQP outbox's length and bound (doc/pubsub.rst)."""

    def healthz(self, checks: list[Check]) -> dict[str, Any]:
        metrics = Metrics()
        ops = Operations(metrics, checks, lambda: {}, Clock())
        stub: Any = StubTreq(Root(metrics, {b"healthz": ops.resource()}))

        async def get() -> dict[str, Any]:
            response = await stub.get("http://h/healthz")
            return json.loads(await response.content())  # type: ignore[no-any-return]
        return self.successResultOf(Deferred.fromCoroutine(get()))

    def test_the_amqp_entry_counts_what_waits_in_the_outbox(self) -> None:
        from mailhub.pubsub.outbox import Outbox, Route

        broker = FakeBroker(settling=succeed(None))
        broker.last_error = "broker.example:5672: cannot connect"
        outbox = Outbox(3)
        broker.outbox = outbox
        waiting = [outbox.put(Route("member:added"), b"{}", {}) for _ in range(2)]
        body = self.healthz([amqp_check(FakePubSub(broker))])  # type: ignore[arg-type]
        self.assertEqual(body["dependencies"]["amqp"], {
            "ok": False, "detail": "broker.example:5672: cannot connect",
            "outbox": 2, "outbox_limit": 3})
        outbox.fail_all("test over")
        for d in waiting:
            self.failureResultOf(d)

    def test_without_a_broker_there_is_no_outbox(self) -> None:
        body = self.healthz([amqp_check(FakePubSub(None))])  # type: ignore[arg-type]
        self.assertEqual(body["dependencies"]["amqp"], {
            "ok": True, "detail": "not configured: local pubsub only"})
