"""``twistd mailhub``: the command-line options and the wiring of the services.

makeService only wires parts together; each part is built and tested on its
own. A configuration that cannot be used stops start-up with one line that
names the file, the section and the key.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import treq
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from mailhub import __version__
from mailhub.auth import Auth, SiteToken
from mailhub.checks import carddav_for_checks, make_checks, startup_check
from mailhub.collector.carddav import BookLayout, CardDAVClient
from mailhub.collector.embedded import EmbeddedDAV
from mailhub.collector.engine import CollectorEngine
from mailhub.collector.retention import Retention, RetentionService
from mailhub.collector.rules import esn_ids_of, exclusions_of
from mailhub.collector.state import CollectorState
from mailhub.collector.sources import CalendarSource, MailSource
from mailhub.config import Config, discover
from mailhub.directory import snapshot
from mailhub.directory.build import in_child
from mailhub.directory.service import Directory
from mailhub.directory.ldap import LDAPService
from mailhub.directory.listen import ChangeListener
from mailhub.directory.sql import PostgreSQLDialect, SQLiteDialect, StoreService
from mailhub.directory.users import ChainedUserSource, HashingService, SiteUserSource
from mailhub.endpoints import server_endpoint
from mailhub.errors import ConfigError
from mailhub.logs import startup_summary
from mailhub.metrics import Metrics
from mailhub.pubsub.deadletters import dead_letter_watch
from mailhub.pubsub.interfaces import IWorkQueue
from mailhub.pubsub.wiring import PubSub, Resume, make_pubsub
from mailhub.service import AfterReady, InOrder, Listening, StartupLog
from mailhub.shared_throttle import ThrottleSync
from mailhub.web.calendar import CalendarCollect
from mailhub.web.hooks import GroupHooks, hook_error_body
from mailhub.web.mailstore import MailStoreIntegration
from mailhub.web.openapi import site_document
from mailhub.web.ops import OPS_ONLY, Operations, ops_credentials
from mailhub.web.events import EventStream
from mailhub.web.push import PushReceiver
from mailhub.web.site import MailhubSite, Root

#: Connections the operations listener (``[mailhub] ops_listen``) holds at
#: once: a few scrapers and probes, never the site's traffic.
OPS_CONNECTIONS = 64


class Options(usage.Options):
    """Options of ``twistd mailhub``."""

    synopsis = "[--config FILE] [--listen ENDPOINT]"
    longdesc = ("mailhub: contact collector, GroupServer web hooks, ESN pubsub, "
                "Dovecot push receiver and MailStore integration in one process.")
    optParameters = [
        ["config", "c", None, "INI configuration file (default: $MAILHUB_CONFIG, else "
                              "/etc/mailhub/mailhub.ini if it exists, else built-in defaults)."],
        ["listen", "l", None, "Twisted endpoint to listen on; overrides [mailhub] listen."],
    ]

    def opt_version(self) -> None:
        """Print mailhub's version and exit."""
        print("mailhub", __version__)
        sys.exit(0)


def load_config(options: usage.Options) -> Config:
    """The Config that the options name, or SystemExit with one clear line."""
    try:
        return discover(options["config"])
    except ConfigError as e:
        raise SystemExit("mailhub: configuration error: %s" % e)


def makeService(options: usage.Options) -> IService:
    """Build mailhub's services from the options."""
    from twisted.internet import reactor

    config = load_config(options)
    listen = options["listen"] or config.mailhub.listen
    source = "--listen" if options["listen"] else "[mailhub] listen"
    try:
        return build(config, listen, reactor, listen_source=source)
    except (ConfigError, ValueError) as e:
        message = str(e)
        # A key of the file is named with the file; --listen is not in it.
        if config.path and not message.startswith((config.path, "--")):
            message = "%s: %s" % (config.path, message)
        raise SystemExit("mailhub: configuration error: %s" % message)


class OnStop(Service):
    """Calls each function at shutdown (flush queues, end streams); the stop
    waits for those that return a Deferred, and one that fails is logged."""

    log = Logger()

    def __init__(self, *calls: Callable[[], Any]) -> None:
        self.calls = calls

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        waits = []
        for call in self.calls:
            d = maybeDeferred(call)
            d.addErrback(self._failed, call)
            waits.append(d)
        return DeferredList(waits)

    def _failed(self, failure: Failure, call: Callable[[], Any]) -> None:
        self.log.failure("{call!r} failed at shutdown", failure, call=call)


