"""The contact collector: a ``collector:email`` message in, collected contacts out.

:meth:`CollectorEngine.handle` is the work queue's handler: it takes the raw
message body and returns a Deferred that fires when every address of the
message is written or decided (then the queue acks). It fails with
:class:`~mailhub.errors.ValidationError` for a message that can never succeed
(dead-letter: not JSON, no user, unknown user, no emails) and with
:class:`~mailhub.errors.Unavailable` (or a CardDAV error) for a transient
failure (the queue retries; nothing is lost, and a redelivery is harmless
because every write is idempotent).

The user is found by userId or userEmail; an ESN calendar event's owner
(an ESN id) through the site's mapping, else by the event's organizer (see
:class:`~mailhub.collector.rules.EsnIds`). A calendar event collects nothing
for a user who does not organise it ([collector] calendar = organizer).

For each address, in order: reject what is not an address; skip the user's
own addresses; skip the addresses never collected (robots, bounces, the
site's lists, configured domains: :class:`~mailhub.collector.rules.Exclusions`);
skip what the user decided (:class:`~mailhub.collector.state.CollectorState`:
an opted-out user collects nothing, and no book is made for them; blocked
addresses; addresses whose card the user deleted, seen by the book's copy);
skip addresses of site users ([collector] skip_site_users);
skip addresses with a contact in any of the user's books (read from a local
copy of each book that a sync-collection REPORT brings up to date first, or
with an exact-email addressbook-query; one lookup shared by the messages of
one user that are in flight: see :class:`Coalescer` and
:class:`~mailhub.collector.mirror.BookMirror`); fill in the display name of an
existing *collected* contact that has none; create the rest with
``If-None-Match: *`` at a UID derived from the address, so each address is
one contact across redeliveries and competing instances, in the vCard
version the book's ``supported-address-data`` offers (4.0, else 3.0), saying
where it came from (NOTE and X-MAILHUB-* properties, from the message's
:class:`~mailhub.collector.rules.Origin`). Each
creation (201/204, never 412) publishes ``contacts:contact:add`` once.

Ranking ([collector] rank): a card is created with X-MAILHUB-COUNT 1 and
X-MAILHUB-LAST-USED now; each later message naming a contact of the
collected book counts a use in memory (:class:`~mailhub.collector.retention.Usage`),
and the card is rewritten with its new count only when its LAST-USED is a
day old, so re-collecting stays free of PUTs but for one per contact a day.

A message names at most [collector] max_addresses addresses: the first ones
are collected and the message is then dead-lettered with the reason. One
message keeps at most [carddav] concurrency PUTs queued, so it never holds
up another user's message for long.

The cache of known addresses holds only "this contact exists" answers (and
whether anything could still be filled in), for [collector] cache_ttl
seconds: a stale entry can only delay the re-collection of a contact the user
deleted, never create a duplicate. An entry for a contact of the collected
book is used only once the book's copy, brought up to date (one
sync-collection shared by the user's messages in flight, see
:class:`~mailhub.collector.mirror.BookMirror`), still holds the address: a
deleted or re-created book, or a deleted contact, is noticed at the next
message. Entries for contacts in the user's other books are trusted until
they expire.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from functools import partial
from typing import Any, Awaitable, Callable, Iterable, TypeVar
from urllib.parse import urljoin

import attrs
from cachetools import LRUCache, TTLCache
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailhub.collector.addresses import (
    Parsed, Recipient, Rejected, address_key, parse_entries,
)
from mailhub.collector.carddav import (
    Book, BookLayout, BookMissing, Card, CardDAVClient, CardDAVError, same_collection,
)
from mailhub.collector.mirror import BookMirror
from mailhub.collector.retention import RANK_INTERVAL, Usage
from mailhub.collector.rules import DEFAULT_NOTE, EsnIds, Exclusions, Origin, note_text
from mailhub.collector.state import OPTED_OUT, CollectorState
from mailhub.collector.vcard import (
    Contact, choose_version, contact_uuid, parse_vcard, ranking_of, to_jcard, to_vcard,
    with_name, with_ranking,
)
from mailhub.decoding import decode_json_object
from mailhub.directory.model import User
from mailhub.errors import ValidationError
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub

CONTACT_ADDED = "contacts:contact:add"
T = TypeVar("T")
#: Entries parsed between two turns of the reactor (parsing costs about
#: 0.6 ms per address: a long list parsed at once would stall everything).
PARSE_SLICE = 50
#: Site-user checks one message has in flight at most (LDAP is shared).
FIND_WINDOW = 16
#: Control characters (C0 and DEL): never part of a login, an id or an address.
_CONTROL = re.compile("[\x00-\x1f\x7f]")


@attrs.define
class Outcome:
    """What one message did: addresses created, named, skipped (by reason), rejected."""

    user: str
    created: list[str] = attrs.Factory(list)
    named: list[str] = attrs.Factory(list)
    skipped: dict[str, list[str]] = attrs.Factory(dict)
    rejected: list[tuple[str, str]] = attrs.Factory(list)
    #: Entries of ``emails`` (or addresses) left out: over [collector] max_addresses.
    over: int = 0

    def skip(self, reason: str, address: str) -> None:
        self.skipped.setdefault(reason, []).append(address)


class OptedOut(Exception):
    """The user deleted their collected book: collection is off for them."""


class KnownAddresses:
    """Bounded, expiring memory of addresses that have a contact, per user.

    The value says whether the contact is *final*: it has a display name, or
    it is not in the collected book (so nothing will ever be filled in). A
    contact without a name is only a shortcut for messages that bring no
    name either.
    """

    def __init__(self, clock: IReactorTime, ttl: float, size: int) -> None:
        #: (user, key) -> (final, in the collected book); expires ttl seconds
        #: after it was remembered (on the reactor's clock), the least
        #: recently used dropped first.
        self._entries: TTLCache[tuple[str, str], tuple[bool, bool]] | None = (
            TTLCache(maxsize=size, ttl=ttl, timer=clock.seconds)
            if size > 0 and ttl > 0 else None)

    def __len__(self) -> int:
        return len(self._entries) if self._entries is not None else 0

    def known(self, user: str, key: str, has_name: bool) -> bool:
        """True when the address is known to need no work for this message."""
        return self.where(user, key, has_name) is not None

    def where(self, user: str, key: str, has_name: bool) -> bool | None:
        """None when the address is not known to need no work for this message;
        else whether its contact is in the collected book (True) or another one."""
        if self._entries is None:
            return None
        entry = self._entries.get((user, key))
        if entry is None:
            return None
        final, collected = entry
        return collected if final or not has_name else None

    def remember(self, user: str, key: str, final: bool, collected: bool = True) -> None:
        """Remember that the address has a contact (in the collected book or not)."""
        if self._entries is not None:
            self._entries[(user, key)] = (final, collected)

    def forget(self, user: str, key: str | None = None) -> None:
        """Forget one address of a user, or (key None) every address of the user."""
        if self._entries is None:
            return
        if key is not None:
            self._entries.pop((user, key), None)
            return
        for entry in [k for k in self._entries if k[0] == user]:
            self._entries.pop(entry, None)


class _Batch:
    """Recipients of the messages waiting for one user's next lookup, and their waiters."""

    def __init__(self, user: User) -> None:
        self.user = user
        self.recipients: list[Recipient] = []
        self.waiters: list[Deferred[dict[str, list[Card]]]] = []


