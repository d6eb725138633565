"""``twistd mailhub``: the command-line options and the wiring of the services.

makeService only wires parts together; each part is built and tested on its
own. A configuration that cannot be used stops start-up with one line that
names the file, the section and the key.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Awaitable, Callable

import treq
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from mailhub import __version__
from mailhub.collector.carddav import BookLayout, CardDAVClient
from mailhub.collector.embedded import EmbeddedDAV
from mailhub.collector.engine import CollectorEngine
from mailhub.collector.sources import CalendarSource, MailSource
from mailhub.config import Config, load
from mailhub.directory.cache import Directory
from mailhub.directory.ldap import LDAPService
from mailhub.directory.sql import StoreService
from mailhub.directory.throttle import Throttle
from mailhub.directory.users import ChainedUserSource, HashingService, SiteUserSource
from mailhub.errors import ConfigError
from mailhub.metrics import Metrics
from mailhub.pubsub.interfaces import IWorkQueue
from mailhub.pubsub.wiring import PubSub, Resume, make_pubsub
from mailhub.service import AfterReady, InOrder
from mailhub.web.calendar import CalendarCollect
from mailhub.web.hooks import GroupHooks
from mailhub.web.mailstore import MailStoreIntegration
from mailhub.web.openapi import site_document
from mailhub.web.ops import Operations
from mailhub.web.events import EventStream
from mailhub.web.push import PushReceiver
from mailhub.web.site import MailhubSite, Root

Check = Callable[[], Any]


class Options(usage.Options):
    """Options of ``twistd mailhub``."""

    synopsis = "[--config FILE] [--listen ENDPOINT]"
    longdesc = ("mailhub: contact collector, GroupServer web hooks, ESN pubsub, "
                "Dovecot push receiver and MailStore integration in one process.")
    optParameters = [
        ["config", "c", None, "INI configuration file (default: built-in defaults)."],
        ["listen", "l", None, "Twisted endpoint to listen on; overrides [mailhub] listen."],
    ]

    def opt_version(self) -> None:
        """Print mailhub's version and exit."""
        print("mailhub", __version__)
        sys.exit(0)


def load_config(options: usage.Options) -> Config:
    """The Config that the options name, or SystemExit with one clear line."""
    try:
        return load(options["config"])
    except ConfigError as e:
        raise SystemExit("mailhub: configuration error: %s" % e)


def makeService(options: usage.Options) -> IService:
    """Build mailhub's services from the options."""
    from twisted.internet import reactor

    config = load_config(options)
    listen = options["listen"] or config.mailhub.listen
    try:
        return build(config, listen, reactor)
    except (ConfigError, ValueError) as e:
        message = str(e)
        if config.path and not message.startswith(config.path):
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


def build(config: Config, listen: str, reactor: Any) -> MultiService:
    """Wire every part for ``config``, listening on ``listen``."""
    # Stopped in reverse: the web site and its surfaces first, then the
    # broker (which drains its consumers), then the thread pools they used.
    top = InOrder()
    pools = MultiService()
    pools.setServiceParent(top)
    metrics = Metrics()
    pubsub = make_pubsub(config, reactor, metrics)
    hub = pubsub.hub

    database = StoreService(config.dsn, config.mailhub.site_id, reactor,
                            threads=config.mailhub.threads)
    endpoint = serverFromString(reactor, listen)
    database.setServiceParent(pools)
    directory = Directory(database.store, reactor, config.database.poll_interval, hub)

    async def database_check() -> tuple[bool, str]:
        await database.store.ping()
        return True, database.dialect.name

    checks: dict[str, Check] = {"database": database_check, "amqp": _amqp_check(pubsub)}
    users = _users(config, database, directory, reactor, pools, checks)

    root = Root(metrics)
    hooks = GroupHooks(directory, config, metrics, hub)
    for name in GroupHooks.paths:
        root.mount(name, hooks.resource())
    push = PushReceiver(config, hub, metrics, reactor)
    events = EventStream(config, hub, metrics, users, reactor)
    root.mount(b"preliminary", push.resource())
    root.mount(b"push", push.resource())
    root.mount(b"api", events.resource())
    # One failure budget for every surface that checks passwords by Basic auth.
    throttle = Throttle(reactor)
    mailstore = MailStoreIntegration(config, users, hub, metrics, reactor, throttle=throttle)
    root.mount_at(config.mailstore.path, mailstore.resource())

    stops: list[Callable[[], Any]] = [push.stop, events.close]
    later: list[Service] = []  # started once the database and directory are ready
    if config.collector.enabled:
        queue, dav = _collector(config, pubsub, users, metrics, reactor, pools, stops,
                                throttle, directory.refresh)
        calendar = CalendarCollect(
            queue, lambda token: Deferred.fromCoroutine(directory.check_token(token)),
            config.mailhub.max_body)
        root.mount(b"collector", calendar.resource())
        later.append(Resume(queue))
        if dav is not None:
            root.mount(dav.segment, dav.resource())
            directory.on_change.append(dav.directory_changed)

    ops = Operations(metrics, checks, functools.partial(
        site_document, config.mailstore.path, config.collector.enabled))
    for name in (b"healthz", b"metrics", b"openapi.json"):
        root.mount(name, ops.resource())
    site = MailhubSite(root, config.mailhub.max_body)

    async def prepare() -> None:
        await database.store.migrate()
        await directory.load()

    for service in pubsub.services:
        service.setServiceParent(top)
    ready = AfterReady(prepare, reactor)
    ready.setServiceParent(top)
    directory.setServiceParent(ready)
    OnStop(*stops).setServiceParent(ready)
    for service in later:
        service.setServiceParent(ready)
    web = StreamServerEndpointService(endpoint, site)
    web.setName("web")
    web.setServiceParent(ready)
    return top


