"""Dead letters: the collector messages that can never succeed, kept for an admin.

A poison message (bad JSON, unknown user, no addresses) is kept with its
reason instead of being dropped:

- with a broker, in the durable queue ``[collector] dead_letter``
  (``collector:email:dead``), the reason in the ``x-mailhub-reason`` header
  (:mod:`mailhub.pubsub.workqueue`), with an id (``x-mailhub-dead-id``) and
  the time (``x-mailhub-dead-at``);
- without one, in ``{data}/collector-spool/dead/``: ``<id>.msg`` (the body)
  and ``<id>.reason`` beside it (:class:`mailhub.pubsub.spool.Spool`).

:class:`SpoolDeadLetters` lists, shows, replays, drops and prunes the
spool's; ``mailhub dead`` (:mod:`mailhub.cli.dead`) uses it, and the broker's
queue through AMQP. :class:`DeadLetterWatch` is the server's side: it
refreshes the ``mailhub_collector_dead_letters`` gauge and, for the spool,
prunes dead letters older than ``[collector] dead_letter_days`` in bounded
batches and takes up the messages ``mailhub dead replay`` put back in the
spool while the server runs. Its file work runs in its own one-thread pool.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailhub.metrics import Metrics
from mailhub.pubsub.workqueue import AT_HEADER, ID_HEADER, QUEUE_HEADER, REASON_HEADER

__all__ = ["ID_HEADER", "AT_HEADER", "QUEUE_HEADER", "REASON_HEADER", "DeadLetter",
           "SpoolDeadLetters", "DeadLetterWatch", "summary", "when_text"]


#: The gauge of how many dead letters wait for an admin.
GAUGE = "mailhub_collector_dead_letters"

#: How many files one pruning round removes at most (the rest wait for the next).
PRUNE_BATCH = 500


@attrs.frozen
class DeadLetter:
    """One dead letter: its id, when it died (epoch seconds, None if unknown),
    why, the body, and (RabbitMQ) its AMQP properties."""

    id: str
    when: float | None
    reason: str
    body: bytes
    properties: dict[str, Any] = attrs.field(factory=dict)

    def summary(self) -> str:
        """``user=... addresses=N`` read from the body, or what is wrong with it."""
        return summary(self.body)


def summary(body: bytes) -> str:
    """A collector message in a few words: its user and how many addresses."""
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return "not JSON (%d bytes)" % len(body)
    if not isinstance(message, dict):
        return "not a JSON object"
    user = message.get("userId") or message.get("userEmail") or "-"
    emails = message.get("emails")
    count = len(emails) if isinstance(emails, list) else "-"
    return "user=%s addresses=%s" % (_short(str(user)), count)


def _short(text: str, width: int = 60) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= width else text[:width - 3] + "..."


def when_text(when: float | None) -> str:
    """An instant as UTC ISO 8601 to the second, ``-`` when unknown."""
    if when is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


class SpoolDeadLetters:
    """The dead letters of a collector spool: ``folder/dead/<id>.msg`` + ``.reason``.

    Blocking file work: the CLI calls it inline, the server from its thread
    pool (:class:`DeadLetterWatch`). Safe beside a running server: a replay
    moves the letter back into the spool by one rename (never lost, never
    twice), and files are written under names the server never touches.
    """

    def __init__(self, folder: Path, clock: Callable[[], float] = time.time) -> None:
        self.folder = folder
        self.dead_folder = folder / "dead"
        self._clock = clock

    def _ids(self) -> list[str]:
        try:
            return sorted(entry.name[:-4] for entry in os.scandir(self.dead_folder)
                          if entry.name.endswith(".msg"))
        except FileNotFoundError:
            return []

    def count(self) -> int:
        """How many dead letters there are."""
        return len(self._ids())

    def _when(self, letter_id: str) -> float | None:
        # The reason is written when the letter dies; the .msg keeps the
        # time it was accepted (a rename does not change it).
        for suffix in (".reason", ".msg"):
            try:
                return (self.dead_folder / (letter_id + suffix)).stat().st_mtime
            except FileNotFoundError:
                continue
        return None

    def _read(self, letter_id: str) -> DeadLetter | None:
        try:
            body = (self.dead_folder / (letter_id + ".msg")).read_bytes()
        except FileNotFoundError:
            return None
        try:
            reason = (self.dead_folder / (letter_id + ".reason")).read_text("utf-8").strip()
        except FileNotFoundError:
            reason = "(no reason recorded)"
        return DeadLetter(letter_id, self._when(letter_id), reason, body)

    def letters(self) -> Iterator[DeadLetter]:
        """Every dead letter, oldest first."""
        for letter_id in self._ids():
            letter = self._read(letter_id)
            if letter is not None:
                yield letter

    def find(self, letter_id: str) -> DeadLetter | None:
        """The dead letter ``letter_id`` (or the only one whose id starts so)."""
        if not letter_id or "/" in letter_id or letter_id.startswith("."):
            return None
        matches = [i for i in self._ids() if i == letter_id] or [
            i for i in self._ids() if i.startswith(letter_id)]
        return self._read(matches[0]) if len(matches) == 1 else None

    def replay(self, letter_id: str) -> str | None:
        """Put the letter back in the spool, last in line; its new name there.

        One rename moves it (so it is in exactly one place whatever happens);
        the reason is removed afterwards. A running server takes it up at its
        next refresh, a stopped one at its start. None when there is no such
        letter (another command took it).
        """
        name = "%020d-%d-replay-%s" % (time.time_ns(), os.getpid(), letter_id[-6:])
        try:
            os.replace(self.dead_folder / (letter_id + ".msg"), self.folder / (name + ".msg"))
        except FileNotFoundError:
            return None
        (self.dead_folder / (letter_id + ".reason")).unlink(missing_ok=True)
        return name

    def drop(self, letter_id: str) -> bool:
        """Delete the letter; False when there is no such letter."""
        try:
            (self.dead_folder / (letter_id + ".msg")).unlink()
        except FileNotFoundError:
            return False
        (self.dead_folder / (letter_id + ".reason")).unlink(missing_ok=True)
        return True

    def replayed(self) -> list[tuple[str, bytes]]:
        """The messages :meth:`replay` put back in the spool and still there, oldest first."""
        found = []
        try:
            names = sorted(e.name for e in os.scandir(self.folder)
                           if e.name.endswith(".msg") and "-replay-" in e.name)
        except FileNotFoundError:
            return []
        for name in names:
            try:
                found.append((name[:-4], (self.folder / name).read_bytes()))
            except FileNotFoundError:
                continue  # collected meanwhile
        return found

    def prune(self, days: int, batch: int = PRUNE_BATCH) -> int:
        """Delete at most ``batch`` letters older than ``days`` days; how many.

        ``days`` 0 keeps them forever. Reasons whose message is gone (a
        replay interrupted between its two steps) are removed too.
        """
        if days <= 0:
            return 0
        limit = self._clock() - days * 86400
        removed = 0
        try:
            entries = list(os.scandir(self.dead_folder))
        except FileNotFoundError:
            return 0
        names = {entry.name for entry in entries}
        for entry in entries:
            if removed >= batch:
                break
            if entry.name.endswith(".reason"):
                stem = entry.name[:-len(".reason")]
                if stem + ".msg" not in names:
                    Path(entry.path).unlink(missing_ok=True)
                continue
            if not entry.name.endswith(".msg"):
                continue
            letter_id = entry.name[:-4]
            when = self._when(letter_id)
            if when is not None and when < limit and self.drop(letter_id):
                removed += 1
        return removed


class DeadLetterWatch(Service):
    """The server's view of its dead letters: the gauge, and the spool's pruning.

    Every ``interval`` seconds (on ``clock``) it refreshes the count behind
    ``mailhub_collector_dead_letters``: with ``spool`` set, counting the
    files of ``dead/`` (and pruning them, see :meth:`SpoolDeadLetters.prune`)
    in its thread pool; with ``broker_count`` set, calling it (a passive
    ``queue.declare`` on the broker's control channel, which never blocks
    the reactor). ``rescan``, when given, gets on the reactor the messages that
    ``mailhub dead replay`` put back in the spool (read in the thread), so
    that the running server takes them up. A scrape reads the last count, never waits.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, metrics: Metrics,
                 spool: SpoolDeadLetters | None = None, days: int = 30,
                 broker_count: Callable[[], Deferred[int | None]] | None = None,
                 rescan: Callable[[list[tuple[str, bytes]]], Any] | None = None,
                 counted: Callable[[int], Any] | None = None, interval: float = 30.0,
                 runner: Callable[..., Deferred[Any]] | None = None) -> None:
        self.setName("dead-letters")
        self.clock = clock
        self.spool = spool
        self.days = days
        self.broker_count = broker_count
        self.rescan = rescan
        self.counted = counted
        self.interval = interval
        #: The last count (None until the first refresh succeeded).
        self.count: int | None = None
        self.pruned = 0
        self._pool: ThreadPool | None = None
        self._runner = runner
        self._loop: LoopingCall | None = None
        metrics.gauge_callback(GAUGE, "Collector dead letters waiting for an admin "
                               "(mailhub dead list), refreshed periodically",
                               lambda: float(self.count or 0))
        self._pruned_total = metrics.counter(
            "mailhub_collector_dead_letters_pruned_total",
            "Spool dead letters deleted for being older than [collector] dead_letter_days")

    def _run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._runner is not None:
            return self._runner(f, *args)
        assert self._pool is not None
        return deferToThreadPool(self.clock, self._pool, f, *args)  # type: ignore[arg-type]

    def startService(self) -> None:
        super().startService()
        if self._runner is None and self.spool is not None:
            self._pool = ThreadPool(minthreads=0, maxthreads=1, name="dead-letters")
            self._pool.start()
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("the dead-letter watch stopped", f))

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._pool is not None:
            self._pool.stop()
            self._pool = None
        return None

    def refresh(self) -> Deferred[None]:
        """One round: prune (spool), count, take up replayed messages; never fails."""
        return Deferred.fromCoroutine(self._refresh())

    async def _refresh(self) -> None:
        try:
            if self.spool is not None:
                spool = self.spool
                pruned, count, replayed = await self._run(
                    lambda: (spool.prune(self.days), spool.count(),
                             spool.replayed() if self.rescan is not None else []))
                if pruned:
                    self.pruned += pruned
                    self._pruned_total.inc(pruned)
                    self.log.info("deleted {count} spool dead letters older than {days} days",
                                  count=pruned, days=self.days)
                self.count = count
                if self.counted is not None:
                    self.counted(count)
                if self.rescan is not None and replayed:
                    self.rescan(replayed)
            elif self.broker_count is not None:
                found = await self.broker_count()
                if found is not None:
                    self.count = found
        except Exception:
            self.log.failure("cannot count the collector's dead letters")