class Coalescer:
    """At most one book lookup per user in flight; messages arriving meanwhile share the next.

    Radicale (like most CardDAV servers) answers an addressbook-query by
    reading every card of the book, under a storage lock that also holds up
    every write. One lookup per message made the collector read each book
    once per message; with up to ``prefetch`` messages of one user in flight
    (a mailing, a calendar invitation to many), that was most of the server's
    work. Here the first message of a user starts its lookup at once (no
    added delay); messages for that user arriving while it runs wait and go
    together into the next one, a single PROPFIND plus one REPORT per book for
    the whole batch.

    ``ready`` (optional) is awaited before a batch is closed and looked up:
    the CardDAV client's :meth:`~CardDAVClient.when_short`, which fires at
    once unless a full round of PUTs is already waiting for the server. While
    the server has that much writing queued, a lookup would gain nothing by
    starting, and the batch keeps gathering messages; it starts while PUTs
    are still queued, so the server never waits for it.

    Each lookup starts after every message it answers
    arrived, so each message still sees the books as they were when it was
    handled, exactly as before. A failed lookup fails every message that
    waited for it (each is retried by its queue); none is dropped. Other
    users' lookups never wait for this user's.
    """

    log = Logger()

    def __init__(self, find: Callable[[User, list[Recipient]],
                                      Awaitable[dict[str, list[Card]]]],
                 ready: Callable[[], Awaitable[None]] | None = None) -> None:
        self._find = find
        self._ready = ready
        self._running: set[str] = set()
        self._next: dict[str, _Batch] = {}

    def __len__(self) -> int:
        """How many users have a lookup running or waiting (for tests and metrics)."""
        return len(self._running | set(self._next))

    def lookup(self, key: str, user: User,
               recipients: list[Recipient]) -> Deferred[dict[str, list[Card]]]:
        """Cards by address key for ``recipients``, from a lookup that starts no earlier than now.

        ``key`` names the user's books (the collected book's URL). The result
        may hold more keys (other messages of the batch); read only yours.
        """
        batch = self._next.get(key)
        if batch is None:
            batch = self._next[key] = _Batch(user)
        batch.recipients.extend(recipients)
        d: Deferred[dict[str, list[Card]]] = Deferred()
        batch.waiters.append(d)
        if key not in self._running:
            self._running.add(key)
            Deferred.fromCoroutine(self._drain(key))
        return d

    async def _drain(self, key: str) -> None:
        try:
            while key in self._next:
                if self._ready is not None:
                    try:
                        await self._ready()
                    except Exception:
                        # Waiting is only an optimisation: look up now.
                        self.log.failure("waiting for the CardDAV queue failed")
                batch = self._next.pop(key)
                try:
                    found = await self._find(batch.user, batch.recipients)
                except Exception:
                    failure = Failure()
                    for d in batch.waiters:
                        if not d.called:  # a waiter may have been cancelled
                            d.errback(failure)
                else:
                    for d in batch.waiters:
                        if not d.called:
                            d.callback(found)
        finally:
            self._running.discard(key)


