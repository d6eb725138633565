"""Local copies of the address books the collector checks, kept exact by sync-collection.

Every collector message asks "has this user a card with this address in any
book?". Answered with an addressbook-query REPORT, that question costs the
server a reading of every card of every book: Radicale parses each one, under
the storage lock that also holds up every write, and the cost grows with the
book (64 ms at 200 cards, 290 ms at 1,000, against 13 and 38 ms for a PUT).

:class:`BookMirror` asks instead what changed since the last time
(sync-collection, RFC 6578: the server sends only the cards added or changed
and the hrefs removed) and answers the question from the copy. The copy is
brought up to date by every lookup before it is read, so it is never older
than the lookup: it finds what a query would have found (and spellings a
query misses, as addresses are compared by :func:`address_key`), and holds
nothing that another instance would need (each instance keeps its own copy,
and each is checked against the server).

Where the server does not do sync-collection on a book (or forgot the token
and refuses a fresh one), that book is asked with the query, as before, for
an hour before sync-collection is tried again. The copies are bounded
(``[collector] mirror_size``, counting each card and each book as one); the
books used least recently are dropped first, and a book larger than the
bound is not kept (it is queried).

A copy keeps of each card only what a lookup reads: its URL, ETag and the
EMAIL, FN and UID lines, and the X-MAILHUB-LAST-USED and -FIRST-SEEN dates
that say whether its ranking is due (a photo is never held). The cards :meth:`find`
returns are these summaries; whoever changes a card GETs it first.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Awaitable, Callable, Iterable
from urllib.parse import unquote, urlsplit

from cachetools import TTLCache
from twisted.internet.defer import DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailhub.collector.addresses import address_key
from mailhub.collector.carddav import Card, CardDAVClient, Changes, SyncRefused, TokenExpired
from mailhub.collector.vcard import X_FIRST_SEEN, X_LAST_USED, parse_vcard, split_line, unfold
from mailhub.errors import Unavailable
from mailhub.metrics import Metrics

#: Seconds a book is queried, once the server refused sync-collection on it
#: (or it was too large), before sync-collection is offered again.
QUERY_FOR = 3600.0
#: Books remembered as queried, at most (the oldest decisions go first).
QUERIED_MAX = 10_000
#: Lines of a card a copy keeps (what :func:`parse_vcard` reads for a lookup,
#: and the ranking's dates, so a use can tell whether the card's ranking is due).
_KEPT = frozenset(["EMAIL", "FN", "UID", X_LAST_USED, X_FIRST_SEEN])


#: Told which addresses went from a book and which came (see BookMirror.find).
Seen = Callable[[list[str], list[str]], Awaitable[None]]


def _href_key(url: str) -> str:
    """One spelling per resource: the unquoted path (servers vary in quoting and host)."""
    return unquote(urlsplit(url).path)


def _book_key(url: str) -> str:
    """One spelling per book: the PROPFIND's ``/alice%40x.org/b/`` and the
    configured ``/alice@x.org/b`` are the same book."""
    return _href_key(url).rstrip("/")


def summary(card: Card) -> Card:
    """``card`` with only the lines a lookup reads (see module docstring)."""
    lines = []
    for line in unfold(card.text):
        prop = split_line(line)
        if prop is not None and prop.name in _KEPT:
            lines.append(line)
    text = "BEGIN:VCARD\r\n%sEND:VCARD\r\n" % "".join(line + "\r\n" for line in lines)
    return Card(card.url, card.etag, text)


class _Copy:
    """One book as the server last said: its sync token, cards, and an index by address."""

    def __init__(self) -> None:
        self.token = ""
        self.cards: dict[str, Card] = {}
        self.keys: dict[str, frozenset[str]] = {}
        self.by_key: dict[str, set[str]] = {}
        self.lock = DeferredLock()
        #: Set when the book was forgotten while a lookup held the copy.
        self.stale = False
        #: Address keys whose last card went away, and keys of cards added
        #: or changed, since the last time they were told (see BookMirror.find).
        self.gone: set[str] = set()
        self.came: set[str] = set()
        #: Cards mailhub created since: href -> (write number, address keys).
        #: One absent after a sync that started after the write was deleted
        #: (a sync from an older token may not mention it at all).
        self.written: dict[str, tuple[int, frozenset[str]]] = {}

    def clear(self) -> None:
        self.token = ""
        self.cards.clear()
        self.keys.clear()
        self.by_key.clear()
        # Read afresh, a book says nothing of what went away meanwhile.
        self.gone.clear()
        self.came.clear()

    def apply(self, changes: Changes) -> None:
        removed: set[str] = set()
        for href in changes.removed:
            removed.update(self.keys.get(_href_key(href), ()))
            self._forget(_href_key(href))
        for card in changes.changed:
            href = _href_key(card.url)
            self._forget(href)
            kept = summary(card)
            keys = frozenset(k for k in map(address_key, parse_vcard(kept.text).emails) if k)
            self.cards[href] = kept
            self.keys[href] = keys
            for key in keys:
                self.by_key.setdefault(key, set()).add(href)
            self.came.update(keys)
        self.gone.update(k for k in removed if k not in self.by_key)
        self.gone.difference_update(self.by_key.keys() & self.gone)
        self.token = changes.token

    def _forget(self, href: str) -> None:
        self.cards.pop(href, None)
        for key in self.keys.pop(href, ()):
            hrefs = self.by_key.get(key)
            if hrefs is not None:
                hrefs.discard(href)
                if not hrefs:
                    del self.by_key[key]

    def find(self, keys: Iterable[str]) -> list[Card]:
        hrefs = {href for key in keys for href in self.by_key.get(key, ())}
        return [self.cards[href] for href in sorted(hrefs)]


class BookMirror:
    """Cards of a book by address, from a copy synced before every read.

    ``size`` bounds what the copies hold over all books (each card and each
    book counts one); 0 keeps no copy at all (every lookup is an
    addressbook-query).
    """

    log = Logger()

    def __init__(self, dav: CardDAVClient, size: int, clock: IReactorTime,
                 metrics: Metrics | None = None) -> None:
        self._dav = dav
        self._size = size
        self._clock = clock
        self._held = 0
        #: Writes noted so far (see written()).
        self._writes = 0
        # Least recently used first. Not a cachetools map: a copy weighs its
        # cards, which change after it is stored, and one a lookup holds
        # (its lock taken) must not be evicted under it (see _evict).
        self._copies: OrderedDict[str, _Copy] = OrderedDict()
        #: Books asked with the query for QUERY_FOR seconds (on the reactor's
        #: clock): no sync-collection there, or too large to keep.
        self._queried: TTLCache[str, bool] = TTLCache(
            maxsize=QUERIED_MAX, ttl=QUERY_FOR, timer=clock.seconds)
        metrics = metrics or Metrics()
        metrics.gauge_callback("mailhub_collector_mirror_cards",
                               "Cards held in the local copies of users' address books",
                               lambda: self._held)
        self._syncs = metrics.counter(
            "mailhub_collector_mirror_syncs_total",
            "sync-collection requests made to bring a book's copy up to date", ["kind"])

    def __len__(self) -> int:
        """Cards held now, over all books."""
        return self._held

    async def find(self, book: str, keys: Iterable[str], spellings: Iterable[str],
                   seen: Seen | None = None) -> list[Card]:
        """Cards of ``book`` having an email whose :func:`address_key` is in ``keys``.

        ``spellings`` are the forms to ask for where the book is queried
        instead (see :meth:`CardDAVClient.find_emails`).

        ``seen`` (optional) is told, after a sync-collection and before the
        answer, which addresses lost their last card in the book since it
        was last told (first argument) and which were added or changed
        (second): the collector's tombstones (:mod:`mailhub.collector.state`).
        A book read whole (first read, forgotten token) tells no removal.
        When ``seen`` fails, what it was to be told is kept for the next time.
        """
        if self._size > 0 and not self._is_queried(book):
            copy = await self._synced(book, seen)
            if copy is not None:
                return copy.find(keys)
        return await self._dav.find_emails(book, spellings)

    def forget(self, book: str) -> None:
        """Drop the copy of ``book`` (it is gone, or about to be made anew).

        A book made again at the same URL may start its sync tokens afresh;
        an old token could then read as "nothing changed" on some servers.
        """
        key = _book_key(book)
        copy = self._copies.get(key)
        if copy is not None and not copy.lock.locked:
            self._drop(key)
        elif copy is not None:
            copy.stale = True  # dropped by the lookup that holds it

    def written(self, book: str, url: str, keys: Iterable[str]) -> None:
        """mailhub created the card at ``url`` (with addresses ``keys``) in
        ``book``: if a later sync no longer finds it, it was deleted, and
        ``seen`` is told so (see :meth:`find`). Call it once the server
        answered the PUT."""
        if self._size <= 0 or self._is_queried(book):
            return
        copy = self._copies.get(_book_key(book))
        if copy is None:
            copy = self._copies[_book_key(book)] = _Copy()
        self._writes += 1
        copy.written[_href_key(url)] = (self._writes, frozenset(keys))

    def _is_queried(self, book: str) -> bool:
        return _book_key(book) in self._queried

    def _query_from_now_on(self, book: str) -> None:
        key = _book_key(book)
        self._queried[key] = True
        self._drop(key)

    async def _synced(self, book: str, seen: Seen | None = None) -> _Copy | None:
        """The copy of ``book``, brought up to date now; None to query it instead."""
        key = _book_key(book)
        copy = self._copies.get(key)
        if copy is None:
            copy = self._copies[key] = _Copy()
        self._copies.move_to_end(key)
        async with copy.lock:
            if self._copies.get(key) is not copy or self._is_queried(book):
                # Dropped or decided while this lookup waited: start again.
                return None if self._is_queried(book) else await self._synced(book, seen)
            if copy.stale:
                copy.stale = False
                self._held -= len(copy.cards)
                copy.clear()
                copy.written.clear()
            before = len(copy.cards)
            refused: SyncRefused | None = None
            # Writes noted until now were answered before this sync starts.
            mark = self._writes
            try:
                await self._catch_up(book, copy)
                self._judge_writes(copy, mark)
            except SyncRefused as e:
                refused = e
            finally:
                # Also when the server failed half-way: what was applied stands.
                self._held += len(copy.cards) - before
            if refused is not None:
                self.log.info("{book} is queried, not copied: {why}", book=book, why=refused)
            elif len(copy.cards) + 1 > self._size:
                self.log.info("{book} has {count} cards, more than [collector] mirror_size: "
                              "it is queried, not copied", book=book, count=len(copy.cards))
            else:
                self._evict(keep=key)
                if seen is not None and (copy.gone or copy.came):
                    gone, came = sorted(copy.gone), sorted(copy.came)
                    await seen(gone, came)
                    copy.gone.difference_update(gone)
                    copy.came.difference_update(came)
                elif seen is None:  # nobody asks about this book
                    copy.gone.clear()
                    copy.came.clear()
                return copy
            self._query_from_now_on(book)
            return None

    @staticmethod
    def _judge_writes(copy: _Copy, mark: int) -> None:
        """Cards mailhub wrote before the sync that the sync did not find: deleted."""
        for href, (number, keys) in list(copy.written.items()):
            if number <= mark:
                del copy.written[href]
                if href not in copy.cards:
                    copy.gone.update(k for k in keys if k not in copy.by_key)

    async def _catch_up(self, book: str, copy: _Copy) -> None:
        fresh = not copy.token
        while True:
            sent = copy.token
            self._syncs.labels(kind="full" if fresh else "changes").inc()
            try:
                changes = await self._dav.changes(book, sent)
            except TokenExpired:
                if not sent:
                    raise SyncRefused("the server refused the empty sync token")
                # Forgotten by the server (Radicale keeps tokens for 30 days):
                # read the whole book again.
                copy.clear()
                fresh = True
                continue
            if changes is None:  # the book went away
                copy.clear()
                copy.written.clear()
                return
            if sent and changes.token != sent and not (changes.changed or changes.removed):
                # A new token and nothing to tell: the server does not know
                # the old token as this copy does (a book made anew at the
                # same URL). Read the whole book again.
                copy.clear()
                fresh = True
                continue
            if changes.more and changes.token == sent and not (changes.changed or
                                                               changes.removed):
                raise Unavailable("the CardDAV server truncated a sync-collection of %s "
                                  "without sending anything" % book)
            copy.apply(changes)
            if not changes.more:
                return
            fresh = False

    def _drop(self, key: str) -> None:
        copy = self._copies.pop(key, None)
        if copy is not None:
            self._held -= len(copy.cards)
            copy.clear()

    def _evict(self, keep: str) -> None:
        """Drop the least recently used copies while more is held than allowed."""
        for key in list(self._copies):
            if self._held + len(self._copies) <= self._size:
                return
            if key != keep and not self._copies[key].lock.locked:
                self._drop(key)
