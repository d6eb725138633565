"""LDAPService and LDAPUserSource through the real reactor and thread pool."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from mailhub.config import LDAPSection
from mailhub.directory.interfaces import IUserSource
from mailhub.directory.ldap import LDAPService
from mailhub.errors import Unavailable
from tests.support import slapd as fixture
from tests.support.slapd import Slapd
from tests.support.sources import check_user_source


class LDAPServiceTests(TestCase):
    server: Slapd

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = fixture.shared()

    def setUp(self) -> None:
        self.service = LDAPService(reactor, LDAPSection(**self.server.settings(timeout=1.0)),
                                   threads=2)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.source = self.service.source

    def test_the_source_provides_the_interface(self) -> None:
        verifyObject(IUserSource, self.source)

    def test_the_source_answers_with_the_interfaces_types(self) -> Deferred[None]:
        # The same check as the site source's (tests/directory/test_users.py).
        return Deferred.fromCoroutine(
            check_user_source(self.source, "user00011", fixture.password(11)))

    async def _auth(self) -> None:
        user = await self.source.authenticate("user00011", fixture.password(11))
        self.assertEqual(user.login, "user00011")
        self.assertIsNone(await self.source.authenticate("user00011", "nope"))
        self.assertIsNone(await self.source.authenticate("user00011", ""))
        self.assertIsNone(await self.source.authenticate("*)(uid=*", fixture.password(11)))
        self.assertTrue(await self.source.ping())

    def test_authentication_runs_in_the_pool(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._auth())

    async def _pages(self) -> None:
        sizes = []
        async for page in self.source.pages(500):
            sizes.append(len(page))
        self.assertEqual(sizes, [500, 500, 201])

    def test_every_user_is_listed_a_page_at_a_time(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._pages())

    async def _stop_early(self) -> None:
        pages = self.source.pages(100).__aiter__()
        first = await pages.__anext__()
        self.assertEqual(len(first), 100)
        await pages.aclose()
        # The listing's connection is closed; the source still works.
        self.assertEqual(self.service.client._open, set())
        self.assertIsNotNone(await self.source.find("zoe"))

    def test_a_listing_stopped_early_releases_its_connection(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop_early())

    async def _hung(self) -> None:
        self.assertIsNotNone(await self.source.find("user00001"))
        self.server.pause()
        try:
            with self.assertRaises(Unavailable):
                await self.source.authenticate("user00001", fixture.password(1))
        finally:
            self.server.resume()

    def test_a_hung_server_fails_unavailable(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._hung())
