"""Ranking and retention of collected contacts.

Ranking. Each collected card says how often the user wrote to its address
(``X-MAILHUB-COUNT``) and when last (``X-MAILHUB-LAST-USED``), so clients
and autocomplete can rank, and expiry can tell the contacts in use from the
forgotten ones. Writing that on every message would turn re-collection
(today free: no PUT) into a PUT per address, so :class:`Usage` counts the
uses in memory and a card is rewritten at most once per
:data:`RANK_INTERVAL` (a day): when a message uses a contact whose card's
LAST-USED is older than that. The count written is the card's plus the
uses counted since; uses counted after the last write and not written yet
are lost when the process stops (the card keeps the last written value: the
ranking is approximate, to a day). Several instances each count their own
uses; the card's LAST-USED, read from the book's copy that every lookup
brings up to date, keeps it at one write a day whichever instance writes.

Retention. :class:`Retention` goes through every user's collected book in
bounded batches, off the message path, on any RFC 6352 server: it reads the
book (one sync-collection, or an addressbook-query where the server does
not do those), and removes the contacts mailhub collected
that nobody used for [collector] expire_days, then, while more than
[collector] max_contacts remain, the least recently used. A card that is
no longer as mailhub wrote it (the user edited it: :func:`~mailhub.collector.vcard.edited`)
or that mailhub did not write (the user added it) is the user's: never
removed, not counted against the cap. Before it deletes anything it calls
``on_removed(user_id, addresses)`` (default: nothing), so that whoever tells
the user's deletions apart (the forget rules) knows these were mailhub's;
each DELETE carries the card's ETag (If-Match), so a card edited meanwhile
stays. :class:`RetentionService` runs a pass every [collector]
retention_interval seconds, on the injected clock.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import attrs
from cachetools import LRUCache
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredSemaphore, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from mailhub.collector.carddav import (
    BookLayout, Card, CardDAVClient, CardDAVError, SyncRefused, TokenExpired,
)
from mailhub.collector.vcard import Assessed, assess, contact_uuid, ranking_of
from mailhub.directory.model import User
from mailhub.errors import Unavailable
from mailhub.metrics import Metrics

#: Seconds between two writes of one contact's ranking, at least (a day).
RANK_INTERVAL = 86400.0
#: Users read per page of the user sources during a pass.
PAGE = 100
#: Users whose books are read or pruned at once during a pass.
CONCURRENCY = 2
#: Cards assessed between two turns of the reactor (about 1 ms each: a
#: 200-card book assessed at once would hold the reactor for 0.2 s).
ASSESS_SLICE = 20
#: Seconds after start-up before the first pass.
FIRST_PASS = 300.0

#: ``on_removed(user_id, addresses)``: told before mailhub deletes collected contacts.
OnRemoved = Callable[[str, list[str]], "Deferred[None]"]


def nothing_to_tell(user_id: str, addresses: Iterable[str]) -> "Deferred[None]":
    """The default ``on_removed``: nobody needs to know."""
    return succeed(None)


@attrs.define
class _Use:
    pending: int = 0
    last: float = 0.0
    written: float | None = None


class Usage:
    """Uses of collected contacts counted in memory between two writes of their ranking.

    Keyed by (user login, the contact's UUID: the one mailhub derives from the
    address key, which a retention pass reads from the card's UID without
    parsing the address); at most ``size`` contacts (the least recently used
    forgotten first: their uncounted uses are lost, which only makes a count
    a little low).
    """

    def __init__(self, clock: IReactorTime, interval: float = RANK_INTERVAL,
                 size: int = 100_000) -> None:
        self._clock = clock
        self.interval = interval
        self._uses: LRUCache[tuple[str, str], _Use] = LRUCache(maxsize=max(1, size))

    def __len__(self) -> int:
        return len(self._uses)

    def used(self, user: str, key: str) -> None:
        """Count one use (a message of the user's naming the address) now."""
        entry = self._uses.get((user, contact_uuid(key)))
        if entry is None:
            entry = self._uses[(user, contact_uuid(key))] = _Use()
        entry.pending += 1
        entry.last = self._clock.seconds()

    def due(self, user: str, key: str, card_text: str) -> bool:
        """Whether the card's ranking should be written now.

        Yes when uses wait and the card's LAST-USED (or, for a card without
        one, FIRST-SEEN or REV) is ``interval`` old or older, and this process
        has not written it within ``interval`` (its copy of the book may lag).
        """
        entry = self._uses.get((user, contact_uuid(key)))
        if entry is None or entry.pending <= 0:
            return False
        now = self._clock.seconds()
        if entry.written is not None and now - entry.written < self.interval:
            return False
        ranking = ranking_of(card_text)
        if ranking.last_used is None:
            return True  # written before ranking: give it its properties
        return now - ranking.last_used.timestamp() >= self.interval

    def pending(self, user: str, key: str) -> int:
        """Uses counted and not written yet."""
        entry = self._uses.get((user, contact_uuid(key)))
        return entry.pending if entry is not None else 0

    def written(self, user: str, key: str, count: int) -> None:
        """The card's ranking was written now, with ``count`` of the pending uses in it."""
        entry = self._uses.get((user, contact_uuid(key)))
        if entry is None:
            entry = self._uses[(user, contact_uuid(key))] = _Use()
        entry.pending = max(0, entry.pending - count)
        entry.written = self._clock.seconds()

    def last_use(self, user: str, uid: str) -> float | None:
        """When this process last counted a use of the contact with this UUID
        not yet written into its card (epoch seconds), or None."""
        entry = self._uses.get((user, uid))
        return entry.last if entry is not None and entry.pending else None

    def drop(self, user: str, uid: str) -> None:
        """Forget the contact with this UUID (it was removed)."""
        self._uses.pop((user, uid), None)


@attrs.frozen
class Doomed:
    """A collected contact a pass removes: where, which version, its address, why."""

    card: Card
    email: str
    reason: str  # expired or over_limit
    uid: str = ""


@attrs.define
class Decision:
    """What a pass does with one book: the contacts removed, and how many are the user's."""

    doomed: list[Doomed] = attrs.Factory(list)
    users_own: int = 0
    kept: int = 0


def decide(cards: Iterable[Card], now: float, *, expire_after: float = 0.0,
           max_contacts: int = 0,
           last_use: Callable[[str], float | None] = lambda uid: None) -> Decision:
    """:func:`choose` for cards not assessed yet (pure)."""
    return choose([(card, assess(card.text)) for card in cards], now,
                  expire_after=expire_after, max_contacts=max_contacts, last_use=last_use)


def choose(assessed: Iterable[tuple[Card, Assessed]], now: float, *,
           expire_after: float = 0.0, max_contacts: int = 0,
           last_use: Callable[[str], float | None] = lambda uid: None) -> Decision:
    """Which collected contacts of one book go (pure).

    ``expire_after`` seconds (0: never) since a contact was last written or
    used: it expires. Then, while more than ``max_contacts`` (0: no cap)
    contacts mailhub wrote remain, the least recently used go (the fewer uses
    first among equals). A card the user edited or wrote is left alone and
    not counted. ``last_use(uid)`` adds uses counted in memory and not yet
    written to the card.
    """
    decision = Decision()
    mine: list[tuple[float, int, str, Card, str, str]] = []
    for card, facts in assessed:
        if facts.edited:
            decision.users_own += 1
            continue
        email = facts.email
        ranking = facts.ranking
        latest = ranking.latest
        seen = latest.timestamp() if latest is not None else None
        remembered = last_use(facts.uid) if facts.uid else None
        if remembered is not None and (seen is None or remembered > seen):
            seen = remembered
        if expire_after > 0 and seen is not None and now - seen >= expire_after:
            decision.doomed.append(Doomed(card, email, "expired", facts.uid))
            continue
        # Unknown age: never expired, but first to go under the cap.
        mine.append((seen if seen is not None else 0.0, ranking.count, card.url, card, email,
                     facts.uid))
    if max_contacts > 0 and len(mine) > max_contacts:
        mine.sort(key=lambda item: (item[0], item[1], item[2]), reverse=True)
        for _, _, _, card, email, uid in mine[max_contacts:]:
            decision.doomed.append(Doomed(card, email, "over_limit", uid))
        mine = mine[:max_contacts]
    decision.kept = len(mine)
    return decision


@attrs.define
class PassReport:
    """What one pass did: users and cards looked at, contacts removed, users that failed."""

    users: int = 0
    cards: int = 0
    users_own: int = 0
    expired: int = 0
    over_limit: int = 0
    kept_changed: int = 0
    failed: int = 0
    seconds: float = 0.0


class Retention:
    """Removes expired and over-the-cap collected contacts from every user's collected book."""

    log = Logger()

    def __init__(self, users: Any, dav: CardDAVClient, layout: BookLayout,
                 clock: IReactorTime, *, max_contacts: int = 0, expire_days: float = 0,
                 on_removed: OnRemoved | None = None, usage: Usage | None = None,
                 concurrency: int = CONCURRENCY, page: int = PAGE,
                 metrics: Metrics | None = None) -> None:
        self._users = users
        self._dav = dav
        self._layout = layout
        self._clock = clock
        self.max_contacts = max(0, max_contacts)
        self.expire_after = max(0.0, expire_days) * 86400.0
        self.on_removed: OnRemoved = on_removed or nothing_to_tell
        self._usage = usage
        self._concurrency = max(1, concurrency)
        self._page = max(1, page)
        self._stopping = False
        #: Books whose server refused sync-collection (read with the query).
        self._no_sync: set[str] = set()
        metrics = metrics or Metrics()
        self._removed = metrics.counter(
            "mailhub_collector_removed_total",
            "Collected contacts removed by retention, by reason", ["reason"])
        self._passes = metrics.counter(
            "mailhub_collector_retention_passes_total", "Retention passes finished")
        self._last = metrics.gauge(
            "mailhub_collector_retention_pass_seconds", "Duration of the last retention pass")

    @property
    def enabled(self) -> bool:
        """Whether there is anything to do: max_contacts or expire_days set."""
        return self.max_contacts > 0 or self.expire_after > 0

    def stop(self) -> None:
        """Make a running pass end after the users it is working on."""
        self._stopping = True

    async def run_pass(self) -> PassReport:
        """One pass over every user of the user sources, a page at a time."""
        report = PassReport()
        started = time.monotonic()
        self._stopping = False
        window = DeferredSemaphore(self._concurrency)
        async for page in self._users.pages(self._page):
            if self._stopping:
                break
            ds = [window.run(self._one, user, report) for user in page]
            for d in ds:
                await d
            # Let the reactor turn between pages, even when every book was empty.
            await deferLater(self._clock, 0, lambda: None)
        report.seconds = time.monotonic() - started
        self._passes.inc()
        self._last.set(report.seconds)
        self.log.info("retention pass: {users} users, {cards} cards, {expired} expired, "
                      "{over} over the cap, {own} the users' own, {failed} users failed, "
                      "{seconds:.1f} s", users=report.users, cards=report.cards,
                      expired=report.expired, over=report.over_limit, own=report.users_own,
                      failed=report.failed, seconds=report.seconds)
        return report

    async def _one(self, user: User, report: PassReport) -> None:
        if self._stopping:
            return
        try:
            await self.prune(user, report)
        except (Unavailable, CardDAVError) as e:
            report.failed += 1  # tried again at the next pass
            self.log.warn("retention of {user}'s collected contacts failed: {why}",
                          user=user.login, why=str(e))
        except Exception:
            report.failed += 1
            self.log.failure("retention of {user}'s collected contacts failed", user=user.login)

    async def _read(self, book: str) -> list[Card] | None:
        """Every card of the book (None: no book), behind the collector's own requests.

        A sync-collection from the empty token where the server does them
        (Radicale answers it from its cache of the cards' text, where an
        addressbook-query parses every card to apply the filter: about a
        third of the work, measured on a 200-card book); else the
        addressbook-query every CardDAV server answers. A server that
        truncates the answer (507) is asked with the query too.
        """
        if book not in self._no_sync:
            try:
                changes = await self._dav.changes(book, "", urgent=False)
                if changes is None:
                    return None  # no book
                if not changes.more:
                    return changes.changed
            except (SyncRefused, TokenExpired):
                pass
            if len(self._no_sync) < 10_000:
                self._no_sync.add(book)
        return await self._dav.all_cards(book)

    async def prune(self, user: User, report: PassReport | None = None) -> list[Doomed]:
        """Apply the rules to one user's collected book; the contacts removed."""
        report = report if report is not None else PassReport()
        report.users += 1
        cards = await self._read(self._layout.book(user))
        if not cards:
            return []
        report.cards += len(cards)
        usage = self._usage
        assessed: list[tuple[Card, Assessed]] = []
        for start in range(0, len(cards), ASSESS_SLICE):
            if start:
                await deferLater(self._clock, 0, lambda: None)
            assessed.extend((card, assess(card.text))
                            for card in cards[start:start + ASSESS_SLICE])
        decision = choose(
            assessed, self._clock.seconds(), expire_after=self.expire_after,
            max_contacts=self.max_contacts,
            last_use=(lambda uid: usage.last_use(user.login, uid)) if usage else
            (lambda uid: None))
        report.users_own += decision.users_own
        if not decision.doomed:
            return []
        # Before anything is deleted: a deletion seen later (in a book's
        # copy) must not be taken for the user's own.
        await self.on_removed(user.login, [d.email for d in decision.doomed])
        removed = []
        for doomed in decision.doomed:
            if await self._dav.delete_if_match(doomed.card.url, doomed.card.etag):
                removed.append(doomed)
                self._removed.labels(reason=doomed.reason).inc()
                if doomed.reason == "expired":
                    report.expired += 1
                else:
                    report.over_limit += 1
                if usage is not None:
                    usage.drop(user.login, doomed.uid)
            else:
                report.kept_changed += 1  # edited meanwhile: the user's now
        if removed:
            self.log.info("removed {count} collected contacts of {user}",
                          count=len(removed), user=user.login)
        return removed


class RetentionService(Service):
    """Runs :meth:`Retention.run_pass` every ``interval`` seconds (first after ``first``)."""

    log = Logger()

    def __init__(self, retention: Retention, clock: IReactorTime, interval: float,
                 first: float = FIRST_PASS) -> None:
        self.retention = retention
        self._clock = clock
        self._interval = interval
        self._first = first
        self._loop: LoopingCall | None = None
        self._starting: Any = None
        self._running: Deferred[Any] | None = None

    def startService(self) -> None:
        super().startService()
        if not self.retention.enabled or self._interval <= 0:
            return
        self._starting = self._clock.callLater(self._first, self._start_loop)

    def _start_loop(self) -> None:
        self._starting = None
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: self.log.failure("the retention loop stopped", f))

    def tick(self) -> None:
        """Start a pass unless one is still running."""
        if self._running is not None:
            self.log.warn("a retention pass is still running: this one is skipped")
            return
        d = ensureDeferred(self.retention.run_pass())

        def done(result: Any) -> None:
            self._running = None
            if not isinstance(result, PassReport):
                self.log.failure("the retention pass failed", result)

        d.addBoth(done)
        if not d.called:
            self._running = d

    def stopService(self) -> Any:
        super().stopService()
        if self._starting is not None and self._starting.active():
            self._starting.cancel()
        self._starting = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.retention.stop()
        running = self._running
        return running

