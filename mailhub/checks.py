"""The health checks: built once, from the objects the server itself uses.

:func:`make_checks` turns the configuration and the server's own parts (the
database's :class:`~mailhub.directory.sql.StoreService`, the
:class:`~mailhub.pubsub.wiring.PubSub` and its AMQP ``Broker``, the
:class:`~mailhub.directory.ldap.LDAPService`, the collector's
:class:`~mailhub.collector.carddav.CardDAVClient` or the embedded DAV
server) into a list of :class:`Check`. ``twistd mailhub`` (:mod:`mailhub.tap`)
hands that list to ``/healthz`` (:mod:`mailhub.web.ops`); ``mailhub check``
(:mod:`mailhub.cli.check`) builds the same parts from the same configuration,
starts them, runs the same list once under ``task.react`` and prints it as a
table. So the two cannot disagree: what ``mailhub check`` says about the
broker is what the server's own AMQP connection met.

A check answers one or more :class:`Row` (LDAP has one per server); a check
that fails or takes longer than its timeout answers one ``FAIL`` row saying
so. Checks change nothing, with one exception: the AMQP check connects as
the server does, and so declares the exchanges and queues the server
declares (idempotent: a declaration that differs from the broker's is
exactly what it reports).
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Sequence

import attrs
import treq
from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool

from mailhub.collector.carddav import CardDAVClient
from mailhub.config import Config, redact
from mailhub.directory.ldap import LDAPFailure, LDAPService
from mailhub.directory.sql import MIGRATIONS, SQLiteDialect, StoreService
from mailhub.endpoints import server_endpoint
from mailhub.errors import Unavailable
from mailhub.metrics import Metrics
from mailhub.pubsub.wiring import PubSub

#: Seconds a check may take before it counts as failed.
TIMEOUT = 5.0


class Status(enum.Enum):
    """A row's verdict, as ``mailhub check`` prints it."""

    OK = "OK"
    FAIL = "FAIL"
    OFF = "-"  # not configured, which is fine


@attrs.frozen
class Row:
    """One finding: what was checked, its status, and why."""

    what: str
    status: Status
    detail: str

    @property
    def fine(self) -> bool:
        """Whether this row lets the site work (anything but FAIL)."""
        return self.status is not Status.FAIL


Probe = Callable[[], Awaitable[Sequence[Row]]]


@attrs.frozen
class Check:
    """A named dependency check: ``probe`` finds its rows.

    ``any_serves``: the dependency works while any row is fine (LDAP fails
    over between its servers), instead of all of them; ``mailhub check``
    still exits 1 on any FAIL, ``/healthz`` reports the dependency up.
    """

    name: str
    probe: Probe
    any_serves: bool = False
    #: Figures ``/healthz`` shows beside the dependency's state, read when it
    #: answers (not from the probe's run): e.g. the AMQP outbox's length.
    figures: Callable[[], Mapping[str, int]] | None = None

    log = Logger()

    async def run(self, clock: IReactorTime, timeout: float = TIMEOUT) -> list[Row]:
        """The probe's rows; one FAIL row when it fails or takes over ``timeout`` seconds."""
        d = Deferred.fromCoroutine(_rows(self.probe))
        d.addTimeout(timeout, clock)
        try:
            return await d
        except DeferredTimeout:
            return [Row(self.name, Status.FAIL, "no answer within %g s" % timeout)]
        except Exception as e:
            # The probes turn what they expect into rows: this is a bug.
            self.log.failure("the {name} health check failed", name=self.name)
            return [Row(self.name, Status.FAIL, first_line(e))]

    def healthy(self, rows: Sequence[Row]) -> bool:
        """Whether the dependency works, judged from its rows."""
        if self.any_serves:
            return any(r.fine for r in rows)
        return all(r.fine for r in rows)


async def _rows(probe: Probe) -> list[Row]:
    return list(await probe())


