"""``twistd mailhub``: the command-line options and the wiring of the services.

makeService only wires parts together; each part is built and tested on its
own. A configuration that cannot be used stops start-up with one line that
names the file, the section and the key.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from mailhub import __version__
from mailhub.config import Config, load
from mailhub.directory.cache import Directory
from mailhub.directory.ldap import LDAPService
from mailhub.directory.sql import StoreService
from mailhub.directory.users import ChainedUserSource, HashingService, SiteUserSource
from mailhub.errors import ConfigError
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.service import AfterReady
from mailhub.web.mailstore import MailStoreIntegration
from mailhub.web.ops import Operations
from mailhub.web.site import MailhubSite, Root


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
    return build(config, listen, reactor)


def build(config: Config, listen: str, reactor: Any) -> MultiService:
    """Wire every part for ``config``, listening on ``listen``."""
    top = MultiService()
    metrics = Metrics()
    hub = Hub()

    try:
        database = StoreService(config.dsn, config.mailhub.site_id, reactor,
                                threads=config.mailhub.threads)
        endpoint = serverFromString(reactor, listen)
    except (ConfigError, ValueError) as e:
        raise SystemExit("mailhub: configuration error: %s" % e)
    database.setServiceParent(top)

    directory = Directory(database.store, reactor, config.database.poll_interval, hub)

    async def database_check() -> tuple[bool, str]:
        await database.store.ping()
        return True, database.dialect.name

    checks: dict[str, Any] = {"database": database_check}
    routes: dict[bytes, Any] = {}

    # Users: the site's own first, then LDAP when configured.
    hashing = HashingService(threads=2)
    hashing.setServiceParent(top)
    sources: list[Any] = [SiteUserSource(database.store, reactor, hashing.pool)]
    ldap = LDAPService.from_config(reactor, config.ldap)
    if ldap is not None:
        ldap.setServiceParent(top)
        sources.append(ldap.source)

        async def ldap_check() -> tuple[bool, str]:
            ok = await ldap.source.ping()
            return bool(ok), "a server answered" if ok else "no server answered"

        checks["ldap"] = ldap_check
    users = ChainedUserSource(sources)
    mailstore = MailStoreIntegration(config, users, hub, metrics, reactor)

    ops = Operations(metrics, checks, lambda: {"openapi": "3.1.0",
                                                "info": {"title": "mailhub", "version": __version__},
                                                "paths": {}})
    for name in (b"healthz", b"metrics", b"openapi.json"):
        routes[name] = ops.resource()
    root = Root(metrics, routes)
    root.mount_at(config.mailstore.path, mailstore.resource())
    site = MailhubSite(root, config.mailhub.max_body)

    async def prepare() -> None:
        await database.store.migrate()
        await directory.load()

    ready = AfterReady(prepare, reactor)
    ready.setServiceParent(top)
    directory.setServiceParent(ready)
    web = StreamServerEndpointService(endpoint, site)
    web.setName("web")
    web.setServiceParent(ready)
    return top