def dead_letter_watch(config: Any, queue: Any, broker: Any, metrics: Metrics,
                      reactor: Any) -> DeadLetterWatch:
    """The watch of the collector's dead letters, for ``queue`` as mailhub.tap built it.

    A :class:`~mailhub.pubsub.spool.SpoolQueue` (no broker): its ``dead/``
    is counted and pruned after ``[collector] dead_letter_days``, and
    replayed letters are taken up. A RabbitMQ work queue: the dead-letter
    queue is counted on ``broker``'s connection, when it is up.
    """
    from mailhub.pubsub.spool import SpoolQueue

    days = config.collector.dead_letter_days
    if isinstance(queue, SpoolQueue):
        return DeadLetterWatch(reactor, metrics, spool=SpoolDeadLetters(queue.spool.folder),
                               days=days, rescan=queue.take_up, counted=queue.dead_counted)
    dead = queue.dead_letter

    async def count() -> int | None:
        session = broker.session if broker is not None else None
        if session is None or session.lost:
            return None  # the last count stands until the broker is back
        try:
            return await session.message_count(dead)  # type: ignore[no-any-return]
        except Exception:
            return None

    return DeadLetterWatch(reactor, metrics, days=days,
                           broker_count=lambda: Deferred.fromCoroutine(count()))