def first_line(error: BaseException) -> str:
    """An exception's message, first line only (its type name when empty)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def fixed(name: str, status: Status, detail: str) -> Check:
    """A check whose answer is known when it is built (not configured, unusable config)."""
    async def probe() -> Sequence[Row]:
        return [Row(name, status, detail)]
    return Check(name, probe)


# -- the checks -------------------------------------------------------------------


def startup_check(started: Callable[[], bool],
                  note: Callable[[], str] = lambda: "") -> Check:
    """The server's start-up work (schema migration, the directory's groups
    and tokens) is done; ``note`` says what still goes on once it is.

    Only the server has it: twistd listens, and answers ``/healthz``, before
    that work ends, and a load balancer should wait for it.
    """
    async def probe() -> Sequence[Row]:
        if started():
            still = note()
            return [Row("startup", Status.OK, "done; " + still if still else "done")]
        return [Row("startup", Status.FAIL,
                    "under way: migrating the database schema, reading the directory")]
    return Check("startup", probe)


def listen_check(reactor: Any, listen: str, name: str = "listen") -> Check:
    """The listen address is a Twisted server endpoint string (nothing is opened)."""
    async def probe() -> Sequence[Row]:
        if listen.lower().startswith("systemd:"):
            # The socket exists only in the server's own process (systemd
            # passes it to ExecStart=, not to mailhub check before it).
            return [Row("listen", Status.OK, "%s (a socket systemd passes at start)" % listen)]
        try:
            server_endpoint(reactor, listen)
        except Exception as e:
            return [Row(name, Status.FAIL, "%r: %s" % (listen, first_line(e)))]
        return [Row(name, Status.OK, listen)]
    return Check(name, probe)


def unusable_folder(path: Path) -> str | None:
    """Why ``path`` (a folder) cannot be used, or None when it exists or can be made."""
    probe = path.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return "%s is not a folder" % probe
    if not os.access(probe, os.W_OK | os.X_OK):
        return "%s is not writable" % probe
    return None


def data_check(config: Config) -> Check:
    """The data folder (SQLite, embedded CardDAV, spools) exists and is writable, or can be made."""
    async def probe() -> Sequence[Row]:
        problem = unusable_folder(config.data_dir)
        if problem:
            return [Row("data", Status.FAIL, problem)]
        state = "" if config.data_dir.exists() else " (made on first start)"
        return [Row("data", Status.OK, str(config.data_dir.absolute()) + state)]
    return Check("data", probe)


def database_check(database: StoreService) -> Check:
    """Connect with the server's store and read the schema version, changing nothing."""
    dialect = database.dialect
    name = dialect.name

    async def probe() -> Sequence[Row]:
        if isinstance(dialect, SQLiteDialect) and dialect.path != ":memory:":
            path = Path(dialect.path)
            if not path.exists():
                problem = unusable_folder(path.parent)
                if problem:
                    return [Row("database", Status.FAIL, "%s: %s" % (name, problem))]
                return [Row("database", Status.OK,
                            "%s: not created yet (made on first start)" % name)]
        try:
            version = await database.store.schema_version()
        except Unavailable as e:
            return [Row("database", Status.FAIL, "%s: cannot connect: %s" % (name, e))]
        except Exception as e:  # reached, but not usable: not a database, no rights
            return [Row("database", Status.FAIL, "%s: %s" % (name, first_line(e)))]
        newest = len(MIGRATIONS)
        if version > newest:
            return [Row("database", Status.FAIL, "%s: schema version %d is newer than "
                        "this mailhub's %d" % (name, version, newest))]
        later = "" if version == newest else " (migrated on next start)"
        return [Row("database", Status.OK,
                    "%s: schema version %d of %d%s" % (name, version, newest, later))]
    return Check("database", probe)


def amqp_check(pubsub: PubSub) -> Check:
    """The server's own AMQP connection: connected and its channels set up.

    Waits (bounded by the check's timeout) for the connection attempt under
    way to end, then says what it met: the login or the virtual host
    refused, a declaration refused, or no connection at all.
    """
    async def probe() -> Sequence[Row]:
        broker = pubsub.broker
        if broker is None:
            return [Row("amqp", Status.OFF, "not configured: local pubsub only")]
        await broker.settled()
        address = broker.address
        if broker.connected and broker.refusals.current:
            # Connected, but what depends on a refused declaration is down.
            return [Row("amqp", Status.FAIL, "%s:%d: %s" % (
                address.host, address.port, broker.refusals.describe()))]
        if broker.connected:
            return [Row("amqp", Status.OK, "%s:%d, virtual host %s, logged in as %s"
                        % (address.host, address.port, address.vhost, address.username))]
        return [Row("amqp", Status.FAIL, broker.last_error or "not connected")]

    def figures() -> Mapping[str, int]:
        # Publications waiting to be sent or confirmed: what grows while the
        # broker is away (doc/pubsub.rst), and its bound, [amqp] outbox.
        broker = pubsub.broker
        if broker is None:
            return {}
        return {"outbox": len(broker.outbox), "outbox_limit": broker.outbox.limit}
    return Check("amqp", probe, figures=figures)


def amqp_spec_check(config: Config) -> Check:
    """``[amqp] spec`` is the AMQP 0-9-1 specification the connection loaded.

    The broker's connection cannot be built without it, so a running
    server has it; ``mailhub check`` reports a file that does not load
    through ``unusable`` (see :func:`make_checks`).
    """
    return fixed("amqp spec", Status.OK, config.amqp.spec)


#: What ``carddav`` asks an external server: its resource type, Depth 0.
PROPFIND = (b'<?xml version="1.0" encoding="utf-8"?>\n'
            b'<propfind xmlns="DAV:"><prop><resourcetype/></prop></propfind>')


