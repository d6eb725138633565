"""Service helpers shared by the wiring in :mod:`mailhub.tap`.

:class:`AfterReady` starts its children only once an asynchronous preparation
(migrating and loading the directory) has succeeded, retrying it with backoff
while the database cannot be reached, so mailhub never serves requests from
an empty directory.

:class:`Listening` binds the web site's port when twistd starts the
application (before the reactor runs and before privileges are dropped), and
a port that cannot be bound ends the process with one line and exit code 1,
so a supervisor (systemd's ``Restart=on-failure``) sees the failure.

:class:`StartupLog` writes, once, what the process uses.
"""

from __future__ import annotations

import sys
from typing import Any, Awaitable, Callable

from twisted.application.internet import StreamServerEndpointService, backoffPolicy
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailhub.errors import Unavailable


class AfterReady(MultiService):
    """Run ``prepare`` until it succeeds, then start the child services."""

    log = Logger()

    def __init__(self, prepare: Callable[[], Awaitable[Any]], clock: IReactorTime,
                 policy: Callable[[int], float] | None = None,
                 done: str = "mailhub is ready") -> None:
        super().__init__()
        self.prepare = prepare
        #: Logged when ``prepare`` has succeeded ("" for nothing).
        self.done = done
        self.clock = clock
        self.policy = policy or backoffPolicy(initialDelay=1.0, maxDelay=30.0, factor=2.0)
        self.ready: Deferred[None] = Deferred()
        self._attempt = 0
        self._pending: Any = None
        self._stopping = False

    def startService(self) -> None:
        # Mark running without starting the children yet.
        self.running = 1
        self._stopping = False
        self._try()

    def _try(self) -> None:
        self._pending = None
        d = Deferred.fromCoroutine(self._prepare())
        d.addCallbacks(self._prepared, self._failed)

    async def _prepare(self) -> Any:
        return await self.prepare()

    def _prepared(self, _: Any) -> None:
        if self._stopping:
            return
        if self.done:
            self.log.info(self.done)
        for service in self:
            service.startService()
        if not self.ready.called:
            self.ready.callback(None)

    def _failed(self, failure: Any) -> None:
        if self._stopping:
            return
        delay = self.policy(self._attempt)
        self._attempt += 1
        if failure.check(Unavailable):
            self.log.error("cannot start yet: {reason}; trying again in {delay:.0f} s",
                           reason=failure.getErrorMessage(), delay=delay)
        else:
            self.log.failure("start-up failed; trying again in {delay:.0f} s", failure,
                             delay=delay)
        self._pending = self.clock.callLater(delay, self._try)

    def stopService(self) -> "Deferred[Any] | None":
        self._stopping = True
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        if self.ready.called:
            return super().stopService()
        self.running = 0
        return None


class InOrder(MultiService):
    """Starts its children in order and stops them one by one, in reverse.

    MultiService stops every child at once; mailhub needs the web site and
    the AMQP consumers to finish what they hold (draining) before the thread
    pools they use go away.
    """

    log = Logger()

    async def _stop_each(self) -> None:
        for service in reversed(list(self)):
            try:
                await maybeDeferred(service.stopService)
            except Exception:
                self.log.failure("stopping {service} failed", service=service.name)

    def stopService(self) -> "Deferred[None]":
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_each())


class ThreadPoolService(Service):
    """Owns a thread pool for a blocking library: started and stopped with mailhub.

    Worker threads never touch the reactor; callers reach the pool through
    ``deferToThreadPool``.
    """

    def __init__(self, threads: int, name: str) -> None:
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name=name)

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class ListenFailed(Exception):
    """The web site's port cannot be bound; the message is the one line to show."""


def _quiet_listen_failure(previous: Any) -> Any:
    """An excepthook that ends on ListenFailed without a traceback (it is logged)."""

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not isinstance(value, ListenFailed):
            previous(kind, value, tb)

    return hook


class Listening(StreamServerEndpointService):
    """The web site's listening port: bound at once, or the process stops.

    twistd calls ``privilegedStartService`` before it runs the reactor; the
    endpoint is asked to listen there and its failure raised at once (as
    ``twisted.application.strports.service`` does). The failure is logged as
    one critical line and raised as :class:`ListenFailed`: twistd then removes
    its pid file and, when daemonizing, tells the waiting parent (which prints
    the line and exits 1); the process ends with exit code 1 and no traceback.
    """

    log = Logger()

    def __init__(self, endpoint: Any, factory: Any, address: str) -> None:
        super().__init__(endpoint, factory)
        self.address = address
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except (CannotListenError, OSError) as e:
            error = e.socketError if isinstance(e, CannotListenError) else e
            reason = getattr(error, "strerror", None) or str(error)
            line = "mailhub: cannot listen on %s: %s" % (self.address, reason)
            self.log.critical("{line}", line=line)
            sys.excepthook = _quiet_listen_failure(sys.excepthook)
            raise ListenFailed(line) from None


class StartupLog(Service):
    """Logs, once, the settings this process runs with (never a secret)."""

    log = Logger()

    def __init__(self, summary: dict[str, str]) -> None:
        self.summary = summary

    def startService(self) -> None:
        super().startService()
        self.log.info(
            "mailhub starting: listen {listen}; data {data}; database {database}; "
            "broker {broker}; CardDAV {carddav}; LDAP {ldap}; config {config}",
            **self.summary)
