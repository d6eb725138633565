"""The site's own users, password hashing, and the chain of user sources.

:class:`SiteUserSource` answers from the directory store: a site user is a
profile; they log in with any of their addresses (or their profile id), and
their password, where one was set with ``mailhub user passwd``, is stored as
an argon2id hash (argon2-cffi, RFC 9106 parameters). Verifying a hash costs
tens of milliseconds of CPU and 64 MiB of memory on purpose, so it runs in a
thread pool owned by :class:`HashingService`, never on the reactor thread.

:class:`ChainedUserSource` asks several sources in order (the site's users,
then LDAP): the first source that knows a login decides, and a source that
cannot be asked (:class:`~mailhub.errors.Unavailable`) makes the whole
answer unavailable rather than letting a later source say yes.
"""

from __future__ import annotations

from typing import (TYPE_CHECKING, Any, AsyncIterator, Callable, Coroutine, ParamSpec,
                    Sequence, TypeVar, cast)

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet.defer import Deferred, TimeoutError as WaitedTooLong, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailhub.directory.interfaces import IDirectoryStore, IUserSource
from mailhub.directory.model import Profile, User, user_of
from mailhub.directory.table import BY_LOGIN, login_key
from mailhub.errors import Unavailable, ValidationError
from mailhub.service import ThreadPoolService
from mailhub.steps import TURN, TurnBudget, sorted_in_steps

if TYPE_CHECKING:  # cache imports the web layer; only the type is needed here
    from mailhub.directory.service import Directory

T = TypeVar("T")
P = ParamSpec("P")

#: Longest password accepted (bytes of UTF-8): a bound on hashing work.
MAX_PASSWORD = 4096
#: Longest login looked up; longer ones cannot exist and are refused at once.
MAX_LOGIN = 320

#: The hasher for stored passwords: argon2id with argon2-cffi's defaults
#: (RFC 9106 "low memory" profile: t=3, m=64 MiB, p=4).
DEFAULT_HASHER = PasswordHasher()

_dummy_hashes: dict[int, str] = {}


def hash_password(password: str, hasher: PasswordHasher = DEFAULT_HASHER) -> str:
    """The argon2id hash to store for ``password`` (``mailhub user passwd``).

    Raises ValidationError for an empty or oversized password: an empty one
    could never be used (authentication refuses empty passwords).
    """
    if not password:
        raise ValidationError("the password must not be empty")
    if len(password.encode("utf-8")) > MAX_PASSWORD:
        raise ValidationError("the password is longer than %d bytes" % MAX_PASSWORD)
    return hasher.hash(password)


def verify_password(password_hash: str | None, password: str,
                    hasher: PasswordHasher = DEFAULT_HASHER) -> bool:
    """Whether ``password`` matches the stored hash; blocking, call in a thread.

    With no hash (no password set) a dummy hash is verified anyway, so the
    answer takes as long as for a real user and timing does not tell which
    logins exist. An empty password never matches.
    """
    if not password or len(password.encode("utf-8")) > MAX_PASSWORD:
        return False
    if not password_hash:
        dummy = _dummy_hashes.get(id(hasher))
        if dummy is None:
            dummy = _dummy_hashes[id(hasher)] = hasher.hash("mailhub: no password set")
        password_hash = dummy
        matched = False
    else:
        matched = True
    try:
        hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    return matched


class HashingService(ThreadPoolService):
    """Owns the thread pool where password hashes are verified.

    Small on purpose (default 2 threads): each verification takes 64 MiB and
    a core for tens of milliseconds, and bounding the pool bounds both.
    """

    name = "password-hashing"  # type: ignore[assignment]

    def __init__(self, threads: int = 2) -> None:
        super().__init__(threads, "mailhub-hashing")


def _deferred(method: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, "Deferred[T]"]:
    """Make an ``async def`` method return a Deferred, as IUserSource promises.

    The parameters keep their types, so mypy checks the method against the
    interface as it checks a plain one.
    """

    def wrapper(*args: P.args, **kw: P.kwargs) -> "Deferred[T]":
        return Deferred.fromCoroutine(method(*args, **kw))

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


#: Profiles sorted per step of a listing (a few ms each).
STEP = 10_000

#: Seconds a list waits for the directory's table after a start at most
#: (a first start at a million profiles takes about 11), then Unavailable.
LOAD_WAIT = 60.0