def carddav_check(config: Config, carddav: CardDAVClient | None, embedded: bool) -> Check:
    """Embedded: served by this process. External: the collector's own client
    sends a ``PROPFIND`` to ``[carddav] url`` with its credentials."""
    if not config.collector.enabled:
        return fixed("carddav", Status.OFF, "not used: [collector] enabled = no")
    if embedded or carddav is None:
        return fixed("carddav", Status.OK, "embedded, served at /dav/, stored under %s"
                     % config.data_dir.absolute())
    client = carddav
    url = config.carddav.url
    shown = redact(url)

    async def probe() -> Sequence[Row]:
        try:
            answer = await client.request(
                "PROPFIND", url, {b"content-type": b"application/xml; charset=utf-8"},
                PROPFIND, depth="0")
        except Unavailable as e:
            reason = str(e).partition("): ")[2] or str(e)
            return [Row("carddav", Status.FAIL, "%s: cannot connect: %s" % (shown, reason))]
        if 200 <= answer.code < 300:
            return [Row("carddav", Status.OK, "%s answered PROPFIND with %d"
                        % (shown, answer.code))]
        if answer.code in (401, 403):
            who = config.carddav.username or "no credentials"
            return [Row("carddav", Status.FAIL, "%s refused %s (%d)" % (shown, who, answer.code))]
        return [Row("carddav", Status.FAIL, "%s answered PROPFIND with %d" % (shown, answer.code))]
    return Check("carddav", probe)


def carddav_for_checks(config: Config, reactor: Any,
                       ) -> tuple[CardDAVClient | None, Callable[[], Any]]:
    """The collector's CardDAV client as the carddav check uses it, and how
    to close its connections; None when there is no external server to ask.

    Built as the collector builds its own (same class, URL, credentials),
    with a connection pool of its own and its own metrics, so that health
    probes neither hold the collector's connections nor count in its latency.
    """
    if not config.collector.enabled or config.embedded_carddav:
        return None, lambda: None
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = CardDAVClient(
        treq.client.HTTPClient(Agent(reactor, pool=pool)), reactor,
        credentials=(config.carddav.username, config.carddav.password),
        timeout=min(config.carddav.timeout, TIMEOUT), concurrency=1, metrics=Metrics())
    return client, pool.closeCachedConnections


def ldap_check(reactor: Any, ldap: LDAPService | None) -> Check:
    """Each LDAP server accepts the service account's bind and has the base DN.

    One row per server; the dependency works while any server does.
    """
    if ldap is None:
        return fixed("ldap", Status.OFF, "not configured: site users only")
    service = ldap

    async def one(url: str) -> Row:
        try:
            detail = await deferToThreadPool(reactor, service.pool,
                                             service.client.check_server, url)
        except LDAPFailure as e:
            return Row("ldap", Status.FAIL, str(e))
        return Row("ldap", Status.OK, detail)

    async def probe() -> Sequence[Row]:
        # At once, so that servers that do not answer share one timeout.
        asking = [Deferred.fromCoroutine(one(url)) for url in service.client.settings.urls]
        return [await d for d in asking]
    return Check("ldap", probe, any_serves=True)


def make_checks(config: Config, reactor: Any, *, listen: str, database: StoreService | None,
                pubsub: PubSub | None, ldap: LDAPService | None,
                carddav: CardDAVClient | None, embedded_dav: bool,
                unusable: Mapping[str, Row] | None = None) -> list[Check]:
    """Every check of a mailhub process, in the order ``mailhub check`` prints them.

    ``unusable`` gives the answer of the checks whose part could not even
    be built (only ``mailhub check`` meets that: the server stops at
    start-up instead), by name; their part is None then.
    """
    known = dict(unusable or {})
    missing = Row("", Status.FAIL, "not built")
    checks: list[Check] = [listen_check(reactor, listen)]
    if config.mailhub.ops_listen:
        checks.append(listen_check(reactor, config.mailhub.ops_listen, "ops listen"))
    checks.append(data_check(config))
    checks.append(database_check(database) if database is not None else
                  fixed("database", Status.FAIL, known.get("database", missing).detail))
    checks.append(amqp_check(pubsub) if pubsub is not None else
                  fixed("amqp", Status.FAIL, known.get("amqp", missing).detail))
    if config.amqp.url:
        checks.append(amqp_spec_check(config))
    checks += [carddav_check(config, carddav, embedded_dav), ldap_check(reactor, ldap)]
    return [fixed(c.name, known[c.name].status, known[c.name].detail) if c.name in known else c
            for c in checks]


async def run_checks(checks: Sequence[Check], clock: IReactorTime,
                     timeout: float = TIMEOUT) -> list[tuple[Check, list[Row]]]:
    """Run every check at once; each with its rows, in the given order."""
    running = [Deferred.fromCoroutine(check.run(clock, timeout)) for check in checks]
    return [(check, await d) for check, d in zip(checks, running)]
