"""``mailhub check``: the server's own health checks, run once, as a table.

It builds the parts the checks need exactly as ``twistd mailhub`` does (the
database's StoreService, the pubsub and its AMQP Broker, the LDAPService,
the collector's CardDAV client), starts them on the reactor
(``task.react``), runs :func:`mailhub.checks.make_checks`, the list that
``/healthz`` runs, prints one row per finding, and stops them. So a broker
that refuses one of the server's declarations is reported here as the
server meets it, with the broker's reason.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import react

from mailhub.checks import Check, Row, Status, carddav_for_checks, make_checks, run_checks
from mailhub.cli.common import IO, OK, BAD, table
from mailhub.collector.sources import CALENDAR_TOPICS
from mailhub.config import DEFAULT_SPEC, Config
from mailhub.directory.ldap import LDAPService
from mailhub.directory.sql import StoreService
from mailhub.errors import ConfigError
from mailhub.metrics import Metrics
from mailhub.pubsub.wiring import PubSub, make_pubsub


@attrs.define
class Parts:
    """The server's parts that the checks use, built from the configuration."""

    checks: list[Check]
    services: MultiService
    closes: list[Callable[[], Any]]

    async def stop(self) -> None:
        """Stop the services and close the connection pools."""
        await self.services.stopService()
        for close in self.closes:
            await maybeDeferred(close)


def _pubsub(config: Config, reactor: Any, metrics: Metrics) -> tuple[PubSub, dict[str, Row]]:
    """The server's pubsub, and the rows of what kept it from being built as is.

    With a spec file that cannot be loaded (the server would not start),
    the connection is still checked with Debian's file, so that the
    ``amqp spec`` row and the ``amqp`` row each say their own part. A
    ConfigError means the ``[amqp]`` section cannot be used at all.
    """
    try:
        return make_pubsub(config, reactor, metrics), {}
    except ConfigError as e:
        if not config.amqp.url or config.amqp.spec == DEFAULT_SPEC:
            raise
        first = str(e)
    fallback = attrs.evolve(config, amqp=attrs.evolve(config.amqp, spec=DEFAULT_SPEC))
    try:
        pubsub = make_pubsub(fallback, reactor, metrics)
    except ConfigError:
        # Not the spec file, or not only: the URL, say. The spec is unknown.
        raise ConfigError(first)
    return pubsub, {"amqp spec": Row("amqp spec", Status.FAIL, first)}


def _declare_as_the_server(config: Config, pubsub: PubSub) -> None:
    """Register the queues the server's collector declares (mailhub.tap), so
    the connection's set-up declares the same things as the server's does."""
    collector = config.collector
    if pubsub.broker is None or not collector.enabled:
        return
    pubsub.work_queue(collector.queue, dead_letter=collector.dead_letter,
                      retry_initial=collector.retry_initial, retry_max=collector.retry_max,
                      routing_key=collector.routing_key)
    for topic in CALENDAR_TOPICS:
        pubsub.shared_subscription(topic, retry_initial=collector.retry_initial,
                                   retry_max=collector.retry_max)


def build_parts(config: Config, reactor: Any) -> Parts:
    """The checks of ``twistd mailhub`` on ``config``, with the parts they use."""
    services = MultiService()
    closes: list[Callable[[], Any]] = []
    unusable: dict[str, Row] = {}
    metrics = Metrics()

    database: StoreService | None = None
    try:
        database = StoreService(config.dsn, config.mailhub.site_id, reactor, threads=1)
    except (ConfigError, ValueError) as e:
        unusable["database"] = Row("database", Status.FAIL, "bad DSN: %s" % e)
    else:
        database.setServiceParent(services)

    pubsub: PubSub | None = None
    try:
        pubsub, spec = _pubsub(config, reactor, metrics)
    except ConfigError as e:
        unusable["amqp"] = Row("amqp", Status.FAIL, str(e))
        unusable["amqp spec"] = Row("amqp spec", Status.OFF, "not checked: [amqp] is unusable")
    else:
        unusable.update(spec)
        _declare_as_the_server(config, pubsub)
        for service in pubsub.services:
            service.setServiceParent(services)

    ldap = LDAPService.from_config(reactor, config.ldap)
    if ldap is not None:
        ldap.setServiceParent(services)

    carddav, close_carddav = carddav_for_checks(config, reactor)
    closes.append(close_carddav)

    checks = make_checks(config, reactor, listen=config.mailhub.listen, database=database,
                         pubsub=pubsub, ldap=ldap, carddav=carddav,
                         embedded_dav=config.embedded_carddav, unusable=unusable)
    return Parts(checks, services, closes)


async def run(reactor: Any, config: Config, io: IO) -> int:
    """Build, start, check, stop; print the table; the exit code."""
    where = config.source
    parts = build_parts(config, reactor)
    parts.services.startService()
    try:
        results = await run_checks(parts.checks, reactor)
    finally:
        await parts.stop()
    rows = [Row("config", Status.OK, where)]
    for _, found in results:
        rows += found
    table([["CHECK", "STATUS", "DETAIL"]]
          + [[r.what, r.status.value, r.detail] for r in rows], io.stdout)
    return OK if all(r.fine for r in rows) else BAD


def check(config: Config, args: argparse.Namespace, io: IO) -> int:
    """Run the health checks under ``task.react``; 0 only if every row is fine.

    This runs (and stops) the global reactor, which a process can do once:
    the command does it once; tests run ``check`` in a process of its own.
    """
    code: list[int] = []

    def main(reactor: Any) -> Deferred[None]:
        d = Deferred.fromCoroutine(run(reactor, config, io))
        return d.addCallback(code.append)

    try:
        react(main)
    except SystemExit as e:
        if not code:  # the run itself failed (react logged why)
            return e.code if isinstance(e.code, int) and e.code else BAD
    return code[0] if code else BAD