def listen_endpoint(reactor: Any, listen: str, source: str = "[mailhub] listen") -> Any:
    """The server endpoint that ``listen`` describes, or ConfigError naming ``source``.

    Parsing an endpoint string may read files (an ``ssl:`` endpoint's key and
    certificate), so their errors are the setting's errors too.
    """
    try:
        return server_endpoint(reactor, listen)
    except OSError as e:
        why = "%s: %s" % (e.strerror, e.filename) if e.filename else (e.strerror or str(e))
        raise ConfigError("%s: bad value %r: %s" % (source, listen, why))
    except Exception as e:  # ValueError, KeyError, TypeError, OpenSSL's errors...
        raise ConfigError("%s: bad value %r: %s" % (source, listen, str(e) or type(e).__name__))


def data_folder(config: Config) -> None:
    """Make ``[mailhub] data`` (and its parents), or ConfigError naming the key."""
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError("[mailhub] data: bad value: %s is a file, not a folder"
                          % config.data_dir)
    except OSError as e:
        raise ConfigError("[mailhub] data: bad value: cannot make the folder %s: %s"
                          % (config.data_dir, e.strerror))


def build(config: Config, listen: str, reactor: Any,
          listen_source: str = "[mailhub] listen") -> MultiService:
    """Wire every part for ``config``, listening on ``listen``."""
    endpoint = listen_endpoint(reactor, listen, listen_source)
    ops_listen = config.mailhub.ops_listen
    ops_endpoint = (listen_endpoint(reactor, ops_listen, "[mailhub] ops_listen")
                    if ops_listen else None)
    data_folder(config)
    # Stopped in reverse: the web site and its surfaces first, then the
    # broker (which drains its consumers), then the thread pools they used.
    top = InOrder()
    StartupLog(startup_summary(config, listen)).setServiceParent(top)
    pools = MultiService()
    pools.setServiceParent(top)
    metrics = Metrics()
    pubsub = make_pubsub(config, reactor, metrics)
    hub = pubsub.hub

    database = StoreService(config.dsn, config.mailhub.site_id, reactor,
                            threads=config.mailhub.threads)
    database.setServiceParent(pools)
    builder = None
    if not (isinstance(database.dialect, SQLiteDialect) and database.dialect.path == ":memory:"):
        # A database another process can open: the table is built there.
        builder = functools.partial(in_child, reactor, config.dsn, config.mailhub.site_id)
    directory = Directory(database.store, reactor, config.database.poll_interval, hub,
                          saved=config.data_dir / snapshot.FILENAME, builder=builder)

    users, ldap = _users(config, database, directory, reactor, pools)

    root = Root(metrics)
    # One failure budget, one metric and one log for every surface that checks a secret.
    auth = Auth(reactor, metrics, hub)
    hooks = GroupHooks(directory, config, metrics, hub, auth=auth)
    for name in GroupHooks.paths:
        root.mount(name, hooks.resource())
    # Unknown /gs-* paths, and bodies refused before the hooks see them, in
    # the hooks' one error shape (doc/hooks.rst "Answers and errors").
    root.shape_errors(b"gs-", hook_error_body)
    push = PushReceiver(config, hub, metrics, reactor, auth=auth)
    events = EventStream(config, hub, metrics, users, reactor, auth=auth)
    root.mount(b"preliminary", push.resource())
    root.mount(b"push", push.resource())
    root.mount(b"api", events.resource())
    mailstore = MailStoreIntegration(config, users, hub, metrics, reactor, auth=auth)
    root.mount_at(config.mailstore.path, mailstore.resource())

    stops: list[Callable[[], Any]] = [push.stop, events.close]
    later: list[Service] = []  # started once the directory's table has loaded
    if config.collector.enabled:
        queue, dav = _collector(config, pubsub, users, metrics, reactor, pools, stops, auth,
                                directory, ldap)
        calendar = CalendarCollect(
            queue, SiteToken(auth, "calendar", directory.check_token,
                             directory.check_token_cached),
            config.mailhub.max_body)
        root.mount(b"collector", calendar.resource())
        later.append(Resume(queue))
        if dav is not None:
            root.mount(dav.segment, dav.resource())
            root.serve_dav_discovery(b"/" + dav.segment + b"/")
            directory.on_change.append(dav.directory_changed)

    carddav, close_carddav = carddav_for_checks(config, reactor)
    stops.append(close_carddav)
    checks = make_checks(config, reactor, listen=listen, database=database, pubsub=pubsub,
                         ldap=ldap, carddav=carddav, embedded_dav=config.embedded_carddav)
    # twistd listens before the start-up work is done (privilegedStartService):
    # until then /healthz says so. (``ready`` is made below.) Ready means
    # every surface answers fully: from the database while the directory's
    # table loads (seconds at a million profiles, on a first start).
    checks.insert(0, startup_check(lambda: ready.ready.called, lambda: (
        "" if directory.loaded else
        "the directory's table is loading: its reads go to the database meanwhile")))
    ops = Operations(metrics, checks, functools.partial(
        site_document, config.mailstore.path, config.collector.enabled,
        status_codes=config.hooks.status_codes,
        ops_credentials=bool(config.mailhub.ops_user)), reactor,
        credentials=ops_credentials(config.mailhub, auth))
    # /healthz stays on the main port (load balancers probe it there); with
    # [mailhub] ops_listen, /metrics and /openapi.json are served only there.
    ops_root = Root(metrics) if ops_endpoint is not None else root
    root.mount(b"healthz", ops.resource())
    for name in (b"healthz", *OPS_ONLY):
        ops_root.mount(name, ops.resource())
    site = MailhubSite(root, config.mailhub.max_body,
                       max_connections=config.mailhub.max_connections,
                       health_reserve=config.mailhub.health_reserve,
                       header_timeout=config.mailhub.header_timeout, metrics=metrics)

    async def prepare() -> None:
        await database.store.migrate()
        await directory.start()

    for service in pubsub.services:
        service.setServiceParent(top)
    ready = AfterReady(prepare, reactor)
    ready.setServiceParent(top)
    directory.setServiceParent(ready)
    # The profile table, then what needs it in memory: the collector's
    # consumer (its ESN ids and exclusions are read from the table).
    table = AfterReady(directory.load, reactor, done="")
    table.setServiceParent(ready)
    if isinstance(database.dialect, PostgreSQLDialect):
        # Changes made elsewhere reach this instance as they commit (polling stays).
        ChangeListener(database.dialect.dsn, reactor,
                       directory.changed_elsewhere).setServiceParent(ready)
    # One failure budget for every instance on this database (the table
    # exists once migrated, so it starts with the directory).
    ThrottleSync(auth.throttle, database.store, reactor,
                 interval=config.database.throttle_sync,
                 metrics=metrics).setServiceParent(ready)
    OnStop(*stops).setServiceParent(ready)
    for service in later:
        service.setServiceParent(table)
    web = Listening(endpoint, site, listen)
    web.setName("web")
    web.setServiceParent(ready)
    if ops_endpoint is not None:
        ops_site = MailhubSite(ops_root, config.mailhub.max_body,
                               max_connections=OPS_CONNECTIONS, health_reserve=0,
                               header_timeout=config.mailhub.header_timeout, metrics=metrics)
        ops_web = Listening(ops_endpoint, ops_site, ops_listen)
        ops_web.setName("ops")
        ops_web.setServiceParent(ready)
    return top