async def _settle(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Await every call; when one failed, raise the first failure after all settled."""
    ds = [Deferred.fromCoroutine(c) if not isinstance(c, Deferred) else c  # type: ignore
          for c in calls]
    results = await DeferredList(ds, consumeErrors=True)
    out = []
    for ok, value in results:
        if not ok:
            value.raiseException()
        out.append(value)
    return out


async def _windowed(calls: list[Callable[[], Awaitable[T]]], width: int) -> list[T]:
    """:func:`_settle` with at most ``width`` of the calls started and unfinished.

    One message's requests then queue behind each other, not in front of
    every other message's: a large message holds ``width`` places in the
    CardDAV client's queue (or the user sources'), and memory for as many.
    """
    window = DeferredSemaphore(max(1, width))

    def start(call: Callable[[], Awaitable[T]]) -> Deferred[T]:
        def run() -> Deferred[T]:
            result = call()
            if isinstance(result, Deferred):
                return result
            return Deferred.fromCoroutine(result)  # type: ignore[arg-type]
        return window.run(run)

    return await _settle(start(call) for call in calls)


class CollectorEngine:
    """Turns collector messages into contacts in each user's ``collected`` book."""

    log = Logger()

    def __init__(self, users: Any, carddav: CardDAVClient, layout: BookLayout, hub: Hub,
                 metrics: Metrics, clock: IReactorTime, *, skip_site_users: bool = True,
                 cache_ttl: float = 600.0, cache_size: int = 100_000,
                 mirror_size: int = 50_000,
                 book_display_name: str = "Collected contacts",
                 max_addresses: int = 1000, calendar: str = "organizer",
                 exclusions: Exclusions | None = None, esn_ids: EsnIds | None = None,
                 note: str = DEFAULT_NOTE, rank: bool = True,
                 state: CollectorState | None = None) -> None:
        if calendar not in ("organizer", "all"):
            raise ValueError("calendar must be organizer or all, not %r" % calendar)
        self._users = users
        self._calendar = calendar
        self._exclusions = exclusions or Exclusions()
        self.esn_ids = esn_ids or EsnIds()
        self._note = note
        #: Each user's tombstones, opt-out and block list (None: no such rules).
        self.state = state
        self._dav = carddav
        self._layout = layout
        self._hub = hub
        self._clock = clock
        self._skip_site_users = skip_site_users
        self._book_display_name = book_display_name
        self._max_addresses = max(1, max_addresses)
        #: PUTs one message has queued at most: the CardDAV client's
        #: concurrency, so another message's PUT waits behind a few, not
        #: behind a whole large message.
        self._put_window = max(1, carddav.concurrency)
        self.known = KnownAddresses(clock, cache_ttl, cache_size)
        #: Uses of collected contacts not yet written into their cards
        #: ([collector] rank; see mailhub.collector.retention).
        self.usage: Usage | None = (Usage(clock, RANK_INTERVAL, max(1, cache_size))
                                    if rank else None)
        self.books = BookMirror(carddav, mirror_size, clock, metrics)
        self.lookups = Coalescer(self._find, carddav.when_short)
        #: Checks that known contacts are still in the collected book, shared
        #: like lookups by the messages of a user in flight together.
        self.checks = Coalescer(self._in_collected)
        #: The vCard version each collected book takes, from its
        #: supported-address-data (learnt by each lookup, for free).
        self._versions: LRUCache[str, str] = LRUCache(maxsize=max(1, cache_size))
        self._asking: dict[str, list[Deferred[str]]] = {}
        self._messages = metrics.counter(
            "mailhub_collector_messages_total", "Collector messages handled, by outcome",
            ["outcome"])
        self._collected = metrics.counter(
            "mailhub_collector_collected_total", "Contacts created in collected books")
        self._named = metrics.counter(
            "mailhub_collector_named_total", "Existing collected contacts given a display name")
        self._skipped = metrics.counter(
            "mailhub_collector_skipped_total", "Addresses not collected, by reason", ["reason"])
        self._failed = metrics.counter(
            "mailhub_collector_failed_total",
            "Messages that failed: poison (dead-lettered) or transient (retried)", ["kind"])
        self._ranked = metrics.counter(
            "mailhub_collector_ranked_total",
            "Collected contacts whose ranking (X-MAILHUB-COUNT, X-MAILHUB-LAST-USED) "
            "was written")
        self._publish_failed = metrics.counter(
            "mailhub_collector_publish_failed_total",
            "contacts:contact:add publications that failed")

    # -- the queue's handler ------------------------------------------------

    def handle(self, body: bytes) -> Deferred[Outcome]:
        """The work-queue handler: collect one message body (JSON bytes)."""
        d = Deferred.fromCoroutine(self._handle(body))

        def failed(failure: Any) -> Any:
            kind = "poison" if failure.check(ValidationError) else "transient"
            self._failed.labels(kind=kind).inc()
            self._messages.labels(outcome=kind).inc()
            return failure

        def done(outcome: Outcome) -> Outcome:
            self._messages.labels(outcome="done").inc()
            self.log.info("collected {created} of {total} addresses for {user}",
                          created=len(outcome.created),
                          total=len(outcome.created) + len(outcome.named)
                          + sum(len(v) for v in outcome.skipped.values()) + len(outcome.rejected),
                          user=outcome.user)
            return outcome

        return d.addCallbacks(done, failed)

    async def _handle(self, body: bytes) -> Outcome:
        message = decode_message(body)
        user = await self._resolve(message)
        try:
            outcome = await self.collect(user, message["emails"], Origin.of_message(message))
        except CardDAVError as e:
            # An answer no retry will change (a 4xx other than those that mean
            # "busy" or "not there"): retrying would hold the message for ever.
            raise ValidationError("the CardDAV server refused the work: %s" % e)
        if outcome.over:
            # The first max_addresses are collected; the message goes to the
            # dead letters, where an operator sees what was left out and why.
            self.log.warn("a collector message for {user} names more than {limit} "
                          "addresses: {created} collected, {over} left out",
                          user=user.login, limit=self._max_addresses,
                          created=len(outcome.created), over=outcome.over)
            raise ValidationError(
                "more addresses than [collector] max_addresses = %d: the first %d were "
                "collected or decided (%d created), %d more entries were left out"
                % (self._max_addresses, self._max_addresses, len(outcome.created),
                   outcome.over))
        return outcome

    async def _resolve(self, message: dict[str, Any]) -> User:
        for field in ("userId", "userEmail"):
            value = message.get(field)
            if isinstance(value, str) and _CONTROL.search(value):
                # No user has one, and PostgreSQL refuses NUL outright: a
                # lookup would fail on every retry instead of ending here.
                raise ValidationError("%s holds a control character: %s"
                                      % (field, ascii(value)[:80]))
        user = await self._find_owner(message)
        if user is None:
            # The site's users are answered from memory, which follows the
            # database every [database] poll_interval: a user made a moment
            # ago (by the CLI, by another instance) may not be there yet.
            # Catch up once before calling the message poison.
            await self._users.catch_up()
            user = await self._find_owner(message)
        if user is None:
            tried = ["%s %r" % (field, message[field]) for field in ("userId", "userEmail")
                     if message.get(field)]
            raise ValidationError("unknown user (%s)" % ", ".join(tried))
        return user

    async def _find_owner(self, message: dict[str, Any]) -> User | None:
        """The user a message is for: by userId or userEmail; else (a calendar
        event from OpenPaaS names its owner by ESN id) by the ESN id where the
        site maps it; else by the event's organizer, when a site user (their
        own action: what they organise)."""
        user = await self._find_user(message)
        if user is not None:
            return user
        user_id = message.get("userId")
        if user_id:
            user = await self.esn_ids.find(user_id)
            if user is not None:
                return user
        organizer = message.get("organizer")
        if message.get("source") == "calendar" and isinstance(organizer, str) and organizer:
            found = await self._users.find(organizer)
            return found  # type: ignore[no-any-return]
        return None

    async def _find_user(self, message: dict[str, Any]) -> User | None:
        for field in ("userId", "userEmail"):
            name = message.get(field)
            if name:
                user = await self._users.find(name)
                if user is not None:
                    return user  # type: ignore[no-any-return]
        return None

    # -- collecting -----------------------------------------------------------

    async def collect(self, user: User, entries: Iterable[object],
                      origin: Origin | None = None) -> Outcome:
        """Collect the addresses of ``entries`` for ``user``; the Outcome says what happened.

        ``origin`` (default: the queue, unsaid) is written into each card
        created; with [collector] calendar = organizer, a calendar event the
        user does not organise collects nothing (reason ``not_organizer``).
        """
        origin = origin or Origin()
        parsed, over = await self._parse(entries)
        outcome = Outcome(user=user.login, over=over)
        if over:
            self._skipped.labels(reason="over_limit").inc(over)
        if (origin.source == "calendar" and self._calendar == "organizer"
                and origin.organizer and not user.owns(origin.organizer)):
            # An invitation received (spam invitations included) is not the
            # user's own action: nothing of it is collected.
            for r in parsed.recipients:
                self._skip(outcome, "not_organizer", r)
            for bad in parsed.rejected:
                outcome.rejected.append((bad.raw, bad.reason))
                self._skipped.labels(reason="invalid").inc()
            return outcome
        for bad in parsed.rejected:
            outcome.rejected.append((bad.raw, bad.reason))
            self._skipped.labels(reason="invalid").inc()
        own = {k for k in (address_key(a) for a in (user.login, *user.emails)) if k}
        todo: list[Recipient] = []
        in_collected: list[Recipient] = []
        exclusions = self._exclusions
        mine = await self.state.of(user.login) if self.state is not None else None
        if mine is not None and not mine.collect:
            # The user opted out (mailhub user set collect=off, or deleted
            # the collected book): nothing is collected, no book is made.
            for r in parsed.recipients:
                if r.key in own or user.owns(r.email):
                    self._skip(outcome, "own", r)
                else:
                    self._skip(outcome, OPTED_OUT, r)
            return outcome
        now = self._clock.seconds()
        forget = self.state.forget_seconds if self.state is not None else 0.0
        for r in parsed.recipients:
            if r.key in own or user.owns(r.email):
                self._skip(outcome, "own", r)
                continue
            excluded = exclusions.reason(r.key)
            if excluded is None and mine is not None:
                excluded = mine.skip_reason(r.key, now, forget)
            if excluded is not None:
                self._skip(outcome, excluded, r)
                continue
            where = self.known.where(user.login, r.key, bool(r.name))
            if where is None:
                todo.append(r)
            elif where:
                in_collected.append(r)
            else:
                self._skip(outcome, "exists", r)
        todo = await self._not_site_users(todo, outcome)
        if in_collected and todo:
            # Known, but the book (or the card) may have been deleted since.
            # The lookup these new addresses need reads the collected book
            # anyway: it answers for the known ones too (they passed the
            # site-user check when they were first decided).
            todo.extend(in_collected)
        elif in_collected:
            # Only known ones: ask the collected book's copy alone, brought
            # up to date (one sync-collection, shared by the user's messages).
            found = await self.checks.lookup(self._layout.book(user), user, in_collected)
            used = []
            for r in in_collected:
                if found.get(r.key):
                    self._skip(outcome, "exists", r)
                    used.append(self._use(user, r, found[r.key][0]))
                else:
                    self.known.forget(user.login, r.key)
                    todo.append(r)
            await _settle(used)
            todo = await self._not_site_users(todo, outcome)
        if todo:
            await self._write(user, todo, outcome, origin)
        return outcome

    async def _not_site_users(self, todo: list[Recipient],
                              outcome: Outcome) -> list[Recipient]:
        """``todo`` without the site users' addresses ([collector] skip_site_users)."""
        if not todo or not self._skip_site_users:
            return todo
        site = await _windowed([partial(self._users.find, r.email) for r in todo],
                               FIND_WINDOW)
        remaining = []
        for r, found in zip(todo, site):
            if found is not None:
                self._skip(outcome, "site_user", r)
            else:
                remaining.append(r)
        return remaining

    async def _parse(self, entries: Iterable[object]) -> tuple[Parsed, int]:
        """The first [collector] max_addresses addresses of ``entries``, and how many
        entries (or addresses of list entries) were left out.

        Parsed a slice at a time, letting the reactor turn between slices.
        Each address once, as :func:`parse_entries` gives them.
        """
        kept = list(entries)
        over = max(0, len(kept) - self._max_addresses)
        kept = kept[:self._max_addresses]
        by_key: dict[str, Recipient] = {}
        rejected: list[Rejected] = []
        for start in range(0, len(kept), PARSE_SLICE):
            if start:
                await deferLater(self._clock, 0, lambda: None)
            part = parse_entries(kept[start:start + PARSE_SLICE])
            rejected.extend(part.rejected)
            for r in part.recipients:
                known = by_key.get(r.key)
                if known is None or (not known.name and r.name):
                    by_key[r.key] = r
        recipients = list(by_key.values())
        over += max(0, len(recipients) - self._max_addresses)
        return Parsed(tuple(recipients[:self._max_addresses]), tuple(rejected)), over

    def _skip(self, outcome: Outcome, reason: str, r: Recipient) -> None:
        outcome.skip(reason, r.email)
        self._skipped.labels(reason=reason).inc()

    async def _in_collected(self, user: User,
                            todo: list[Recipient]) -> dict[str, list[Card]]:
        """Cards by key for ``todo`` in the collected book alone (none when it is gone)."""
        by_key: dict[str, list[Card]] = {r.key: [] for r in todo}
        spellings = [s for r in todo for s in (r.forms or (r.email,))]
        for card in await self.books.find(self._layout.book(user), by_key, spellings,
                                          self._seen(user, True)):
            for email in parse_vcard(card.text).emails:
                key = address_key(email)
                if key in by_key and card not in by_key[key]:
                    by_key[key].append(card)
        return by_key

    async def _find(self, user: User, todo: list[Recipient]) -> dict[str, list[Card]]:
        """One lookup for a batch: cards by key in any of the user's books.

        Lists the books (PROPFIND), reads the batch's addresses in each (from
        its copy, brought up to date with sync-collection, or with an
        addressbook-query REPORT: see :class:`BookMirror`), and makes the
        collected book when it is missing and some address has no card yet
        (every such address is about to be PUT).
        """
        collected = self._layout.book(user)
        books = await self._dav.books(self._layout.home(user))
        by_key: dict[str, list[Card]] = {r.key: [] for r in todo}
        spellings = [s for r in todo for s in (r.forms or (r.email,))]
        collected_books = [same_collection(b.url, collected) for b in books]
        for found in await _settle(
                self.books.find(b.url, by_key, spellings, self._seen(user, is_collected))
                for b, is_collected in zip(books, collected_books)):
            for card in found:
                for email in parse_vcard(card.text).emails:
                    key = address_key(email)
                    if key in by_key and card not in by_key[key]:
                        by_key[key].append(card)
        mine = [b for b, is_collected in zip(books, collected_books) if is_collected]
        if mine:
            self._learn_version(collected, mine[0].versions)
            if self.state is not None:
                await self.state.saw_book(user.login)
        else:
            self.books.forget(collected)  # gone: a book made anew starts afresh
            if not all(by_key.values()):
                await self._book_gone(user)
                await self._make_book(collected, books)
                if self.state is not None:
                    await self.state.saw_book(user.login)
        return by_key

    async def _book_gone(self, user: User) -> None:
        """The collected book is missing: if mailhub had seen it, the user
        deleted it, which turns collection off for them (raises OptedOut)."""
        if self.state is None:
            return
        state = await self.state.of(user.login)
        if not state.collect:
            raise OptedOut(user.login)
        if state.book_seen and self.state.book_opt_out:
            self.known.forget(user.login)
            await self.state.book_deleted(user.login)
            raise OptedOut(user.login)

    def _seen(self, user: User, collected: bool) -> Callable[[list[str], list[str]],
                                                             Awaitable[None]] | None:
        """What a book's copy tells after a sync (see BookMirror.find): an
        address gone from the collected book is tombstoned; one added to any
        book lifts its tombstone."""
        state = self.state
        if state is None:
            return None

        async def seen(gone: list[str], came: list[str]) -> None:
            if came:
                await state.present(user.login, came)
            if gone and collected and state.forget:
                for key in gone:
                    self.known.forget(user.login, key)
                await state.deleted(user.login, gone)
        return seen

    async def _make_book(self, collected: str, siblings: list[Book]) -> None:
        """Create the collected book, and learn which vCard version it takes.

        From the user's other books where the home has some (one server, one
        answer; no request), else from the new book (PROPFIND Depth 0).
        """
        await self._dav.create_book(collected, self._book_display_name)
        if siblings:
            self._learn_version(collected, siblings[0].versions)
        else:
            self._versions.pop(collected, None)  # _version asks the new book

    def _learn_version(self, collected: str, offered: tuple[str, ...]) -> None:
        """Remember the vCard version to write into a collected book."""
        self._versions[collected] = choose_version(offered)

    async def _version(self, collected: str) -> str:
        """The vCard version the collected book takes (asked once if not known)."""
        version = self._versions.get(collected)
        if version is not None:
            return version
        waiters = self._asking.get(collected)
        if waiters is not None:  # the PUTs of one message share one PROPFIND
            d: Deferred[str] = Deferred()
            waiters.append(d)
            return await d
        waiters = self._asking[collected] = []
        try:
            made = await self._dav.book(collected)
        except Exception:
            failure = Failure()
            for d in self._asking.pop(collected, []):
                d.errback(failure)
            raise
        self._learn_version(collected, made.versions if made is not None else ())
        version = self._versions[collected]
        for d in self._asking.pop(collected, []):
            d.callback(version)
        return version

    async def _write(self, user: User, todo: list[Recipient], outcome: Outcome,
                     origin: Origin) -> None:
        collected = self._layout.book(user)
        home = self._layout.home(user)
        try:
            by_key = await self.lookups.lookup(collected, user, todo)
        except OptedOut:
            for r in todo:
                self._skip(outcome, OPTED_OUT, r)
            return
        mine_state = await self.state.of(user.login) if self.state is not None else None
        new: list[Recipient] = []
        fills: list[Awaitable[None]] = []
        for r in todo:
            cards = by_key[r.key]
            if not cards:
                if mine_state is not None:
                    # The lookup's sync may have just seen the user delete it.
                    if not mine_state.collect:
                        self._skip(outcome, OPTED_OUT, r)
                        continue
                    excluded = mine_state.skip_reason(r.key, self._clock.seconds(),
                                                      self.state.forget_seconds)  # type: ignore[union-attr]
                    if excluded is not None:
                        self._skip(outcome, excluded, r)
                        continue
                new.append(r)
                continue
            named = any(parse_vcard(c.text).has_display_name() for c in cards)
            mine = [c for c in cards if same_collection(urljoin(c.url, "."), collected)]
            if r.name and not named and mine:
                fills.append(self._fill(user, r, mine[0].url, outcome))
            else:
                self.known.remember(user.login, r.key, final=named or not mine,
                                    collected=bool(mine))
                self._skip(outcome, "exists", r)
                if mine:
                    fills.append(self._use(user, r, mine[0]))
        await _settle(fills)
        if not new:
            return
        try:
            await _windowed([partial(self._create, user, r, collected, home, outcome, origin)
                             for r in new], self._put_window)
        except BookMissing:
            # The collected book went away between the PROPFIND and the PUT:
            # whatever was remembered about it is void. Make it and go again
            # (unless that was the user deleting it: then they opted out).
            self.known.forget(user.login)
            self.books.forget(collected)
            done = set(outcome.created) | {a for v in outcome.skipped.values() for a in v}
            try:
                await self._book_gone(user)
            except OptedOut:
                for r in new:
                    if r.email not in done:
                        self._skip(outcome, OPTED_OUT, r)
                return
            # Made again at the same URL, on the same server: the version
            # learnt for it stands.
            await self._dav.create_book(collected, self._book_display_name)
            done = set(outcome.created) | {a for v in outcome.skipped.values() for a in v}
            await _windowed([partial(self._create, user, r, collected, home, outcome, origin)
                             for r in new if r.email not in done], self._put_window)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), timezone.utc)

    async def _create(self, user: User, r: Recipient, collected: str, home: str,
                      outcome: Outcome, origin: Origin) -> None:
        family, given = r.family_given
        now = self._now()
        contact = Contact(uid=contact_uuid(r.key), email=r.email, fn=r.fn,
                          family=family, given=given, rev=now, source=origin.source,
                          ref=origin.ref, note=note_text(self._note, origin, now),
                          count=1 if self.usage is not None else 0, last_used=now)
        url = urljoin(collected, contact.href_name)
        try:
            created = await self._dav.put_new(url, to_vcard(contact,
                                                            await self._version(collected)))
        except BookMissing:
            raise
        except CardDAVError as e:
            # This one card is refused for good (e.g. 400, 413, 415 from a
            # strict server): report it, and collect the others.
            outcome.rejected.append((r.email, "the CardDAV server refused it: %s" % e))
            self._skipped.labels(reason="refused").inc()
            return
        if created:
            outcome.created.append(r.email)
            self._collected.inc()
            self.known.remember(user.login, r.key, final=bool(r.name))
            if self.state is not None:
                # Its deletion is then seen even if no sync saw it exist.
                self.books.written(collected, url, (r.key,))
                await self.state.created(user.login, r.key)
            await self._announce(user, contact, home)
            return
        # 412: it exists (an earlier delivery or another instance wrote it).
        if self.usage is not None:
            self.usage.used(user.login, r.key)
        card = await self._dav.get(url) if r.name else None
        if card is not None:
            await self._fill_or_skip(user, r, card, outcome)
        else:
            self.known.remember(user.login, r.key, final=not r.name)
            self._skip(outcome, "exists", r)

    async def _fill(self, user: User, r: Recipient, url: str, outcome: Outcome) -> None:
        """Fill in the name of the collected card at ``url``, read afresh
        (a lookup's card holds only what the lookup reads)."""
        await self._fill_or_skip(user, r, await self._dav.get(url), outcome)

    async def _fill_or_skip(self, user: User, r: Recipient, card: Card | None,
                            outcome: Outcome) -> None:
        """Give an existing collected card the display name it lacks (If-Match, 3 tries)."""
        family, given = r.family_given
        for _ in range(3):
            if card is None:
                # Deleted meanwhile: forget it, the next message collects it anew.
                self.known.forget(user.login, r.key)
                self._skip(outcome, "exists", r)
                return
            if parse_vcard(card.text).has_display_name():
                break
            text = with_name(card.text, r.fn, family, given, self._now())
            if await self._dav.put_if_match(card.url, text, card.etag):
                if self.usage is not None:
                    self.usage.used(user.login, r.key)
                outcome.named.append(r.email)
                self._named.inc()
                self.known.remember(user.login, r.key, final=True)
                return
            card = await self._dav.get(card.url)
        self.known.remember(user.login, r.key, final=True)
        self._skip(outcome, "exists", r)

    async def _use(self, user: User, r: Recipient, card: Card) -> None:
        """Count a use of the collected contact ``card`` (a lookup's summary),
        and write its ranking when the card's is a day old (RANK_INTERVAL).

        Best effort: a failure is logged and the uses stay counted for the
        next time; the message is not failed for it.
        """
        usage = self.usage
        if usage is None:
            return
        usage.used(user.login, r.key)
        if not usage.due(user.login, r.key, card.text):
            return
        try:
            for _ in range(3):
                full = await self._dav.get(card.url)
                if full is None:
                    return  # deleted meanwhile
                pending = usage.pending(user.login, r.key)
                ranking = ranking_of(full.text)
                text = with_ranking(full.text, ranking.count + pending, self._now())
                if await self._dav.put_if_match(full.url, text, full.etag):
                    usage.written(user.login, r.key, pending)
                    self._ranked.inc()
                    return
        except Exception:
            self.log.failure("cannot write the ranking of {url}", url=card.url)

    async def _announce(self, user: User, contact: Contact, home: str) -> None:
        """Publish contacts:contact:add (ESN's payload), locally and globally.

        ``bookHome`` and ``bookId`` are the id the site knows for the user
        (their ESN id where mapped, else their profile id), as ESN's own
        collector sends; ``user`` names them every way (login, addresses,
        id), which is what the event stream routes on.
        """
        book_home = await self.esn_ids.id_of(user)
        payload = {
            "contactId": contact.uid,
            "bookHome": book_home,
            "bookName": self._layout.book_name,
            "bookId": book_home,
            "vcard": to_jcard(contact),
            "user": {"_id": user.id or user.login, "login": user.login,
                     "preferredEmail": user.emails[0] if user.emails else user.login,
                     "emails": list(user.emails)},
        }
        try:
            await self._hub.local.topic(CONTACT_ADDED).forward(self._hub.global_, payload)
        except Exception:
            # The contact is written; failing the message now would make its
            # redelivery meet 412 and never announce it either. Count, log, go on.
            self._publish_failed.inc()
            self.log.failure("cannot publish {topic} for {user}", topic=CONTACT_ADDED,
                             user=user.login)


