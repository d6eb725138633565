"""MailStore cmd=list (issue 11, 12): only users who can log in by default, every user with
``[mailstore] list = all``, answered as ``text/json``, and the reactor given back between
pages."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailhub.config import Config, MailStoreSection
from mailhub.directory.memory import MemoryStore
from mailhub.directory.model import Email, Profile
from mailhub.directory.users import ChainedUserSource, SiteUserSource
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.web.mailstore import MailStoreIntegration
from tests.directory.test_users import InlinePool
from tests.web.test_mailstore import GOOD, URL, FakeUsers
from tests.web.test_streaming import TurnClock

WITH_PASSWORD = Profile(id="withPasswordWithPass01", name="Has Password",
                        emails=(Email("has@site.example.test", True, True),))
WITHOUT = Profile(id="noPasswordNoPassword02", name="No Password",
                  emails=(Email("none@site.example.test", True, True),))


class TickingClock(TurnClock):
    """A Clock whose time moves on 20 ms each time it is read: every turn runs long."""

    def seconds(self) -> float:
        self.rightNow += 0.02
        return self.rightNow


class ListTests(SynchronousTestCase):
    def surface(self, listing: str | None = None, clock: Clock | None = None,
                ldap_users: int = 2) -> tuple[StubTreq, Clock]:
        clock = clock if clock is not None else Clock()
        store = MemoryStore()
        for profile in (WITH_PASSWORD, WITHOUT):
            self.successResultOf(store.create_profile(profile))
        self.successResultOf(store.set_password_hash(WITH_PASSWORD.id, "$argon2id$stored"))
        site = SiteUserSource(store, clock, InlinePool())  # type: ignore[arg-type]
        users = ChainedUserSource([site, FakeUsers(count=ldap_users)])
        settings = MailStoreSection(username="mailstore", password="Passw0rd",
                                    **({"list": listing} if listing else {}))
        surface = MailStoreIntegration(Config(mailstore=settings), users, Hub(), Metrics(),
                                       clock, page_size=2)
        return StubTreq(surface.resource()), clock

    def listing(self, http: StubTreq, clock: Clock | None = None) -> tuple[Any, Any]:
        d = http.post(URL, data={"cmd": "list"}, headers=GOOD)
        http.flush()
        response = self.successResultOf(d)
        content = response.content()
        while clock is not None and not content.called:
            clock.advance(0)
            http.flush()
        return response, json.loads(self.successResultOf(content))

    def test_profiles_without_a_password_are_not_listed_by_default(self) -> None:
        http, _ = self.surface()
        response, body = self.listing(http)
        self.assertEqual(response.code, 200)
        self.assertEqual([u["userName"] for u in body],
                         ["has@site.example.test", "user0", "user1"])

    def test_list_all_lists_every_profile(self) -> None:
        http, _ = self.surface("all")
        _, body = self.listing(http)
        self.assertEqual([u["userName"] for u in body],
                         ["has@site.example.test", "none@site.example.test", "user0", "user1"])

    def test_the_list_setting_is_checked(self) -> None:
        from mailhub.config import ConfigError, parse

        self.assertEqual(parse("[mailstore]\nlist = all\n").mailstore.list, "all")
        self.assertEqual(parse("").mailstore.list, "can_login")
        with self.assertRaises(ConfigError) as caught:
            parse("[mailstore]\nlist = everyone\n")
        self.assertIn("[mailstore] list", str(caught.exception))

    def test_list_and_auth_answer_text_json_as_mailstore_examples_do(self) -> None:
        http, _ = self.surface()
        response, _ = self.listing(http)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                         [b"text/json; charset=utf-8"])
        d = http.post(URL, data={"cmd": "auth", "user": "user0", "pass": "pw-user0"},
                      headers=GOOD)
        http.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                         [b"text/json; charset=utf-8"])
        self.assertEqual(json.loads(self.successResultOf(response.content())),
                         {"succeeded": True})

    def test_a_long_list_gives_the_reactor_back_between_pages(self) -> None:
        clock = TickingClock()
        http, _ = self.surface(clock=clock, ldap_users=20)
        d = http.post(URL, data={"cmd": "list"}, headers=GOOD)
        got: list[Any] = []
        d.addBoth(got.append)
        http.flush()
        turns = 0
        while not got:
            turns += 1
            clock.turn()
            http.flush()
        response = got[0]
        content = response.content()
        http.flush()
        while not content.called:
            turns += 1
            self.assertLess(turns, 1000)
            clock.turn()
            http.flush()
        body = json.loads(self.successResultOf(content))
        self.assertEqual(len(body), 21)
        self.assertGreater(turns, 5)


class SiteListingTests(SynchronousTestCase):
    def test_a_loaded_directory_lists_the_site_users_from_memory_caught_up(self) -> None:
        from twisted.internet.defer import Deferred

        from mailhub.directory.service import Directory

        store = MemoryStore()
        for profile in (WITHOUT, WITH_PASSWORD):
            self.successResultOf(store.create_profile(profile))
        clock = Clock()
        directory = Directory(store, clock)
        self.successResultOf(Deferred.fromCoroutine(directory.load()))
        later = Profile(id="laterLaterLaterLater03", name="Later",
                        emails=(Email("aaa@site.example.test", True, True),))
        self.successResultOf(store.create_profile(later))
        asked: list[str] = []
        original = store.load_profiles
        store.load_profiles = lambda: (asked.append("load"), original())[1]  # type: ignore
        site = SiteUserSource(store, clock, InlinePool(), directory=directory)  # type: ignore

        async def collect() -> list[list[str]]:
            return [[u.login for u in page] async for page in site.pages(2)]

        pages = self.successResultOf(Deferred.fromCoroutine(collect()))
        self.assertEqual(pages, [["aaa@site.example.test", "has@site.example.test"],
                                 ["none@site.example.test"]])
        self.assertEqual(asked, [])


    def test_while_the_directory_loads_the_list_is_unavailable_not_read_whole(self) -> None:
        from twisted.internet.defer import Deferred

        from mailhub.directory.service import Directory
        from mailhub.errors import Unavailable

        store = MemoryStore()
        self.successResultOf(store.create_profile(WITH_PASSWORD))
        asked: list[str] = []
        original = store.load_profiles
        store.load_profiles = lambda: (asked.append("load"), original())[1]  # type: ignore
        clock = Clock()
        directory = Directory(store, clock)  # not loaded yet
        site = SiteUserSource(store, clock, InlinePool(), directory=directory)  # type: ignore

        async def collect() -> list[list[str]]:
            return [[u.login for u in page] async for page in site.pages(2)]

        self.failureResultOf(Deferred.fromCoroutine(collect()), Unavailable)
        self.assertEqual(asked, [])


class FullCollectionTests(SynchronousTestCase):
    """No full garbage collection runs while a list is written (see
    mailhub.steps.hold_full_collections), and the setting comes back after."""

    def test_the_listing_holds_full_collections_until_it_ends(self) -> None:
        import gc

        from mailhub.steps import NEVER

        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        seen: list[int] = []

        class Watching(FakeUsers):
            async def pages(self, page_size: int) -> Any:
                async for page in super().pages(page_size):
                    seen.append(gc.get_threshold()[2])
                    yield page

        clock = TurnClock()
        store = MemoryStore()
        site = SiteUserSource(store, clock, InlinePool())  # type: ignore[arg-type]
        users = ChainedUserSource([site, Watching(count=5)])
        settings = MailStoreSection(username="mailstore", password="Passw0rd")
        surface = MailStoreIntegration(Config(mailstore=settings), users, Hub(), Metrics(),
                                       clock, page_size=2)
        http = StubTreq(surface.resource())
        _, body = ListTests().listing(http, clock)
        self.assertEqual(len(body), 5)
        self.assertEqual(seen, [NEVER] * 3)
        self.assertEqual(gc.get_threshold(), before)