def _users(config: Config, database: StoreService, directory: Directory, reactor: Any,
           top: MultiService) -> tuple[ChainedUserSource, LDAPService | None]:
    """The site's users first, then LDAP when ``[ldap] url`` is set (and its service)."""
    hashing = HashingService(threads=2)
    hashing.setServiceParent(top)
    sources: list[Any] = [SiteUserSource(database.store, reactor, hashing.pool,
                                         directory=directory)]
    ldap = LDAPService.from_config(reactor, config.ldap)
    if ldap is not None:
        ldap.setServiceParent(top)
        sources.append(ldap.source)
    return ChainedUserSource(sources), ldap


def _collector(config: Config, pubsub: PubSub, users: Any, metrics: Metrics, reactor: Any,
               top: MultiService, stops: list[Callable[[], Any]],
               auth: Auth, directory: Directory | None = None,
               ldap: LDAPService | None = None) -> tuple[IWorkQueue, EmbeddedDAV | None]:
    """The contact collector: CardDAV client, engine, queue consumer and sources."""
    dav: EmbeddedDAV | None = None
    credentials: tuple[str, str] | None = None
    if config.embedded_carddav:
        dav = EmbeddedDAV(reactor, config.data_dir / "dav", users, threads=config.mailhub.threads,
                          hub=pubsub.hub, metrics=metrics, auth=auth)
        dav.setServiceParent(top)
        http: Any = dav.http_client()
        base = dav.url
    else:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = config.carddav.concurrency
        http = treq.client.HTTPClient(Agent(reactor, pool=pool))
        stops.append(pool.closeCachedConnections)
        base = config.carddav.url
        credentials = (config.carddav.username, config.carddav.password)
    try:
        layout = BookLayout.from_config(base, config.carddav.addressbook)
    except ValueError as e:
        raise ConfigError("%s: [carddav] addressbook: bad value: %s" % (config.path, e))
    carddav = CardDAVClient(http, reactor, credentials=credentials,
                            timeout=config.carddav.timeout,
                            concurrency=config.carddav.concurrency, metrics=metrics)
    collector = config.collector
    state = None
    if directory is not None:
        # Tombstones, opt-outs and block lists: in the database, cached here,
        # dropped as the directory reads each change (doc/collector.rst).
        state = CollectorState(directory.store, reactor, forget_days=collector.forget_days,
                               forget=collector.forget, book_opt_out=collector.book_opt_out)
        directory.on_change.append(state.directory_changed)
    engine = CollectorEngine(users, carddav, layout, pubsub.hub, metrics, reactor,
                             skip_site_users=collector.skip_site_users,
                             cache_ttl=collector.cache_ttl, cache_size=collector.cache_size,
                             mirror_size=collector.mirror_size,
                             max_addresses=collector.max_addresses,
                             calendar=collector.calendar, note=collector.note, state=state,
                             exclusions=exclusions_of(collector, directory, reactor),
                             esn_ids=esn_ids_of(collector, directory,
                                                ldap.source if ldap is not None else None),
                             rank=collector.rank)
    # Expiry and the cap: a pass every retention_interval, off the message
    # path (doc/collector.rst). What it removes is recorded as mailhub's
    # doing first, so the forget rules do not take it for the user's.
    retention = Retention(users, carddav, layout, reactor,
                          max_contacts=collector.max_contacts,
                          expire_days=collector.expire_days, usage=engine.usage,
                          metrics=metrics,
                          on_removed=state.removed_by_collector if state is not None else None)
    RetentionService(retention, reactor, collector.retention_interval).setServiceParent(top)
    # Without a broker the queue lives in {data}/collector-spool (doc/collector.rst).
    queue = pubsub.work_queue(collector.queue, dead_letter=collector.dead_letter,
                              retry_initial=collector.retry_initial,
                              retry_max=collector.retry_max, spool="collector-spool",
                              routing_key=collector.routing_key,
                              queue_type=collector.queue_type)
    # A message taken before the directory's table is loaded waits for it
    # (the broker hands messages over as soon as it is connected): the ESN
    # ids and the group addresses are read from memory.
    queue.consume(directory.after_load(engine.handle) if directory is not None
                  else engine.handle)
    stops.append(queue.stop)
    # Their count for /metrics; the spool's pruned after dead_letter_days.
    dead_letter_watch(config, queue, pubsub.broker, metrics, reactor).setServiceParent(top)
    MailSource(pubsub.hub, queue, collector.sent_folders, metrics).start()
    calendar_source = CalendarSource(
        queue, functools.partial(pubsub.shared_subscription,
                                 retry_initial=collector.retry_initial,
                                 retry_max=collector.retry_max), metrics)
    calendar_source.start()
    stops.append(calendar_source.stop)
    return queue, dav
