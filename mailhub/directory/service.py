"""The directory as the web hooks see it: an exact in-memory copy of the store.

Reads (token, groups, profiles by id or address) are answered from memory on
the reactor thread, with no thread hop, which is what lets the hooks keep up
with a bare twisted.web resource. The copy is kept right by the store's change
log: every write made through this object is applied at once, and writes made
elsewhere (the CLI, another mailhub instance) are picked up by polling
``changes_since`` every ``poll_interval`` seconds, and on PostgreSQL as soon
as the writer's notification arrives (:meth:`Directory.changed_elsewhere`,
called by :class:`~mailhub.directory.listen.ChangeListener`). Where a stale
copy could wrongly refuse (a token that does not match, an address not
found), the answer is checked against the database before it is given, so a
token rotated a moment ago is accepted at once; a replaced token is refused
once the change has been read: at the next poll (SQLite), or when the
notification has arrived (PostgreSQL; the next poll at the latest).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from mailhub.directory import snapshot
from mailhub.directory.interfaces import IDirectoryStore
from mailhub.directory.model import (
    Added, Email, Group, Left, Profile, new_profile_id, normalise_email,
)
from mailhub.directory.table import BY_ID, ProfileTable
from mailhub.directory.tokens import SITE, Grant, TokenRecord, match
from mailhub.errors import ValidationError
from mailhub.steps import hold_full_collections, paged, pause_collections


T = TypeVar("T")
R = TypeVar("R")


class Directory(Service):
    """Profiles, groups and the token, in memory, following the store."""

    log = Logger()
    name = "directory"  # type: ignore[assignment]

    #: Changes a saved table may be behind the database's log at most;
    #: further behind, reading the database is quicker than catching up.
    max_behind = 20_000

    def __init__(self, store: IDirectoryStore, clock: IReactorTime,
                 poll_interval: float = 0.25, hub: Any = None,
                 saved: Path | None = None,
                 builder: Callable[[Path], "Deferred[None]"] | None = None) -> None:
        self.store = store
        #: Builds the table into :attr:`saved` when none can be used (a
        #: child process: :func:`mailhub.directory.build.in_child`); None:
        #: the table is read in the store's thread.
        self.builder = builder
        #: Where the table is kept between runs (:mod:`mailhub.directory.snapshot`);
        #: None: nowhere, the database is read at each start.
        self.saved = saved
        self._saved_seq: int | None = None
        self._saving = DeferredLock()
        self._following = False
        self.hub = hub
        self.clock = clock
        self.poll_interval = poll_interval
        self.token: str | None = None
        self._tokens: list[TokenRecord] = []
        self._refresh_queued = False
        self._table = ProfileTable()
        self._groups: dict[str, Group] = {}
        self._seq = 0
        self._lock = DeferredLock()
        self._poll: LoopingCall | None = None
        #: The groups and tokens are read (:meth:`start`): every surface can
        #: answer, from the database where the table is not loaded yet.
        self.answering = False
        #: The profile table is loaded and caught up: memory answers.
        self.loaded = False
        self._when_loaded: list[Deferred[None]] = []
        #: The change log read while the table loads (groups and tokens).
        self._early_seq = 0
        #: The newest change whose token rotation was announced on the hub.
        self._announced = 0
        #: Called with (kind, key) for every change read from the change log,
        #: after it has been applied (e.g. to drop cached logins).
        self.on_change: list[Callable[[str, str], None]] = []

    # -- life cycle ---------------------------------------------------------

    async def start(self) -> None:
        """Read the groups and the tokens (at start-up, before the table).

        From then on every surface can answer: where the profile table is
        not loaded yet, from the database (:attr:`answering`); changes to
        groups and tokens are followed from here on."""
        seq = await self.store.last_change()
        groups = await self.store.load_groups()
        self._groups = {g.id: g for g in groups}
        self._set_tokens(await self.store.load_tokens(), quiet=True)
        self._early_seq = self._announced = max(self._early_seq, seq)
        self.answering = True

    async def load(self) -> None:
        """Read the profile table (at start-up; :meth:`start` first if not done):
        seconds at a million profiles, after which memory answers."""
        if not self.answering:
            await self.start()
        # A full garbage collection follows every container alive, holding
        # the GIL: none until the load is frozen.
        release = hold_full_collections()
        try:
            await self._load()
        finally:
            release()
        waiting, self._when_loaded = self._when_loaded, []
        for d in waiting:
            if not d.called:  # not cancelled meanwhile
                d.callback(None)

    def after_load(self, handle: Callable[[T], "Deferred[R]"]) -> Callable[[T], "Deferred[R]"]:
        """``handle``, called once the table is loaded (at once when it is)."""
        def handle_loaded(item: T) -> "Deferred[R]":
            if self.loaded:
                return handle(item)
            return self.when_loaded().addCallback(lambda _: handle(item))
        return handle_loaded

    def when_loaded(self) -> "Deferred[None]":
        """Fires once the profile table is loaded (at once if it is)."""
        if self.loaded:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._when_loaded.append(d)
        return d

    async def _load(self) -> None:
        how = "read from the database"
        # The table saved by the last run, else one a child process builds
        # (mailhub.directory.build), else the database read here; the first
        # two are caught up with the change log and checked.
        for source, find in (("saved table", self._read_saved),
                             ("built by a child process", self._build)):
            found = await find()
            if found is None:
                continue
            mark, table = found
            self._take(table, mark.seq)
            if await self._caught_up():
                self._saved_seq = mark.seq
                how = "{}, {} changes applied".format(source, self._seq - mark.seq)
                break
            self.log.warn("the directory table ({source}) does not agree with the database "
                          "once its changes are applied", source=source)
        else:
            seq = await self.store.last_change()
            self._take(await self._read_database(), seq)
            await self.refresh()
        # What is alive now lives as long as the process: keep it out of
        # the collector's scans (the table itself is a few thousand packed
        # blocks, which the collector does not follow).
        gc.freeze()
        self.loaded = True
        self.log.info("directory loaded: {profiles} profiles, {groups} groups ({how})",
                      profiles=len(self._table), groups=len(self._groups), how=how)
        if self._saved_seq != self._seq:
            self._save()

    def _take(self, table: ProfileTable, seq: int) -> None:
        """Hold ``table``, which holds every change up to ``seq``; follow the log from there."""
        self._table = table
        self._seq = seq
        self._following = True

    async def _build(self) -> "tuple[snapshot.Mark, ProfileTable] | None":
        """A table built by :attr:`builder` into :attr:`saved`, or None."""
        if self.builder is None or self.saved is None:
            return None
        try:
            await self.builder(self.saved)
        except Exception as e:
            self.log.warn("{error}; reading the database here", error=e)
            return None
        return await self._read_saved()

    async def _read_database(self) -> ProfileTable:
        """The table, read and indexed in the store's thread (readers see the
        old copy until the end)."""
        # Its lists of a million items are young while they grow, and a young
        # generation's collection follows every reference of each (a tenth
        # of a second, the GIL held, the reactor waiting): none meanwhile.
        resume = pause_collections()
        try:
            return await self.store.load_table()
        finally:
            resume()

    async def _read_saved(self) -> "tuple[snapshot.Mark, ProfileTable] | None":
        """The saved table, if there is one of this database that can be caught up."""
        if self.saved is None:
            return None
        seq = await self.store.last_change()
        try:
            found = await deferToThread(snapshot.read, self.saved)
        except OSError as e:
            self.log.warn("cannot read the saved directory table {path}: {error}",
                          path=str(self.saved), error=e)
            return None
        if found is None:
            if self.saved.exists():
                self.log.warn("the saved directory table {path} is damaged or of another "
                              "version", path=str(self.saved))
            return None
        mark, table = found
        identity, at, _ = await self.store.mark(mark.seq)
        why = ""
        if mark.identity != identity:
            why = "it is of another database (%s)" % mark.identity
        elif mark.seq > seq or at != mark.at:
            why = "the database's change log does not hold the change it was saved at"
        elif seq - mark.seq > self.max_behind:
            why = "it is %d changes behind" % (seq - mark.seq)
        if why:
            self.log.info("not using the saved directory table: {why}", why=why)
            return None
        return mark, table

    async def _caught_up(self) -> bool:
        """Apply the changes logged since the table's; say whether it then
        holds as many profiles as the database (asked again a few times:
        profiles made meanwhile are applied first)."""
        for _ in range(3):
            while await self.refresh():
                pass
            _, _, profiles = await self.store.mark(self._seq)
            if profiles == len(self._table):
                return True
        return False

    def _save(self) -> "Deferred[None]":
        """Write the table to :attr:`saved` in a thread (nothing when nowhere),
        after any save under way."""
        path = self.saved
        if path is None:
            return succeed(None)
        state, seq, profiles = self._table.state(), self._seq, len(self._table)

        async def save() -> None:
            identity, at, _ = await self.store.mark(seq)
            await deferToThread(snapshot.write, path, state,
                                snapshot.Mark(identity, seq, at))
            self._saved_seq = seq
            self.log.info("directory table saved in {path} ({profiles} profiles)",
                          path=str(path), profiles=profiles)

        d = self._saving.run(lambda: Deferred.fromCoroutine(save()))
        d.addErrback(lambda f: self.log.failure(
            "cannot save the directory table in {path}", f, path=str(path)))
        return d

    def saves_done(self) -> "Deferred[None]":
        """Fires once no save of the table is under way (or waiting)."""
        return self._saving.run(succeed, None)

    def startService(self) -> None:
        super().startService()
        self._poll = LoopingCall(self._poll_once)
        self._poll.clock = self.clock
        self._poll.start(self.poll_interval, now=False)

    def stopService(self) -> "Deferred[None] | None":
        super().stopService()
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        if self.loaded and self._saved_seq != self._seq:
            # Changes were applied since the table was saved: the next start
            # catches up from here.
            return self._save()
        return self.saves_done()

    def _poll_once(self) -> "Deferred[int]":
        d = Deferred.fromCoroutine(self.refresh())
        d.addErrback(lambda f: self.log.failure("cannot follow the directory's changes", f))
        return d

    def changed_elsewhere(self) -> None:
        """Another writer committed a change (a PostgreSQL notification):
        read the change log now rather than at the next poll.

        Notifications that arrive while a read is waiting are folded into it.
        """
        if self._refresh_queued or not self.answering:
            return
        self._refresh_queued = True
        self._poll_once()

    async def refresh(self) -> int:
        """Apply the changes the store logged since the last one seen (up
        to the store's batch); say how many were read.

        Until the table is in place, only the groups and tokens are
        followed (the table's load sees every change to the profiles), and
        nothing before :meth:`start`."""
        if not self.answering:
            return 0
        await self._lock.acquire()
        # From here on a new notification needs a new read.
        self._refresh_queued = False
        try:
            early = not self._following
            changes = await self.store.changes_since(self._early_seq if early else self._seq)
            if not changes:
                return 0
            latest: dict[tuple[str, str], int] = {}
            for seq, kind, key in changes:
                latest[(kind, key)] = seq
            for (kind, key), seq in latest.items():
                if not (early and kind == "profile"):
                    await self._reload(kind, key, seq)
                for hook in self.on_change:
                    try:
                        hook(kind, key)
                    except Exception:
                        self.log.failure("change hook {hook!r} failed", hook=hook)
            if early:
                self._early_seq = changes[-1][0]
            else:
                self._seq = changes[-1][0]
            return len(changes)
        finally:
            self._lock.release()

    async def _reload(self, kind: str, key: str, seq: int) -> None:
        if kind == "profile":
            profile = await self.store.get_profile(key)
            if profile is None:
                self._drop(key)
            else:
                self._put(profile)
        elif kind == "group":
            groups = await self.store.load_groups()
            self._groups = {g.id: g for g in groups}
        elif kind == "token":
            self._set_tokens(await self.store.load_tokens())
            if self.hub is not None and seq > self._announced:
                # Once per change (the table's catch-up reads again what was
                # followed while it loaded); never the token itself:
                # subscribers learn that it changed.
                self._announced = seq
                site, slash, name = key.rpartition("/")
                data = {"site": site, "name": name} if slash else {"site": key}
                self.hub.local.topic("token:rotated").forward(self.hub.global_, data)

    def _set_tokens(self, tokens: list[TokenRecord], quiet: bool = False) -> None:
        """Hold ``tokens``; log each rotation and revocation seen (never a secret)."""
        before = {t.name: t for t in self._tokens}
        after = {t.name: t for t in tokens}
        self._tokens = list(tokens)
        self.token = after[SITE].secret if SITE in after else None
        if quiet:
            return
        for name, record in after.items():
            old = before.get(name)
            if old is not None and old.secret == record.secret:
                continue
            if record.previous_until is not None and record.previous is not None:
                self.log.info("token {name} rotated; the previous one stays valid for "
                              "{overlap:.0f} s more", name=name,
                              overlap=max(0.0, record.previous_until - self.clock.seconds()),
                              until=record.previous_until)
            else:
                self.log.info("token {name} rotated; the previous one is no longer valid",
                              name=name)
        for name in before.keys() - after.keys():
            self.log.info("token {name} revoked", name=name)

    def _put(self, profile: Profile) -> None:
        self._table.put(profile)

    def _drop(self, profile_id: str) -> None:
        self._table.drop(profile_id)

    # -- reads, from memory ---------------------------------------------------

    # Until loaded, memory knows nobody (a table being caught up may be
    # behind): :meth:`find` and the user sources then ask the database.

    def profile(self, profile_id: str) -> Profile | None:
        return self._table.get(profile_id) if self.loaded else None

    def profile_by_email(self, address: str) -> Profile | None:
        found = self._table.id_by_email(address) if self.loaded else None
        return self._table.get(found) if found else None

    def profile_by_nickname(self, nickname: str) -> Profile | None:
        found = self._table.id_by_nickname(nickname) if self.loaded else None
        return self._table.get(found) if found else None

    def lookup(self, id_or_address: str) -> Profile | None:
        """A profile by id or by any address (exact, case-insensitive)."""
        return self.profile(id_or_address) or self.profile_by_email(id_or_address)

    def walk(self, order: str = BY_ID, batch: int = 1000) -> Iterator[list[Profile]]:
        """Every profile in ``order`` (``"id"``, or ``"login"``: case-folded),
        a batch per step, each resumed after the last one given: no snapshot,
        so the directory may change between two steps (what changed is
        listed or not by where it falls; nothing twice)."""
        return self._table.walk(order, batch)

    def members(self, batch: int = 1000, ids: bool = False) -> Iterator[Any]:
        """The profiles in a group (``ids``: their ids only, no profile
        made), in id order, for the hooks' lists.

        From memory once the table is loaded, a batch per step, each resumed
        after the last one given (as :meth:`walk`). Before, page after page
        from the database in the same order, each page a Deferred given out
        before its items (:func:`~mailhub.steps.paged`): the whole list,
        never a part or a 503, on a first start too."""
        if self.loaded:
            if ids:
                return (i for found in self._table.member_ids(batch) for i in found)
            return (p for found in self._table.walk(BY_ID, batch) for p in found if p.groups)
        if ids:
            return paged(lambda after: self.store.member_ids(after, batch), str)
        return paged(lambda after: self.store.members(after, batch), lambda p: p.id)

    def count(self) -> int:
        """How many profiles the site has."""
        return len(self._table)

    def group(self, group_id: str) -> Group | None:
        return self._groups.get(group_id)

    def groups(self) -> list[Group]:
        return sorted(self._groups.values(), key=lambda g: g.id)

    def check_token_cached(self, given: str) -> Grant | None:
        """The grant of the token ``given`` when memory can tell; None when
        the store must be asked (an unknown secret, or an expired previous one)."""
        grant = match(self._tokens, given, self.clock.seconds())
        if grant is None or grant.expired:
            return None
        return grant

    async def check_token(self, given: str) -> Grant | None:
        """The grant of the token ``given`` (the site token's or a named
        one's), compared in constant time; None when it is none of them.

        A mismatch against the copy in memory is checked again against the
        database, so a token rotated elsewhere works at once. A previous
        secret past its overlap comes back as an ``expired`` grant.
        """
        if not given:
            return None
        cached = self.check_token_cached(given)
        if cached is not None:
            return cached
        self._set_tokens(await self.store.load_tokens())
        return match(self._tokens, given, self.clock.seconds())

    async def find(self, id_or_address: str) -> Profile | None:
        """Like :meth:`lookup`, but a miss is checked against the database."""
        found = self.lookup(id_or_address)
        if found is not None:
            return found
        if "@" in id_or_address:
            fresh = await self.store.find_profile(id_or_address)
        else:
            fresh = await self.store.get_profile(id_or_address)
        if fresh is not None:
            self._put(fresh)
        return fresh

    # -- writes, through the store --------------------------------------------

    async def _refetch(self, profile_id: str) -> Profile:
        profile = await self.store.get_profile(profile_id)
        if profile is None:
            raise ValidationError("profile %s vanished" % profile_id)
        self._put(profile)
        return profile

    async def create_profile(self, email: str, name: str, verified: bool = True,
                             nickname: str | None = None) -> Profile:
        profile = Profile(id=new_profile_id(), name=name, nickname=nickname,
                          emails=(Email(email, verified, True),))
        await self.store.create_profile(profile)
        return await self._refetch(profile.id)

    async def add_member(self, group_id: str, email: str, name: str) -> tuple[Added, Profile]:
        """GroupServer's add: create the profile if needed, then join the group.

        Says what it did as an :class:`~mailhub.directory.model.Added`. An
        unverified address of an existing profile becomes verified.
        """
        if await self._group(group_id) is None:
            raise ValidationError("no group %s on this site" % group_id)
        profile = await self.find(email)
        created = profile is None
        if profile is None:
            profile = await self.create_profile(email, name)
        else:
            for known in profile.emails:
                if normalise_email(known.address) == normalise_email(email) and not known.verified:
                    await self.store.set_email(profile.id, Email(known.address, True, known.preferred))
        added = await self.store.add_member(group_id, profile.id)
        profile = await self._refetch(profile.id)
        if created:
            return Added.NEW_PROFILE, profile
        return (Added.EXISTING_PROFILE if added else Added.ALREADY_MEMBER), profile

    async def leave(self, group_id: str, profile_id: str) -> Left:
        """GroupServer's leave, saying what it did as a :class:`~mailhub.directory.model.Left`."""
        if await self._group(group_id) is None:
            return Left.NO_SUCH_GROUP
        profile = await self.find(profile_id)
        if profile is None:
            return Left.NO_SUCH_USER
        removed = await self.store.remove_member(group_id, profile.id)
        await self._refetch(profile.id)
        return Left.LEFT if removed else Left.NOT_A_MEMBER

    async def _group(self, group_id: str) -> Group | None:
        found = self._groups.get(group_id)
        if found is None:
            groups = await self.store.load_groups()
            self._groups = {g.id: g for g in groups}
            found = self._groups.get(group_id)
        return found

    async def audit(self, event: str, client: str, detail: str = "") -> None:
        await self.store.audit(event, client, detail)
