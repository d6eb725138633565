"""The collector against a real Radicale, and against the embedded mount.

Real reactor, real sockets on 127.0.0.1: messages in, vCards out, read back
with an addressbook-query REPORT; dedup across two books; Radicale stopped
(Unavailable) and restarted (success).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from mailhub.collector.carddav import BookLayout, CardDAVClient
from mailhub.collector.embedded import EmbeddedDAV
from mailhub.collector.engine import CollectorEngine
from mailhub.collector.vcard import parse_vcard
from mailhub.directory.model import User
from mailhub.errors import Unavailable
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from tests.collector.fakes import FakeUsers
from tests.support.auth import auth_failures
from tests.support.radicale import RadicaleServer

ALICE = User(login="alice@example.org", emails=("alice@example.org",), id="A1")
BOB = User(login="bob@example.org", emails=("bob@example.org",), id="B2")
PERSONAL_CARD = ("BEGIN:VCARD\r\nVERSION:3.0\r\nUID:p1\r\nFN:Known Person\r\n"
                 "EMAIL;TYPE=INTERNET:Known@X.org\r\nEND:VCARD\r\n")


def body(**message: Any) -> bytes:
    return json.dumps(message).encode("utf-8")


class RealRadicaleTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.server = RadicaleServer({"alice@example.org": "pw-a"})
        self.addCleanup(self.server.cleanup)
        self.server.start()
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        self.metrics = Metrics()
        self.hub = Hub()
        self.events: list[Any] = []
        self.hub.local.topic("contacts:contact:add").subscribe(self.events.append)
        self.dav = CardDAVClient(self.http, reactor, credentials=self.server.service,
                                 timeout=5, concurrency=4, metrics=self.metrics)
        self.layout = BookLayout.from_config(self.server.url, "")
        self.engine = CollectorEngine(FakeUsers([ALICE, BOB]), self.dav, self.layout,
                                      self.hub, self.metrics, reactor)

    async def test_messages_become_vcards_that_a_report_finds(self) -> None:
        outcome = await self.engine.handle(body(userId="A1", emails=[
            "John Doe <john@x.org>, Jürgen <j@bücher.de>", "bob@example.org", "junk"]))
        self.assertEqual(sorted(outcome.created), ["j@bücher.de", "john@x.org"])
        book = self.layout.book(ALICE)
        cards = await self.dav.find_emails(book, ["JOHN@x.org", "j@xn--bcher-kva.de",
                                                  "j@bücher.de"])
        parsed = sorted((parse_vcard(c.text) for c in cards), key=lambda p: p.fn)
        self.assertEqual([p.fn for p in parsed], ["John Doe", "Jürgen"])
        self.assertEqual(len(self.events), 2)
        # Alice sees them with her own credentials.
        response = await treq.request(
            "PROPFIND", book, headers={"Depth": "1"}, auth=("alice@example.org", "pw-a"),
            pool=HTTPConnectionPool(reactor, persistent=False))
        text = (await response.content()).decode()
        self.assertEqual(response.code, 207)
        self.assertEqual(text.count(".vcf"), 2)

    async def test_cards_are_written_in_a_vcard_version_the_book_advertises(self) -> None:
        await self.engine.handle(body(userId="A1", emails=["Ann Lee <ann@x.org>"]))
        book = await self.dav.book(self.layout.book(ALICE))
        assert book is not None
        self.assertTrue(book.versions)
        cards = await self.dav.find_emails(self.layout.book(ALICE), ["ann@x.org"])
        version = [line for line in cards[0].text.splitlines() if line.startswith("VERSION:")]
        self.assertEqual(len(version), 1)
        self.assertIn(version[0].split(":", 1)[1], book.versions)

    async def test_a_contact_in_another_book_is_not_collected(self) -> None:
        personal = self.layout.home(ALICE) + "personal/"
        await self.dav.request("MKCOL", self.layout.home(ALICE))
        self.assertTrue(await self.dav.create_book(personal, "Personal"))
        self.assertTrue(await self.dav.put_new(personal + "p1.vcf", PERSONAL_CARD))
        outcome = await self.engine.handle(body(userEmail="alice@example.org",
                                                emails=["Known <known@x.org>", "new@x.org"]))
        self.assertEqual(outcome.created, ["new@x.org"])
        self.assertEqual(outcome.skipped, {"exists": ["known@x.org"]})
        # A redelivery (cache cleared) writes nothing new.
        self.engine.known.forget("alice@example.org")
        again = await self.engine.handle(body(userId="A1", emails=["new@x.org"]))
        self.assertEqual(again.created, [])
        self.assertEqual(len(self.events), 1)

    async def test_cards_added_and_deleted_by_the_user_count_at_the_next_message(self) -> None:
        personal = self.layout.home(ALICE) + "personal/"
        await self.dav.request("MKCOL", self.layout.home(ALICE))
        self.assertTrue(await self.dav.create_book(personal, "Personal"))
        first = await self.engine.handle(body(userId="A1", emails=["a@x.org"]))
        self.assertEqual(first.created, ["a@x.org"])
        # Alice adds a card with her own client, and deletes the collected one.
        self.assertTrue(await self.dav.put_new(personal + "p1.vcf", PERSONAL_CARD))
        collected = [c.url for c in await self.dav.find_emails(self.layout.book(ALICE),
                                                               ["a@x.org"])]
        self.assertEqual(len(collected), 1)
        self.assertIn((await self.dav.request("DELETE", collected[0])).code, (200, 204))
        self.engine.known.forget(ALICE.login)
        outcome = await self.engine.handle(body(userId="A1",
                                                emails=["known@x.org", "a@x.org"]))
        self.assertEqual(outcome.skipped, {"exists": ["known@x.org"]})
        self.assertEqual(outcome.created, ["a@x.org"])
        # Both books were read through sync-collection, not queried: the
        # copies hold Alice's card (the collected book was empty then).
        self.assertEqual(len(self.engine.books), 1)
        syncs = {kind: self.metrics.value("mailhub_collector_mirror_syncs_total",
                                          {"kind": kind}) for kind in ("full", "changes")}
        # personal: read whole, then its changes; collected: read whole once made.
        self.assertEqual(syncs, {"full": 2, "changes": 1})

    async def test_unavailable_while_radicale_is_down_and_fine_after(self) -> None:
        self.server.stop()
        with self.assertRaises(Unavailable):
            await self.engine.handle(body(userId="A1", emails=["late@x.org"]))
        self.server.start()
        outcome = await self.engine.handle(body(userId="A1", emails=["late@x.org"]))
        self.assertEqual(outcome.created, ["late@x.org"])


class EmbeddedTests(TestCase):
    timeout = 60

    def setUp(self) -> Any:
        folder = Path(tempfile.mkdtemp(prefix="mailhub-dav-"))
        self.addCleanup(shutil.rmtree, folder, True)
        self.users = FakeUsers([ALICE, BOB], {"alice@example.org": "pw-a",
                                              "bob@example.org": "pw-b"})
        self.dav_metrics = Metrics()
        self.dav_hub = Hub()
        self.embedded = EmbeddedDAV(reactor, folder / "dav", self.users, threads=2,
                                    hub=self.dav_hub, metrics=self.dav_metrics)
        self.embedded.startService()
        self.addCleanup(self.embedded.stopService)
        root = _Root(self.embedded)
        self.port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.base = "http://127.0.0.1:%d/dav/" % self.port.getHost().port
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.metrics = Metrics()
        self.dav = CardDAVClient(self.embedded.http_client(), reactor, timeout=5)
        self.layout = BookLayout.from_config(self.embedded.url, "")
        self.engine = CollectorEngine(self.users, self.dav, self.layout, Hub(), self.metrics,
                                      reactor)

    async def get(self, path: str, auth: tuple[str, str] | None, method: str = "GET",
                  **kw: Any) -> tuple[int, str]:
        response = await treq.request(method, self.base + path, auth=auth, pool=self.pool, **kw)
        return response.code, (await response.content()).decode("utf-8", "replace")

    async def test_collected_contacts_sync_with_the_users_own_password(self) -> None:
        outcome = await self.engine.handle(body(userId="A1", emails=["Ann Lee <ann@x.org>"]))
        self.assertEqual(outcome.created, ["ann@x.org"])
        code, text = await self.get("alice@example.org/collected/", ("alice@example.org", "pw-a"),
                                    "PROPFIND", headers={"Depth": "1"})
        self.assertEqual(code, 207)
        self.assertIn("/dav/alice%40example.org/collected/", text)
        href = [h for h in text.split("<") if ".vcf" in h][0].split(">", 1)[1]
        code, card = await self.get(unquote(href.split("/dav/", 1)[1]),
                                    ("alice@example.org", "pw-a"))
        self.assertEqual(code, 200)
        self.assertEqual(parse_vcard(card).fn, "Ann Lee")
        # Collecting again finds it through Radicale's REPORT: nothing new.
        self.engine.known.forget("alice@example.org")
        again = await self.engine.handle(body(userId="A1", emails=["ann@x.org"]))
        self.assertEqual(again.skipped, {"exists": ["ann@x.org"]})

    async def test_the_embedded_store_gets_the_vcard_version_it_advertises(self) -> None:
        await self.engine.handle(body(userId="A1", emails=["Ann Lee <ann@x.org>"]))
        alice = ("alice@example.org", "pw-a")
        code, text = await self.get(
            "alice@example.org/collected/", alice, "PROPFIND", headers={"Depth": "0"},
            data=b'<?xml version="1.0"?><d:propfind xmlns:d="DAV:" '
                 b'xmlns:c="urn:ietf:params:xml:ns:carddav"><d:prop>'
                 b"<c:supported-address-data/></d:prop></d:propfind>")
        self.assertEqual(code, 207)
        offered = sorted(set(re.findall(r'version="([0-9.]+)"', text)))
        self.assertTrue(offered, text)
        code, text = await self.get("alice@example.org/collected/", alice, "PROPFIND",
                                    headers={"Depth": "1"})
        href = [h for h in text.split("<") if ".vcf" in h][0].split(">", 1)[1]
        code, card = await self.get(unquote(href.split("/dav/", 1)[1]), alice)
        self.assertEqual(code, 200)
        written = re.findall(r"^VERSION:(\S+)\r?$", card, re.M)
        self.assertEqual(len(written), 1)
        self.assertIn(written[0], offered)
        # The store of this test suite offers 3.0 only (vobject < 1.0), the
        # case the issue met: then the card must be 3.0.
        if offered == ["3.0"]:
            self.assertEqual(written, ["3.0"])

    async def test_a_deleted_collected_book_is_noticed_at_the_next_message(self) -> None:
        alice = ("alice@example.org", "pw-a")
        first = await self.engine.handle(body(userId="A1", emails=["Ann Lee <ann@x.org>"]))
        self.assertEqual(first.created, ["ann@x.org"])
        code, _ = await self.get("alice@example.org/collected/", alice, "DELETE")
        self.assertIn(code, (200, 204))
        again = await self.engine.handle(body(userId="A1", emails=["Ann Lee <ann@x.org>"]))
        self.assertEqual(again.created, ["ann@x.org"])
        code, text = await self.get("alice@example.org/collected/", alice, "PROPFIND",
                                    headers={"Depth": "1"})
        self.assertEqual(code, 207)
        self.assertEqual(text.count(".vcf"), 1)
        # And a single contact the user deletes comes back at the next message too.
        href = [h for h in text.split("<") if ".vcf" in h][0].split(">", 1)[1]
        code, _ = await self.get(unquote(href.split("/dav/", 1)[1]), alice, "DELETE")
        self.assertIn(code, (200, 204))
        third = await self.engine.handle(body(userId="A1", emails=["Ann Lee <ann@x.org>"]))
        self.assertEqual(third.created, ["ann@x.org"])
        fourth = await self.engine.handle(body(userId="A1", emails=["Ann Lee <ann@x.org>"]))
        self.assertEqual(fourth.skipped, {"exists": ["ann@x.org"]})

    async def test_wrong_password_and_other_users_books_are_refused(self) -> None:
        await self.engine.handle(body(userId="A1", emails=["ann@x.org"]))
        code, _ = await self.get("alice@example.org/collected/", ("alice@example.org", "nope"),
                                 "PROPFIND")
        self.assertEqual(code, 401)
        code, _ = await self.get("alice@example.org/collected/", None, "PROPFIND")
        self.assertEqual(code, 401)
        code, _ = await self.get("alice@example.org/collected/", ("bob@example.org", "pw-b"),
                                 "PROPFIND")
        self.assertIn(code, (403, 404))

    async def test_wrong_passwords_are_counted_and_published_through_the_worker_hop(
            self) -> None:
        failures: list[Any] = []
        self.dav_hub.local.topic("login:failure").subscribe(failures.append)
        code, _ = await self.get("alice@example.org/", ("alice@example.org", "nope"), "PROPFIND")
        self.assertEqual(code, 401)
        self.assertEqual(auth_failures(self.dav_metrics, "dav", "wrong"), 1)
        self.assertEqual([(f["user"], f["source"], f["client"]) for f in failures],
                         [("alice@example.org", "dav", "127.0.0.1")])
        self.assertNotIn("nope", json.dumps(failures))

    async def test_logins_are_remembered_briefly(self) -> None:
        for _ in range(3):
            code, _ = await self.get("alice@example.org/", ("alice@example.org", "pw-a"),
                                     "PROPFIND", headers={"Depth": "0"})
            self.assertEqual(code, 207)
        self.assertEqual(self.users.authentications, 1)

    async def test_user_source_down_is_503(self) -> None:
        self.users.down = True
        code, _ = await self.get("alice@example.org/", ("alice@example.org", "pw-a"), "PROPFIND")
        self.assertEqual(code, 503)


class _Root:
    """The smallest root: /dav/ to the embedded store, as mailhub's site mounts it."""

    def __new__(cls, embedded: EmbeddedDAV) -> Any:
        from twisted.web.resource import Resource

        class Root(Resource):
            def getChildWithDefault(self, name: bytes, request: Any) -> Any:
                request.postpath.insert(0, request.prepath.pop())
                return embedded.resource()

        return Root()

