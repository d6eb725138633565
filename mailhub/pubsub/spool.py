"""The work queue without a broker: messages kept in a folder until handled.

:class:`SpoolQueue` is the :class:`~mailhub.pubsub.interfaces.IWorkQueue`
that :mod:`mailhub.pubsub.wiring` gives when ``[amqp] url`` is empty (the
collector's ``collector:email`` then lives in ``{data}/collector-spool``).
It keeps the RabbitMQ work queue's promises in one process:

- :meth:`~SpoolQueue.publish` writes the message to the :class:`Spool`
  before it fires, so a stop, a crash or a kill -9 loses nothing: the next
  start takes up what was left (:meth:`~SpoolQueue.resume`, called once
  mailhub is ready);
- the consumer is retried with the same policy as the RabbitMQ work queue
  (:func:`mailhub.pubsub.retry.attempt`): backoff on transient failures, and
  a message that can never succeed goes to ``dead/`` with its reason beside
  it (``<name>.reason``);
- at most ``limit`` messages are held (running or waiting for a retry);
  beyond that ``publish`` fails with :class:`~mailhub.errors.Unavailable` so
  the caller pushes back.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailhub.errors import Unavailable
from mailhub.logs import printable
from mailhub.metrics import Metrics
from mailhub.pubsub.interfaces import Handler, IWorkQueue
from mailhub.pubsub.retry import Outcome, RetryPolicy, Sleeps, attempt
from mailhub.pubsub.workqueue import encode_body


class Spool:
    """Messages on disk, from their acceptance until handled or decided.

    ``folder`` holds one file per message (``<name>.msg``, the body as it
    was submitted), written under a temporary name and renamed, so a crash
    leaves each one whole or absent; ``folder/dead`` holds the messages that
    can never succeed, each with a ``<name>.reason`` beside it. Names
    sort in the order the messages came. Files are not fsynced: they survive
    a crash or a kill -9 of mailhub, not a power cut of the machine.
    """

    log = Logger()

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.dead_folder = folder / "dead"
        self.dead_folder.mkdir(parents=True, exist_ok=True)
        self._counter = itertools.count()

    def keep(self, body: bytes) -> str:
        """Write ``body`` down; its name. Raises Unavailable when the disk refuses."""
        name = "%020d-%d-%06d" % (time.time_ns(), os.getpid(), next(self._counter))
        temporary = self.folder / (name + ".tmp")
        try:
            temporary.write_bytes(body)
            os.replace(temporary, self.folder / (name + ".msg"))
        except OSError as e:
            try:
                temporary.unlink(missing_ok=True)
            except OSError:
                pass  # nothing was written there either
            raise Unavailable("cannot keep the message in %s: %s" % (self.folder, e))
        return name

    def done(self, name: str) -> None:
        """The message is collected: forget it."""
        try:
            (self.folder / (name + ".msg")).unlink(missing_ok=True)
        except OSError:
            self.log.failure("cannot remove {name} from the collector spool", name=name)

    def dead(self, name: str, reason: str) -> None:
        """The message can never be collected: keep it in ``dead/`` with the reason."""
        reason_file = self.dead_folder / (name + ".reason")
        temporary = self.dead_folder / (name + ".reason.tmp")
        try:
            # The message first, then its reason (whole, by a rename): whoever
            # sees a reason finds its message beside it.
            os.replace(self.folder / (name + ".msg"), self.dead_folder / (name + ".msg"))
            temporary.write_text(reason + "\n", "utf-8")
            os.replace(temporary, reason_file)
        except OSError:
            self.log.failure("cannot move {name} to the collector spool's dead letters",
                             name=name)

    def dead_count(self) -> int:
        """How many messages ``dead/`` holds."""
        return sum(1 for _ in self.dead_folder.glob("*.msg"))

    def messages(self) -> list[tuple[str, bytes]]:
        """The messages on disk, oldest first (half-written files are removed)."""
        for leftover in [*self.folder.glob("*.tmp"), *self.dead_folder.glob("*.tmp")]:
            leftover.unlink(missing_ok=True)
        found = []
        for path in sorted(self.folder.glob("*.msg")):
            try:
                found.append((path.stem, path.read_bytes()))
            except OSError:
                self.log.failure("cannot read {path} from the collector spool", path=path)
        return found


@implementer(IWorkQueue)
class SpoolQueue:
    """A work queue in a folder, for one process; see the module docstring.

    Metrics are named ``{metrics_prefix}_retries_total``, ``_dropped_total``
    (``reason`` poison or full), ``_held`` and ``_spool_dead``.
    """

    log = Logger()

    def __init__(self, name: str, spool: Spool, clock: IReactorTime,
                 policy: RetryPolicy = RetryPolicy(), limit: int = 1000,
                 metrics: Metrics | None = None,
                 metrics_prefix: str = "mailhub_collector") -> None:
        self.name = name
        self.spool = spool
        self.policy = policy
        self._clock = clock
        self._limit = limit
        self._handler: Handler | None = None
        self._sleeps = Sleeps(clock)
        #: Names of the messages being handled or waiting for a retry.
        self._names: set[str] = set()
        #: Messages waiting for room under ``limit`` (or for a consumer).
        self._backlog: deque[tuple[str, bytes]] = deque()
        #: Messages being handled or waiting for a retry.
        self.held = 0
        self._dead = spool.dead_count()
        #: Set by :meth:`recover`: until then the spool is not taken up.
        self._recovered = False
        metrics = metrics or Metrics()
        self._retries = metrics.counter(
            metrics_prefix + "_retries_total", "In-process collector retries (no broker)")
        self._dropped = metrics.counter(
            metrics_prefix + "_dropped_total",
            "In-process collector messages ended without collecting: poison (kept in the "
            "spool's dead letters), or refused when too many were held", ["reason"])
        metrics.gauge_callback(metrics_prefix + "_held", "In-process collector messages held",
                               lambda: self.held + len(self._backlog))
        metrics.gauge_callback(metrics_prefix + "_spool_dead",
                               "Messages in the collector spool's dead/ (no broker)",
                               lambda: self._dead)

    def publish(self, data: Any) -> Deferred[None]:
        """Write the message down and start handling it; fires once it is on disk.

        Fails with Unavailable when ``limit`` messages are held already or the
        disk refuses the file.
        """
        if self.held >= self._limit:
            self._dropped.labels(reason="full").inc()
            return fail(Unavailable("%s is holding %d messages already"
                                    % (self.name, self.held)))
        body = encode_body(data)
        try:
            name = self.spool.keep(body)
        except Unavailable:
            return fail()
        if self._handler is None or self._sleeps.stopped:
            self._backlog.append((name, body))
        else:
            self._start(name, body)
        return succeed(None)

    def consume(self, handler: Handler) -> None:
        """Hand every message's body to ``handler``."""
        if self._handler is not None:
            raise ValueError("work queue %s already has a consumer" % self.name)
        self._handler = handler

    def resume(self) -> None:
        """Take up what an earlier process left in the spool (see :meth:`recover`)."""
        self.recover()

    def recover(self) -> int:
        """Take up the messages a stopped process left in the spool; how many.

        They are started oldest first as room allows under ``limit``, beside
        new messages.
        """
        if self._sleeps.stopped:  # started again after a stop
            self._sleeps = Sleeps(self._clock)
        self._recovered = True
        waiting = {name for name, _ in self._backlog} | self._names
        found = [(name, body) for name, body in self.spool.messages() if name not in waiting]
        self._backlog.extend(found)
        if found:
            self.log.info("taking up {count} messages left in {queue}'s spool by an "
                          "earlier run", count=len(found), queue=self.name)
        self._take_backlog()
        return len(found)

    def take_up(self, found: list[tuple[str, bytes]]) -> int:
        """Take up messages put in the spool by another process; how many were new.

        ``mailhub dead replay`` moves a dead letter back into the spool while
        the server runs; :class:`~mailhub.pubsub.deadletters.DeadLetterWatch`
        reads such files in its thread and hands them here. A message this
        queue holds already, or that is gone (collected since it was read),
        is skipped, so none is handled twice.
        """
        if self._sleeps.stopped or not self._recovered:
            return 0  # recover() takes them up with the rest
        waiting = {name for name, _ in self._backlog} | self._names
        new = []
        for name, body in found:
            if name not in waiting and (self.spool.folder / (name + ".msg")).exists():
                waiting.add(name)
                new.append((name, body))
        self._backlog.extend(new)
        if new:
            self.log.info("taking up {count} replayed dead letters in {queue}'s spool",
                          count=len(new), queue=self.name)
        self._take_backlog()
        return len(new)

    def dead_counted(self, count: int) -> None:
        """The dead letters counted on disk (they change under ``mailhub dead``)."""
        self._dead = count

    def stop(self) -> None:
        """Cancel waiting retries (at shutdown); their messages stay in the spool.

        Messages still running finish, but are not tried again here.
        """
        self._sleeps.stop()
        self._backlog.clear()

    def _take_backlog(self) -> None:
        while (self._backlog and self.held < self._limit and not self._sleeps.stopped
               and self._handler is not None):
            name, body = self._backlog.popleft()
            self._start(name, body)

    def _start(self, name: str, body: bytes) -> None:
        self.held += 1
        self._names.add(name)
        d = Deferred.fromCoroutine(self._handle(name, body))
        d.addErrback(lambda f: self.log.failure("{queue} lost track of a message", f,
                                                queue=self.name))

    async def _handle(self, name: str, body: bytes) -> None:
        assert self._handler is not None
        try:
            settled = await attempt(self._handler, body, self.policy, self._sleeps.sleep,
                                    self._retrying)
            if settled.outcome is Outcome.DONE:
                self.spool.done(name)
            elif settled.outcome is Outcome.DEAD:
                self._dropped.labels(reason="poison").inc()
                self.log.warn("message from {queue} can never succeed, kept in the spool's "
                              "dead/: {reason}", queue=self.name,
                              reason=printable(settled.reason))
                self.spool.dead(name, settled.reason)
                self._dead += 1
            else:
                self.log.info("a message from {queue} is kept in the spool for the next "
                              "start", queue=self.name)
        finally:
            self.held -= 1
            self._names.discard(name)
            self._take_backlog()

    def _retrying(self, failure: Failure, delay: float) -> None:
        if self._sleeps.stopped:
            return  # the wait says stop: not a retry
        self._retries.inc()
        self.log.info("a message from {queue} failed ({reason}); retrying in {delay} s",
                      queue=self.name, reason=printable(failure.getErrorMessage()),
                      delay=delay)
