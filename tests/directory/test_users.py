"""Site users, password hashing and the chain of user sources.

The site-user tests run on the in-memory store, on a SQLite file and on a
throwaway PostgreSQL database; hashing runs through the same thread-pool
path as in production (an inline pool, so the tests stay synchronous).
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable

import pytest
from argon2 import PasswordHasher
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailhub.directory.interfaces import IUserSource
from mailhub.directory.memory import MemoryStore
from mailhub.directory.model import Email, Profile, User
from mailhub.directory.sql import SQLStore
from mailhub.directory.users import (
    ChainedUserSource, HashingService, SiteUserSource, hash_password, verify_password,
)
from mailhub.errors import Unavailable, ValidationError
from tests.support.deferreds import result
from tests.support.sources import check_user_source

#: Cheap parameters so that the tests hash quickly; production uses the defaults.
FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def collect(source: Any, page_size: int) -> list[list[User]]:
    async def run() -> list[list[User]]:
        return [page async for page in source.pages(page_size)]

    return result(Deferred.fromCoroutine(run()))  # type: ignore[no-any-return]


class InlinePool:
    """A ThreadPool stand-in that runs the work at once, on this thread."""

    def __init__(self) -> None:
        self.calls = 0

    def callInThreadWithCallback(self, on_result: Callable[..., None], f: Callable[..., Any],
                                 *args: Any, **kw: Any) -> None:
        self.calls += 1
        try:
            value = f(*args, **kw)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, value)


class InlineReactor:
    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        f(*args, **kw)

    def seconds(self) -> float:
        """Time stands still: a listing is never cut into reactor turns here."""
        return 0.0


ALICE = Profile(id="aliceAliceAliceAlice01", name="Alice Ædelstein", emails=(
    Email("alice@example.test", verified=True, preferred=True),
    Email("ALICE.other@example.test", verified=True),
))
BOB = Profile(id="bobBobBobBobBobBobBo02", name="Bob", emails=(
    Email("bob@example.test", verified=True, preferred=True),))


@pytest.fixture
def pool() -> InlinePool:
    return InlinePool()


@pytest.fixture
def site(store: SQLStore, pool: InlinePool) -> SiteUserSource:
    result(store.create_profile(ALICE))
    result(store.create_profile(BOB))
    result(store.set_password_hash(ALICE.id, hash_password("Grüße, Welt!", FAST)))
    return SiteUserSource(store, InlineReactor(), pool, hasher=FAST)  # type: ignore[arg-type]


# -- hashing -----------------------------------------------------------------


def test_stored_hashes_are_argon2id_with_the_rfc_9106_parameters() -> None:
    hashed = hash_password("correct horse")
    assert hashed.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert verify_password(hashed, "correct horse")
    assert not verify_password(hashed, "correct hors")


def test_the_same_password_hashes_differently_each_time() -> None:
    assert hash_password("x", FAST) != hash_password("x", FAST)


def test_an_empty_password_cannot_be_set_nor_match() -> None:
    with pytest.raises(ValidationError):
        hash_password("", FAST)
    assert not verify_password(hash_password("a", FAST), "", FAST)


def test_no_hash_or_a_garbage_hash_never_matches() -> None:
    assert not verify_password(None, "anything", FAST)
    assert not verify_password("not a hash", "anything", FAST)
    assert not verify_password("$argon2id$v=19$m=8,t=1,p=1$garbage", "anything", FAST)


def test_oversized_passwords_are_refused_without_hashing() -> None:
    with pytest.raises(ValidationError):
        hash_password("x" * 5000, FAST)
    assert not verify_password(hash_password("x", FAST), "x" * 5000, FAST)


def test_the_hashing_service_owns_and_stops_its_pool() -> None:
    service = HashingService(threads=1)
    service.startService()
    assert service.pool.started
    service.stopService()
    assert not service.pool.started


# -- site users ----------------------------------------------------------------


def test_site_source_provides_the_interface(site: SiteUserSource) -> None:
    verifyObject(IUserSource, site)


def test_site_source_answers_with_the_interfaces_types(site: SiteUserSource) -> None:
    # The same check as the LDAP source's (tests/directory/test_ldap_service.py).
    result(Deferred.fromCoroutine(check_user_source(site, "alice@example.test", "Grüße, Welt!")))


def test_site_users_are_found_by_id_and_by_any_address(site: SiteUserSource) -> None:
    for login in (ALICE.id, "alice@example.test", "alice.other@EXAMPLE.test", " alice@example.test "):
        user = result(site.find(login))
        assert user is not None, login
        assert user.login == "alice@example.test"
        assert user.name == "Alice Ædelstein"
        assert user.emails == ("alice@example.test", "ALICE.other@example.test")
        assert user.source == "site" and user.id == ALICE.id
    assert result(site.find("nobody@example.test")) is None
    assert result(site.find("")) is None


def test_the_right_password_authenticates_through_the_pool(
        site: SiteUserSource, pool: InlinePool) -> None:
    user = result(site.authenticate("ALICE.other@example.test", "Grüße, Welt!"))
    assert user is not None and user.id == ALICE.id
    assert pool.calls >= 1


@pytest.mark.parametrize("login,password", [
    ("alice@example.test", "grüße, welt!"),
    ("alice@example.test", ""),
    ("bob@example.test", "Grüße, Welt!"),   # no password set
    ("nobody@example.test", "Grüße, Welt!"),
    ("", "Grüße, Welt!"),
])
def test_anything_else_fails(site: SiteUserSource, login: str, password: str) -> None:
    assert result(site.authenticate(login, password)) is None


def test_an_outdated_hash_is_upgraded_on_login(store: SQLStore, pool: InlinePool) -> None:
    result(store.create_profile(ALICE))
    weak = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, salt_len=8)
    result(store.set_password_hash(ALICE.id, weak.hash("pw")))
    source = SiteUserSource(store, InlineReactor(), pool,  # type: ignore[arg-type]
                            hasher=PasswordHasher(time_cost=2, memory_cost=8, parallelism=1))
    assert result(source.authenticate("alice@example.test", "pw")) is not None
    assert "t=2" in result(store.get_password_hash(ALICE.id))


def test_site_users_are_listed_in_pages(site: SiteUserSource) -> None:
    pages = collect(site, 1)
    assert [[u.login for u in page] for page in pages] == [
        ["alice@example.test"], ["bob@example.test"]]


# -- the chain -------------------------------------------------------------------


@implementer(IUserSource)
class FakeSource:
    """An in-memory IUserSource; ``down`` makes every call Unavailable."""

    def __init__(self, name: str, users: dict[str, tuple[User, str]]) -> None:
        self.name = name
        self.users = users
        self.down = False
        self.asked: list[str] = []

    def find(self, login: str) -> "Deferred[User | None]":
        self.asked.append("find " + login)
        if self.down:
            return fail(Unavailable(self.name + " is down"))
        found = self.users.get(login)
        return succeed(found[0] if found else None)

    def authenticate(self, login: str, password: str) -> "Deferred[User | None]":
        self.asked.append("auth " + login)
        if self.down:
            return fail(Unavailable(self.name + " is down"))
        found = self.users.get(login)
        return succeed(found[0] if found and password and found[1] == password else None)

    def catch_up(self) -> "Deferred[None]":
        self.asked.append("catch up")
        return fail(Unavailable(self.name + " is down")) if self.down else succeed(None)

    async def pages(self, page_size: int) -> AsyncIterator[list[User]]:
        if self.down:
            raise Unavailable(self.name + " is down")
        users = [u for u, _ in self.users.values()]
        for start in range(0, len(users), page_size):
            yield users[start:start + page_size]


def chain_of() -> tuple[ChainedUserSource, FakeSource, FakeSource]:
    site = FakeSource("site", {
        "carol": (User("carol", "Carol (site)", source="site"), "site-pw"),
    })
    ldap = FakeSource("ldap", {
        "carol": (User("carol", "Carol (ldap)", source="ldap"), "ldap-pw"),
        "dave": (User("dave", "Dave", source="ldap"), "dave-pw"),
        "erin": (User("erin", "Erin", source="ldap"), "erin-pw"),
    })
    return ChainedUserSource([site, ldap]), site, ldap


def test_chain_provides_the_interface() -> None:
    chain, _, _ = chain_of()
    verifyObject(IUserSource, chain)


def test_chain_finds_in_the_first_source_that_knows_the_login() -> None:
    chain, _, _ = chain_of()
    assert result(chain.find("carol")).source == "site"
    assert result(chain.find("dave")).source == "ldap"
    assert result(chain.find("nobody")) is None


def test_the_source_that_knows_the_user_decides() -> None:
    chain, _, ldap = chain_of()
    assert result(chain.authenticate("carol", "site-pw")).source == "site"
    # LDAP's password for the same login does not open the site account.
    assert result(chain.authenticate("carol", "ldap-pw")) is None
    assert "auth carol" not in ldap.asked
    assert result(chain.authenticate("dave", "dave-pw")).source == "ldap"
    assert result(chain.authenticate("dave", "")) is None


def test_an_unavailable_source_never_lets_a_later_one_succeed() -> None:
    chain, site, ldap = chain_of()
    site.down = True
    out: list[Any] = []
    chain.authenticate("dave", "dave-pw").addBoth(out.append)
    assert isinstance(out[0], Failure) and out[0].check(Unavailable)
    site.down = False
    ldap.down = True
    # The site still answers for its own users while LDAP is down...
    assert result(chain.authenticate("carol", "site-pw")).source == "site"
    # ...but nobody else can log in, and that is not a "wrong password".
    out.clear()
    chain.authenticate("dave", "dave-pw").addBoth(out.append)
    assert isinstance(out[0], Failure) and out[0].check(Unavailable)


def test_chain_lists_every_source_in_order_without_duplicate_logins() -> None:
    chain, _, _ = chain_of()
    pages = collect(chain, 2)
    assert [[(u.login, u.source) for u in p] for p in pages] == [
        [("carol", "site")], [("dave", "ldap")], [("erin", "ldap")]]


def test_a_later_source_down_fails_the_listing_before_any_page() -> None:
    chain, _, ldap = chain_of()
    ldap.down = True
    got: list[list[User]] = []

    async def run() -> None:
        async for page in chain.pages(2):
            got.append(page)

    out: list[Any] = []
    Deferred.fromCoroutine(run()).addBoth(out.append)
    assert isinstance(out[0], Failure) and out[0].check(Unavailable)
    assert got == []


# -- site users answered from the in-memory directory ------------------------------


class CountingStore:
    """Any IDirectoryStore, with every call it receives counted by method name."""

    def __init__(self, store: SQLStore) -> None:
        self._store = store
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        def counted(*args: Any, **kw: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return method(*args, **kw)

        return counted


def cached_site(pool: InlinePool, directory_loaded: bool = True) -> tuple[
        SiteUserSource, CountingStore, Any]:
    from twisted.internet.task import Clock

    from mailhub.directory.service import Directory

    store = MemoryStore()
    result(store.create_profile(ALICE))
    result(store.create_profile(BOB))
    result(store.set_password_hash(ALICE.id, hash_password("Grüße, Welt!", FAST)))
    counting = CountingStore(store)
    directory = Directory(store, Clock())
    if directory_loaded:
        result(Deferred.fromCoroutine(directory.load()))
    site = SiteUserSource(counting, InlineReactor(), pool,  # type: ignore[arg-type]
                          hasher=FAST, directory=directory)
    return site, counting, directory


def test_a_login_that_is_no_site_user_costs_no_store_call(pool: InlinePool) -> None:
    site, store, _ = cached_site(pool)
    ldap = FakeSource("ldap", {"dave": (User("dave", "Dave", source="ldap"), "dave-pw")})
    chain = ChainedUserSource([site, ldap])
    assert result(chain.authenticate("dave", "dave-pw")).source == "ldap"
    assert result(chain.authenticate("dave@example.test", "dave-pw")) is None
    assert result(chain.find("dave")).source == "ldap"
    assert store.calls == {}
    assert pool.calls == 0  # no hashing either: the site source never decided


def test_catching_up_brings_a_site_user_made_elsewhere_through_the_one_chain(
        pool: InlinePool) -> None:
    site, store, directory = cached_site(pool)
    ldap = FakeSource("ldap", {})
    chain = ChainedUserSource([site, ldap])
    carol = Profile("C" * 22, "Carol", emails=(Email("carol@example.test"),))
    result(store.create_profile(carol))  # by the CLI, or another instance
    assert result(chain.find("carol@example.test")) is None  # memory has not followed yet
    result(chain.catch_up())
    assert result(chain.find("carol@example.test")).id == carol.id
    assert ldap.asked.count("catch up") == 1


def test_cached_site_users_are_found_by_id_and_by_any_address(pool: InlinePool) -> None:
    site, store, _ = cached_site(pool)
    for login in (ALICE.id, "alice@example.test", "alice.other@EXAMPLE.test",
                  " alice@example.test "):
        user = result(site.find(login))
        assert user is not None and user.id == ALICE.id and user.source == "site", login
    assert result(site.find("nobody@example.test")) is None
    assert result(site.find("")) is None
    assert result(site.find("x" * 400)) is None
    assert store.calls == {}


def test_a_cached_site_user_checks_the_hash_from_the_store(pool: InlinePool) -> None:
    site, store, _ = cached_site(pool)
    assert result(site.authenticate("alice@example.test", "Grüße, Welt!")).id == ALICE.id
    assert result(site.authenticate("alice@example.test", "grüße, welt!")) is None
    assert store.calls == {"get_password_hash": 2}
    # A site user also decides for the chain: LDAP's same login is not asked.
    ldap = FakeSource("ldap", {"alice@example.test": (User("alice@example.test", "A"), "ldap")})
    chain = ChainedUserSource([site, ldap])
    assert result(chain.authenticate("alice@example.test", "ldap")) is None
    assert ldap.asked == []


def test_a_cached_site_user_without_a_password_fails_without_a_query(pool: InlinePool) -> None:
    site, store, _ = cached_site(pool)
    assert result(site.authenticate("bob@example.test", "anything")) is None
    assert result(site.authenticate("bob@example.test", "")) is None
    assert store.calls == {}
    assert pool.calls == 1  # the dummy hash was still verified: timing tells nothing


def test_a_password_set_later_is_seen_once_the_directory_follows(pool: InlinePool) -> None:
    site, store, directory = cached_site(pool)
    result(store.set_password_hash(BOB.id, hash_password("bob-pw", FAST)))
    result(Deferred.fromCoroutine(directory.refresh()))
    assert result(site.authenticate("bob@example.test", "bob-pw")).id == BOB.id


def test_a_removed_site_user_fails_even_before_the_directory_follows(pool: InlinePool) -> None:
    site, store, _ = cached_site(pool)
    result(store.remove_profile(ALICE.id))
    assert result(site.authenticate("alice@example.test", "Grüße, Welt!")) is None


def test_until_the_directory_has_loaded_the_store_answers(pool: InlinePool) -> None:
    site, store, directory = cached_site(pool, directory_loaded=False)
    assert result(site.find("alice@example.test")).id == ALICE.id
    assert result(site.authenticate("alice@example.test", "Grüße, Welt!")).id == ALICE.id
    assert store.calls["find_profile"] == 2
    result(Deferred.fromCoroutine(directory.load()))
    store.calls.clear()
    assert result(site.find("alice@example.test")).id == ALICE.id
    assert store.calls == {}


class _HeldTable(MemoryStore):
    """A MemoryStore whose table load waits for ``held``."""

    def __init__(self) -> None:
        super().__init__()
        self.held: Deferred[None] = Deferred()

    def load_table(self) -> Any:
        loaded = super().load_table()
        return self.held.addCallback(lambda _: loaded)


def test_the_site_list_waits_for_the_table_while_it_loads(pool: InlinePool) -> None:
    """MailStore's list while the directory's table loads after a start: not a
    503, not a list from the database in another order, but the list in login
    order once the table is there; 503 before the groups are read, and after
    waiting a minute."""
    from twisted.internet.task import Clock

    from mailhub.directory.service import Directory

    store = _HeldTable()
    result(store.create_profile(ALICE))
    result(store.create_profile(BOB))
    clock = Clock()
    directory = Directory(store, clock)
    site = SiteUserSource(store, clock, pool, hasher=FAST,  # type: ignore[arg-type]
                          directory=directory)

    async def listed() -> list[str]:
        return [u.login for page in [p async for p in site.pages(10)] for u in page]

    early = Deferred.fromCoroutine(listed())
    failure = early.addErrback(lambda f: f.trap(Unavailable) and f.getErrorMessage())
    assert result(failure) == "the site is starting"
    loading = Deferred.fromCoroutine(directory.load())
    assert directory.answering and not directory.loaded
    waiting = Deferred.fromCoroutine(listed())
    too_long = Deferred.fromCoroutine(listed()).addErrback(
        lambda f: f.trap(Unavailable) and f.getErrorMessage())
    clock.advance(30)
    assert not waiting.called and not too_long.called
    store.held.callback(None)
    result(loading)
    clock.advance(0)  # the list gives the reactor back between pages
    assert result(waiting) == ["alice@example.test", "bob@example.test"]
    assert result(too_long) == ["alice@example.test", "bob@example.test"]
    # A load that takes more than a minute: 503, and nothing fires twice.
    slow = _HeldTable()
    directory = Directory(slow, clock)
    site.directory = directory
    Deferred.fromCoroutine(directory.load())
    late = Deferred.fromCoroutine(listed()).addErrback(
        lambda f: f.trap(Unavailable) and f.getErrorMessage())
    clock.advance(60)
    assert result(late) == "the site's directory is still loading"
    slow.held.callback(None)
    assert directory.loaded