def decode_message(body: bytes) -> dict[str, Any]:
    """A collector message, checked: JSON object with userId or userEmail and emails.

    Raises ValidationError (dead-letter) saying every problem found.
    """
    message = decode_json_object(body, "the message")
    problems = []
    for field in ("userId", "userEmail"):
        value = message.get(field)
        if value is not None and not isinstance(value, str):
            if isinstance(value, int) and not isinstance(value, bool):
                message[field] = str(value)
            else:
                problems.append("%s must be a string" % field)
    if not message.get("userId") and not message.get("userEmail"):
        problems.append("no user: userId or userEmail is required")
    emails = message.get("emails")
    if emails is None:
        problems.append("no emails")
    elif not isinstance(emails, list):
        problems.append("emails is not a list")
    elif not emails:
        problems.append("no emails: the list is empty")
    if problems:
        raise ValidationError(problems)
    return message


def message_body(emails: list[str], *, user_id: str | None = None,
                 user_email: str | None = None, source: str | None = None,
                 message_id: str | None = None, event_uid: str | None = None,
                 organizer: str | None = None) -> bytes:
    """Encode a collector message as the sources and OpenPaaS publish it.

    mailhub's own sources add where it came from (``source``: ``mail`` or
    ``calendar``; ``messageId`` or ``eventUid``; the event's ``organizer``),
    which other consumers of the queue ignore.
    """
    message: dict[str, Any] = {"emails": emails}
    if user_id:
        message["userId"] = user_id
    if user_email:
        message["userEmail"] = user_email
    for field, value in (("source", source), ("messageId", message_id),
                         ("eventUid", event_uid), ("organizer", organizer)):
        if value:
            message[field] = value
    return json.dumps(message, ensure_ascii=False).encode("utf-8")


Handler = Callable[[bytes], Deferred]
