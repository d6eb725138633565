"""What each user told the collector: forget this address, stop collecting, never these.

Three per-user rules, kept in mailhub's database (every instance honours
them) and documented in doc/collector.rst:

- **Forget** (tombstones). A card the user deletes from their ``collected``
  book, in any CardDAV client, is seen by the next sync-collection of the
  book's copy (:class:`~mailhub.collector.mirror.BookMirror`) and recorded
  as a tombstone: that address is not collected again for that user
  (reason ``forgotten``) until the user puts it in one of their books
  themselves, or ``[collector] forget_days`` pass (0, the default: never).
  A card mailhub removes itself (retention's expiry) is announced first with
  :meth:`CollectorState.removed_by_collector`, so its disappearance is not
  read as the user's deletion.
- **Opt-out.** ``mailhub user set LOGIN collect=off``, or the user deleting
  the ``collected`` book itself once mailhub had seen it (as Nextcloud does),
  turns collection off for that user (reason ``opted_out``), and the book is
  not made again; ``collect=on`` turns it back on (the book is then made
  again at the next collected address).
- **Block list.** ``mailhub user set LOGIN block=ADDRESS`` or
  ``block=@DOMAIN`` (the domain and its subdomains); ``unblock=`` removes an
  entry (reason ``blocked``).

The engine reads a user's state once and keeps it in memory (a bounded
cache): re-collecting known addresses costs no database round trip. Every
change is written with an entry of kind ``collector`` in the directory's
change log, so each instance drops its copy of that user's state when its
:class:`~mailhub.directory.service.Directory` reads the change (at once on
PostgreSQL with LISTEN/NOTIFY, at the next poll on SQLite): see
:meth:`CollectorState.directory_changed`.

Users are named by their login, compared trimmed and case-folded
(:func:`login_key`); addresses by :func:`~mailhub.collector.addresses.address_key`.
"""

from __future__ import annotations

from typing import Any, Iterable

import attrs
from cachetools import LRUCache
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailhub.collector.addresses import address_key
from mailhub.decoding import domain_forms
from mailhub.directory.sql import CollectorRow

#: Reasons counted in ``mailhub_collector_skipped_total{reason}``.
FORGOTTEN = "forgotten"
OPTED_OUT = "opted_out"
BLOCKED = "blocked"
#: Who removed a card a tombstone is about.
BY_USER = "user"
BY_MAILHUB = "mailhub"
#: The change-log kind of a change to a user's collector state.
CHANGE_KIND = "collector"
#: Why collection is off, as ``mailhub user set`` and the log say it.
REASON_BOOK_DELETED = "the collected book was deleted"
REASON_CLI = "mailhub user set collect=off"


def login_key(login: str) -> str:
    """The form logins are stored and compared in: trimmed and case-folded."""
    return login.strip().casefold()


def block_entry(value: str) -> str | None:
    """A block-list entry as stored: an address's key, or ``@`` and a domain's
    key (``@Example.ORG`` -> ``@example.org``); None when it is neither."""
    value = value.strip()
    if value.startswith("@"):
        domain = value[1:].strip().strip(".")
        if not domain or "@" in domain:
            return None
        forms = domain_forms(domain)
        return "@" + (forms[1].casefold() if forms is not None else domain.casefold())
    return address_key(value) or None


def blocked(key: str, entries: frozenset[str]) -> bool:
    """Whether the address key is on a block list: the address itself, or
    ``@`` its domain or one of that domain's parents."""
    if not entries:
        return False
    if key in entries:
        return True
    domain = key.rpartition("@")[2]
    while domain:
        if "@" + domain in entries:
            return True
        domain = domain.partition(".")[2]
    return False


@attrs.define
class UserState:
    """One user's collector state, as cached in memory."""

    collect: bool = True
    book_seen: bool = False
    reason: str = ""
    #: address key -> (seconds since the epoch, BY_USER or BY_MAILHUB)
    tombstones: dict[str, tuple[float, str]] = attrs.Factory(dict)
    blocks: frozenset[str] = frozenset()

    @classmethod
    def of_row(cls, row: CollectorRow) -> "UserState":
        return cls(collect=row.collect, book_seen=row.book_seen, reason=row.reason,
                   tombstones=dict(row.tombstones), blocks=frozenset(row.blocks))

    def forgotten(self, key: str, now: float, forget_seconds: float) -> bool:
        """Whether the user deleted this address and the tombstone still holds."""
        stone = self.tombstones.get(key)
        if stone is None or stone[1] != BY_USER:
            return False
        return forget_seconds <= 0 or now - stone[0] < forget_seconds

    def skip_reason(self, key: str, now: float, forget_seconds: float) -> str | None:
        """Why this user's rules say the address is not collected, or None."""
        if blocked(key, self.blocks):
            return BLOCKED
        if self.forgotten(key, now, forget_seconds):
            return FORGOTTEN
        return None