def _amqp_check(pubsub: PubSub) -> Check:
    def check() -> tuple[bool, str]:
        state = pubsub.health()
        return bool(state["ok"]), str(state.get("state", ""))
    return check


def _users(config: Config, database: StoreService, directory: Directory, reactor: Any,
           top: MultiService, checks: dict[str, Check]) -> ChainedUserSource:
    """The site's users first, then LDAP when ``[ldap] url`` is set."""
    hashing = HashingService(threads=2)
    hashing.setServiceParent(top)
    sources: list[Any] = [SiteUserSource(database.store, reactor, hashing.pool,
                                         directory=directory)]
    ldap = LDAPService.from_config(reactor, config.ldap)
    if ldap is not None:
        ldap.setServiceParent(top)
        sources.append(ldap.source)

        async def ldap_check() -> tuple[bool, str]:
            ok = await ldap.source.ping()
            return bool(ok), "a server answered" if ok else "no server answered"

        checks["ldap"] = ldap_check
    return ChainedUserSource(sources)


def _collector(config: Config, pubsub: PubSub, users: Any, metrics: Metrics, reactor: Any,
               top: MultiService, stops: list[Callable[[], Any]],
               throttle: Throttle, refresh_users: Callable[[], Awaitable[None]],
               ) -> tuple[IWorkQueue, EmbeddedDAV | None]:
    """The contact collector: CardDAV client, engine, queue consumer and sources."""
    dav: EmbeddedDAV | None = None
    credentials: tuple[str, str] | None = None
    if config.embedded_carddav:
        dav = EmbeddedDAV(reactor, config.data_dir / "dav", users, threads=config.mailhub.threads,
                          hub=pubsub.hub, metrics=metrics, throttle=throttle)
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
    engine = CollectorEngine(users, carddav, layout, pubsub.hub, metrics, reactor,
                             skip_site_users=collector.skip_site_users,
                             cache_ttl=collector.cache_ttl, cache_size=collector.cache_size,
                             mirror_size=collector.mirror_size, refresh_users=refresh_users)
    # Without a broker the queue lives in {data}/collector-spool (doc/collector.rst).
    queue = pubsub.work_queue(collector.queue, dead_letter=collector.dead_letter,
                              retry_initial=collector.retry_initial,
                              retry_max=collector.retry_max, spool="collector-spool",
                              routing_key=collector.routing_key)
    queue.consume(engine.handle)
    stops.append(queue.stop)
    MailSource(pubsub.hub, queue, collector.sent_folders, metrics).start()
    calendar_source = CalendarSource(
        queue, functools.partial(pubsub.shared_subscription,
                                 retry_initial=collector.retry_initial,
                                 retry_max=collector.retry_max), metrics)
    calendar_source.start()
    stops.append(calendar_source.stop)
    return queue, dav
