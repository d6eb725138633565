"""Ranking and retention against a real Radicale (external and embedded), with a
real CardDAV client editing.

A Radicale subprocess (tests.support.radicale) holds the books; the engine
collects into it through the real CardDAV client; the user edits a contact
with vdirsyncer (from PyPI) as any client would; the retention pass then
runs against what Radicale serves. Time (the engine's ranking, the pass's
"now") is a ``Clock`` moved by the test; the HTTP runs on the real reactor.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from mailhub.collector.carddav import BookLayout, CardDAVClient
from mailhub.collector.embedded import EmbeddedDAV
from mailhub.collector.engine import CollectorEngine
from mailhub.collector.retention import Retention
from mailhub.collector.vcard import (
    X_COUNT, X_LAST_USED, edited, parse_vcard, ranking_of, unfold,
)
from mailhub.directory.model import User
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from tests.collector.fakes import FakeUsers
from tests.collector.test_radicale import _Root
from tests.support.radicale import RadicaleServer

VDIRSYNCER = str(Path(sys.executable).with_name("vdirsyncer"))
ALICE = User(login="alice@example.org", name="Alice", emails=("alice@example.org",), id="A1")
PASSWORD = "pw-a"
DAY = 86400.0
START = 1_790_000_000.0  # 2026-09-21


class RadicaleRetentionTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.server = RadicaleServer({ALICE.login: PASSWORD})
        self.addCleanup(self.server.cleanup)
        self.server.start()
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        self.clock = Clock()
        self.clock.advance(START)
        self.metrics = Metrics()
        # Timeouts on the real reactor; the collector's "now" on self.clock.
        self.dav = CardDAVClient(HTTPClient(Agent(reactor, pool=pool)), reactor,
                                 credentials=self.server.service, timeout=10, concurrency=4,
                                 metrics=self.metrics)
        self.layout = BookLayout.from_config(self.server.url, "")
        self.users = FakeUsers([ALICE])
        self.engine = CollectorEngine(self.users, self.dav, self.layout, Hub(), self.metrics,
                                      self.clock)
        self.told: list[list[str]] = []
        #: Where the user's client finds the book.
        self.client_book = self.layout.book(ALICE)

    def retention(self, **kw: Any) -> Retention:
        def on_removed(user_id: str, addresses: list[str]) -> Any:
            self.told.append(sorted(addresses))
            return succeed(None)
        return Retention(self.users, self.dav, self.layout, self.clock, usage=self.engine.usage,
                         on_removed=on_removed, metrics=self.metrics, **kw)

    async def collect(self, *emails: str) -> Any:
        return await self.engine.handle(json.dumps({"userId": "A1", "source": "mail",
                                                    "emails": list(emails)}).encode())

    async def cards(self) -> dict[str, str]:
        """The collected book by address, as Radicale serves it."""
        found = await self.dav.all_cards(self.layout.book(ALICE)) or []
        return {parse_vcard(c.text).emails[0]: c.text for c in found}

    async def expire(self, retention: Retention) -> Any:
        d = Deferred.fromCoroutine(retention.run_pass())
        while not d.called:  # the pass lets the reactor turn between pages (on the Clock)
            self.clock.advance(0)
            await deferLater(reactor, 0.01, lambda: None)
        return await d

    def vdirsyncer(self, tmp: Path) -> tuple[list[str], Path]:
        """A vdirsyncer set up to sync Alice's collected book into ``tmp/local``."""
        local = tmp / "local"
        local.mkdir(parents=True)
        (tmp / "vdirsyncer.conf").write_text(
            '[general]\nstatus_path = "%s"\n\n'
            '[pair contacts]\na = "site"\nb = "local"\ncollections = null\n'
            'conflict_resolution = "b wins"\n\n'
            '[storage site]\ntype = "carddav"\nurl = "%s"\n'
            'username = "%s"\npassword = "%s"\n\n'
            '[storage local]\ntype = "filesystem"\npath = "%s"\nfileext = ".vcf"\n'
            % (tmp / "status", self.client_book, ALICE.login, PASSWORD, local))
        return [VDIRSYNCER, "-c", str(tmp / "vdirsyncer.conf")], local

    async def sh(self, command: list[str], stdin: str = "") -> None:
        done = await threads.deferToThread(subprocess.run, command, input=stdin, text=True,
                                           capture_output=True, timeout=120)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)

    async def test_ranking_appears_and_is_written_at_most_once_a_day(self) -> None:
        await self.collect("Kim <kim@x.org>")
        card = (await self.cards())["kim@x.org"]
        self.assertIn(X_COUNT + ":1", unfold(card))
        self.assertFalse(edited(card))  # as Radicale stores and serves it
        puts = self.metrics.value("mailhub_collector_carddav_seconds_count", {"method": "PUT"})
        for _ in range(3):
            self.clock.advance(3600)
            await self.collect("Kim <kim@x.org>")
        self.assertEqual(self.metrics.value("mailhub_collector_carddav_seconds_count",
                                            {"method": "PUT"}), puts)
        self.assertEqual((await self.cards())["kim@x.org"], card)
        self.clock.advance(DAY)
        await self.collect("Kim <kim@x.org>")
        ranked = (await self.cards())["kim@x.org"]
        self.assertEqual(ranking_of(ranked).count, 5)
        self.assertEqual(ranking_of(ranked).last_used.timestamp(), self.clock.seconds())
        self.assertTrue([line for line in unfold(ranked) if line.startswith(X_LAST_USED)])
        self.assertFalse(edited(ranked))

    async def test_a_contact_edited_with_vdirsyncer_is_kept_past_expiry(self) -> None:
        await self.collect("Ann <ann@x.org>", "Ben <ben@x.org>", "Cy <cy@x.org>")
        tmp = Path(tempfile.mkdtemp(prefix="mailhub-vdirsyncer-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        command, local = self.vdirsyncer(tmp)
        await self.sh(command + ["discover"], "y\n" * 3)
        await self.sh(command + ["sync"])
        (ann,) = [p for p in local.glob("*.vcf") if "ann@x.org" in p.read_text()]
        # As the user would in a client: a better name and a phone number.
        ann.write_text(ann.read_text().replace("FN:Ann", "FN:Ann Lee").replace(
            "END:VCARD", "TEL;TYPE=cell:+1 555 0100\r\nEND:VCARD"))
        await self.sh(command + ["sync"])
        before = await self.cards()
        self.assertIn("TEL;TYPE=cell:+1 555 0100", unfold(before["ann@x.org"]))
        self.assertTrue(edited(before["ann@x.org"]))
        self.assertFalse(edited(before["ben@x.org"]))

        self.clock.advance(40 * DAY)
        report = await self.expire(self.retention(expire_days=30))
        after = await self.cards()
        self.assertEqual(sorted(after), ["ann@x.org"])
        self.assertIn("FN:Ann Lee", unfold(after["ann@x.org"]))
        self.assertEqual(self.told, [["ben@x.org", "cy@x.org"]])
        self.assertEqual((report.expired, report.users_own), (2, 1))
        # vdirsyncer sees the removals as deletions, the edit stays.
        await self.sh(command + ["sync"])
        self.assertEqual([p.read_text().count("ann@x.org") for p in local.glob("*.vcf")], [1])

    async def test_over_the_cap_the_least_recently_used_go(self) -> None:
        for address in ("a@x.org", "b@x.org", "c@x.org", "d@x.org"):
            await self.collect(address)
            self.clock.advance(2 * DAY)
        await self.collect("a@x.org")  # used again: now the most recent
        self.assertEqual(ranking_of((await self.cards())["a@x.org"]).count, 2)
        await self.expire(self.retention(max_contacts=2))
        self.assertEqual(sorted(await self.cards()), ["a@x.org", "d@x.org"])
        self.assertEqual(self.told, [["b@x.org", "c@x.org"]])
        # A removed contact is collected again when the user writes to it.
        outcome = await self.collect("b@x.org")
        self.assertEqual(outcome.created, ["b@x.org"])
        self.assertIn("b@x.org", await self.cards())


class EmbeddedRetentionTests(RadicaleRetentionTests):
    """The same, on the embedded store (Radicale in process, behind mailhub's /dav/)."""

    def setUp(self) -> None:
        folder = Path(tempfile.mkdtemp(prefix="mailhub-dav-"))
        self.addCleanup(shutil.rmtree, folder, True)
        self.users = FakeUsers([ALICE], {ALICE.login: PASSWORD})
        self.embedded = EmbeddedDAV(reactor, folder / "dav", self.users, threads=2)
        self.embedded.startService()
        self.addCleanup(self.embedded.stopService)
        self.port = reactor.listenTCP(0, Site(_Root(self.embedded)), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.clock = Clock()
        self.clock.advance(START)
        self.metrics = Metrics()
        self.dav = CardDAVClient(self.embedded.http_client(), reactor, timeout=10,
                                 metrics=self.metrics)
        self.layout = BookLayout.from_config(self.embedded.url, "")
        self.engine = CollectorEngine(self.users, self.dav, self.layout, Hub(), self.metrics,
                                      self.clock)
        self.told = []
        self.client_book = "http://127.0.0.1:%d/dav/%s/collected/" % (
            self.port.getHost().port, ALICE.login)