class CollectorState:
    """Tombstones, opt-outs and block lists of every user, from the database, cached.

    ``store`` is the directory's :class:`~mailhub.directory.sql.SQLStore`;
    ``forget_days`` is ``[collector] forget_days`` (0: a tombstone holds for
    ever), ``forget`` and ``book_opt_out`` the keys of the same names; ``size`` bounds how many users' states are held in memory.
    Connect :meth:`directory_changed` to the directory's ``on_change`` so
    that changes made by the CLI and other instances are seen.
    """

    log = Logger()

    def __init__(self, store: Any, clock: IReactorTime, forget_days: int = 0,
                 size: int = 100_000, *, forget: bool = True,
                 book_opt_out: bool = True) -> None:
        self._store = store
        self._clock = clock
        #: [collector] forget: whether a user's deletion is remembered.
        self.forget = forget
        #: [collector] book_opt_out: whether deleting the book turns collection off.
        self.book_opt_out = book_opt_out
        self.forget_seconds = max(0, forget_days) * 86400.0
        self._cache: LRUCache[str, UserState] = LRUCache(maxsize=max(1, size))
        self._loading: dict[str, list[Deferred[UserState]]] = {}
        #: Logins changed while their state was being read: not cached.
        self._stale: set[str] = set()
        #: Database reads made (for tests: the re-collect path makes none).
        self.reads = 0

    # -- reading --------------------------------------------------------------

    def now(self) -> float:
        return self._clock.seconds()

    def cached(self, login: str) -> UserState | None:
        """The state in memory, or None (then :meth:`of` reads it)."""
        return self._cache.get(login_key(login))

    async def of(self, login: str) -> UserState:
        """A user's state: from memory, else one database read (shared by the
        callers waiting for it)."""
        key = login_key(login)
        found = self._cache.get(key)
        if found is not None:
            return found
        waiters = self._loading.get(key)
        if waiters is not None:
            d: Deferred[UserState] = Deferred()
            waiters.append(d)
            return await d
        self._loading[key] = []
        self._stale.discard(key)
        try:
            self.reads += 1
            state = UserState.of_row(await self._store.collector_state(key))
        except Exception as e:
            for w in self._loading.pop(key, []):
                w.errback(e)
            raise
        if key not in self._stale:
            self._cache[key] = state
        self._stale.discard(key)
        for w in self._loading.pop(key, []):
            w.callback(state)
        return state

    def invalidate(self, login: str) -> None:
        """Drop the copy of a user's state (it changed in the database)."""
        key = login_key(login)
        self._cache.pop(key, None)
        if key in self._loading:
            self._stale.add(key)

    def directory_changed(self, kind: str, key: str) -> None:
        """The directory's change-log callback: a ``collector`` change drops that user's copy."""
        if kind == CHANGE_KIND:
            self.invalidate(key)

    # -- what the collector sees ------------------------------------------------

    async def deleted(self, login: str, keys: Iterable[str]) -> None:
        """Cards with these addresses went from the user's collected book:
        tombstone each, unless mailhub announced it removed it itself."""
        state = await self.of(login)
        now = self.now()
        stones: list[str] = []
        consumed: list[str] = []
        for key in keys:
            old = state.tombstones.get(key)
            if old is not None and old[1] == BY_MAILHUB:
                consumed.append(key)
                del state.tombstones[key]
            else:
                stones.append(key)
                state.tombstones[key] = (now, BY_USER)
        if consumed:
            await self._store.remove_tombstones(login_key(login), consumed)
        if stones:
            self.log.info("{count} address(es) deleted by {user} from the collected book: "
                          "not collected again", count=len(stones), user=login)
            await self._store.set_tombstones(login_key(login), stones, now, BY_USER)

    async def present(self, login: str, keys: Iterable[str]) -> None:
        """Cards with these addresses are (now) in one of the user's books:
        the user put them there, which lifts their tombstones."""
        state = await self.of(login)
        lifted = [k for k in set(keys)
                  if k in state.tombstones and state.tombstones[k][1] == BY_USER]
        if not lifted:
            return
        for key in lifted:
            del state.tombstones[key]
        await self._store.remove_tombstones(login_key(login), lifted)

    async def created(self, login: str, key: str) -> None:
        """mailhub created a card for ``key``: an announcement of an earlier
        removal by mailhub that was never seen is void (no database round
        trip unless there is one)."""
        state = self.cached(login)
        if state is None or key not in state.tombstones:
            return
        if state.tombstones[key][1] == BY_MAILHUB:
            del state.tombstones[key]
            await self._store.remove_tombstones(login_key(login), [key])

    def removed_by_collector(self, user_id: str, addresses: Iterable[str]) -> "Deferred[None]":
        """mailhub itself is about to remove the cards of ``addresses`` from
        the collected book of ``user_id`` (the user's login): their
        disappearance is not a deletion by the user, so no tombstone.

        Fires once recorded in the database (call it before deleting)."""
        return Deferred.fromCoroutine(self._removed_by_collector(user_id, list(addresses)))

    async def _removed_by_collector(self, user_id: str, addresses: list[str]) -> None:
        keys = [k for k in (address_key(a) for a in addresses) if k]
        if not keys:
            return
        state = await self.of(user_id)
        now = self.now()
        for key in keys:
            state.tombstones[key] = (now, BY_MAILHUB)
        await self._store.set_tombstones(login_key(user_id), keys, now, BY_MAILHUB)

    async def saw_book(self, login: str) -> None:
        """The user's collected book exists (made by mailhub or found):
        its later disappearance is the user's deletion (an opt-out)."""
        state = await self.of(login)
        if state.book_seen:
            return
        state.book_seen = True
        await self._store.set_collector_user(login_key(login), book_seen=True)

    async def book_deleted(self, login: str) -> None:
        """The collected book that was seen is gone: the user opted out."""
        state = await self.of(login)
        state.collect = False
        state.reason = REASON_BOOK_DELETED
        self.log.info("{user} deleted their collected book: collection is off for them "
                      "(mailhub user set {user} collect=on turns it on)", user=login)
        await self._store.set_collector_user(login_key(login), collect=False,
                                             reason=REASON_BOOK_DELETED,
                                             only_if_collecting=True)