@implementer(IUserSource)
class SiteUserSource:
    """The site's users: profiles in the directory store, with their passwords.

    ``store`` is any IDirectoryStore (the SQL store); ``reactor`` and
    ``pool`` run the hash verification off the reactor thread.

    ``directory``, when given, is the in-memory :class:`~mailhub.directory.service.Directory`
    that follows the same store: once it has loaded, "is this a site user,
    and which?" is answered from memory on the reactor thread, so a login
    that is not a site user (every LDAP login) costs no SQL query and no
    thread hop. The password hash itself is still read from the store, and
    only for a profile that has one. A profile written by another process
    is seen within the directory's ``poll_interval``; until then the login
    is decided as it was a moment before the write (a removed profile's
    hash is gone from the store, so it fails rather than succeeds).
    """

    name = "site"
    log = Logger()

    def __init__(self, store: IDirectoryStore, reactor: IReactorFromThreads, pool: ThreadPool,
                 hasher: PasswordHasher = DEFAULT_HASHER, *,
                 directory: "Directory | None" = None) -> None:
        self.store = store
        self.reactor = reactor
        self.pool = pool
        self.hasher = hasher
        self.directory = directory

    def _cached(self, login: str) -> tuple[bool, Profile | None]:
        """``(True, profile or None)`` when memory can answer; ``(False, None)`` when not."""
        directory = self.directory
        if directory is None or not directory.loaded:
            return False, None
        login = login.strip()
        if not login or len(login) > MAX_LOGIN:
            return True, None
        if "@" not in login:
            return True, directory.profile(login)
        return True, directory.profile_by_email(login)

    async def _profile(self, login: str) -> Profile | None:
        cached, profile = self._cached(login)
        if cached:
            return profile
        login = login.strip()
        if not login or len(login) > MAX_LOGIN:
            return None
        if "@" not in login:
            return await maybeDeferred(self.store.get_profile, login)
        return await maybeDeferred(self.store.find_profile, login)

    def find(self, login: str) -> "Deferred[User | None]":
        """The site user with this profile id or address, or None."""
        cached, profile = self._cached(login)
        if cached:
            # The hot path of every LDAP login in the chain: no coroutine, no hop.
            return succeed(user_of(profile) if profile is not None else None)
        return Deferred.fromCoroutine(self._find(login))

    async def _find(self, login: str) -> User | None:
        profile = await self._profile(login)
        return user_of(profile) if profile is not None else None

    @_deferred
    async def authenticate(self, login: str, password: str) -> User | None:
        """The user if ``password`` is theirs; None otherwise (also with no password set)."""
        if not password:
            return None
        cached, profile = self._cached(login)
        if not cached:
            profile = await self._profile(login)
        password_hash = None
        # From memory, a profile without a password needs no query: the
        # dummy hash below is verified all the same, so timing tells nothing.
        if profile is not None and (profile.has_password or not cached):
            password_hash = await maybeDeferred(self.store.get_password_hash, profile.id)
        matched = await deferToThreadPool(self.reactor, self.pool, verify_password,
                                          password_hash, password, self.hasher)
        if not matched or profile is None:
            return None
        if password_hash and self.hasher.check_needs_rehash(password_hash):
            new_hash = await deferToThreadPool(self.reactor, self.pool, hash_password,
                                               password, self.hasher)
            await maybeDeferred(self.store.set_password_hash, profile.id, new_hash)
        return user_of(profile)

    def catch_up(self) -> "Deferred[None]":
        """Follow the store's change log now (the in-memory directory, if any)."""
        if self.directory is None:
            return succeed(None)
        return Deferred.fromCoroutine(self.directory.refresh()).addCallback(lambda _: None)

    async def pages(self, page_size: int) -> AsyncIterator[list[User]]:
        """Every site user, in pages, ordered by login.

        Read from the in-memory directory (caught up with the change log
        first). While its table loads after a start, the list waits for it
        (seconds, on a first start at a million profiles: the database has no
        order by login to page by); before the server has read its groups,
        Unavailable. Without a directory, from the store, converted and
        sorted in steps, the reactor given back between them.
        """
        directory = self.directory
        budget = TurnBudget(cast(IReactorTime, self.reactor))  # the reactor is both
        size = max(page_size, 1)
        if directory is not None and directory.answering and not directory.loaded:
            try:
                await directory.when_loaded().addTimeout(
                    LOAD_WAIT, cast(IReactorTime, self.reactor))
            except WaitedTooLong:
                raise Unavailable("the site's directory is still loading")
        if directory is not None and directory.loaded:
            # The in-memory copy, caught up, read in login order a page at a
            # time, each page resumed after the last login sent: no snapshot
            # of a million profiles, nothing sorted.
            await directory.refresh()
            for profiles in directory.walk(BY_LOGIN, size):
                yield [user_of(profile) for profile in profiles]
                await budget.check()
            return
        if directory is not None:
            # Before the start-up's first reads: a 503 with Retry-After
            # rather than a million profiles made here from the database,
            # what the compact directory is there to avoid.
            raise Unavailable("the site is starting")
        loaded = await maybeDeferred(self.store.load_profiles)
        profiles = loaded if isinstance(loaded, list) else list(loaded)
        # Before the directory has loaded (or without one): a million
        # profiles converted and sorted in steps, the reactor given back
        # between them (one sort of them all would hold it for seconds).
        # Each page's users are made as it is sent: a million User objects
        # made at once would cost the garbage collector long pauses.
        page: list[User] = []
        for profile in sorted_in_steps(profiles, key=login_key, run=STEP):
            if profile is TURN:  # type: ignore[comparison-overlap]
                await budget.check()
                continue
            page.append(user_of(profile))
            if len(page) >= size:
                yield page
                page = []
                await budget.check()
        if page:
            yield page


@implementer(IUserSource)
class ChainedUserSource:
    """Several user sources asked in order; the first that knows a login decides.

    - ``find``: the first source's answer that is not None.
    - ``authenticate``: the source that knows the login checks the password;
      later sources are not asked (a site user's password cannot be
      overridden by an LDAP entry with the same login). The last source is
      asked to authenticate directly (it does its own lookup).
    - If a source raises Unavailable before one knew the login, the answer
      is Unavailable: never a success, never a failure that a retry would fix.
    - ``pages``: every source's pages in order. A later source's user whose
      login an earlier source knows (``find``) is skipped: that source
      decides for the login, so they could not log in under it anyway.
      Nothing is remembered between pages (a set of a million site logins
      took 100 MB, and freeing it at the end held the reactor 64 ms).
    """

    name = "chain"

    def __init__(self, sources: Sequence[IUserSource]) -> None:
        if not sources:
            raise ValueError("a chain needs at least one user source")
        self.sources = list(sources)

    @_deferred
    async def find(self, login: str) -> User | None:
        """The first source's user with this login."""
        for source in self.sources:
            user = await source.find(login)
            if user is not None:
                return user
        return None

    @_deferred
    async def authenticate(self, login: str, password: str) -> User | None:
        """The user if the source that knows the login accepts the password."""
        if not password or not login.strip():
            return None
        for source in self.sources[:-1]:
            if await source.find(login) is not None:
                return await source.authenticate(login, password)
        return await self.sources[-1].authenticate(login, password)

    @_deferred
    async def catch_up(self) -> None:
        """Every source catches up, in order."""
        for source in self.sources:
            await source.catch_up()

    async def pages(self, page_size: int) -> AsyncIterator[list[User]]:
        """Every source's users in turn, later duplicates of a login skipped.

        The first page of every source is fetched before anything is yielded,
        so a source that is down fails the listing before it has begun (a
        503 for MailStore) rather than half-way through; memory holds one
        page per source at most for that.
        """
        iterators = [source.pages(page_size).__aiter__() for source in self.sources]
        try:
            firsts: list[list[User] | None] = []
            for iterator in iterators:
                try:
                    firsts.append(await iterator.__anext__())
                except StopAsyncIteration:
                    firsts.append(None)
            for index, iterator in enumerate(iterators):
                page = firsts[index]
                firsts[index] = None
                while page is not None:
                    if index:
                        page = [u for u in page
                                if not await self._known_before(index, u.login)]
                    if page:
                        yield page
                    try:
                        page = await iterator.__anext__()
                    except StopAsyncIteration:
                        page = None
        finally:
            for iterator in iterators:
                await _close(iterator)

    async def _known_before(self, index: int, login: str) -> bool:
        """Whether a source before ``index`` knows ``login``: then it decides
        for that login (:meth:`authenticate`), and has listed it."""
        for source in self.sources[:index]:
            if await source.find(login) is not None:
                return True
        return False


async def _close(iterator: AsyncIterator[list[User]]) -> None:
    """Close an async generator (a source's ``pages``) that may not have finished."""
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()

