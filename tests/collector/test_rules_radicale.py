"""Issues 12 and 13 against the real Radicale: ESN calendar owners, organizer-only
calendars, exclusions, provenance and the ESN ids in ``contacts:contact:add``.

Real reactor, a real Radicale subprocess (tests.support.radicale): ESN-shaped
``calendar:event:created`` events go through the CalendarSource and the engine,
and what the user's client would see is read back from Radicale over CardDAV.
"""

from __future__ import annotations

import json
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from mailhub.collector.carddav import BookLayout, CardDAVClient
from mailhub.collector.engine import CONTACT_ADDED, CollectorEngine, Outcome
from mailhub.collector.rules import EsnIds, exclusions_of
from mailhub.collector.sources import CalendarSource
from mailhub.collector.vcard import parse_vcard, unfold
from mailhub.config import CollectorSection
from mailhub.directory.model import Group
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.pubsub.local import LocalPubSub
from tests.collector.fakes import FakeUsers
from tests.collector.test_rules import (
    ALICE, ALICE_PROFILE, BOB, BOB_PROFILE, ESN_ALICE, FakeDirectory, event_of,
)
from tests.collector.test_sources import local_shared
from tests.support.radicale import RadicaleServer


class Direct:
    """The collector queue, minus the queue: each message straight to the engine."""

    def __init__(self, engine: CollectorEngine) -> None:
        self.engine = engine
        self.outcomes: list[Outcome] = []

    def publish(self, body: bytes) -> Deferred[None]:
        return self.engine.handle(body).addCallback(self.outcomes.append)

    async def settled(self, count: int, timeout: float = 20.0) -> list[Outcome]:
        """The outcomes, once ``count`` messages are collected or decided."""
        waited = 0.0
        while len(self.outcomes) < count:
            if waited > timeout:
                raise AssertionError("%d of %d messages handled" % (len(self.outcomes), count))
            await deferLater(reactor, 0.05, lambda: None)
            waited += 0.05
        return self.outcomes


class RadicaleRuleTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.server = RadicaleServer({"alice@example.org": "pw-a", "bob@example.org": "pw-b"})
        self.addCleanup(self.server.cleanup)
        self.server.start()
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        self.metrics = Metrics()
        self.hub = Hub(LocalPubSub(), LocalPubSub())
        self.events: list[Any] = []
        self.hub.local.topic(CONTACT_ADDED).subscribe(self.events.append)
        self.dav = CardDAVClient(HTTPClient(Agent(reactor, pool=pool)), reactor,
                                 credentials=self.server.service, timeout=5, concurrency=4,
                                 metrics=self.metrics)
        self.layout = BookLayout.from_config(self.server.url, "")
        directory = FakeDirectory([ALICE_PROFILE, BOB_PROFILE],
                                  [Group(id="dev", name="Dev", email="dev@lists.example.org")])
        self.engine = CollectorEngine(
            FakeUsers([ALICE, BOB]), self.dav, self.layout, self.hub, self.metrics, reactor,
            esn_ids=EsnIds(directory, "nickname"),
            exclusions=exclusions_of(CollectorSection(), directory, reactor))
        self.queue = Direct(self.engine)
        self.source = CalendarSource(self.queue, local_shared(self.hub))
        self.source.start()
        self.addCleanup(self.source.stop)

    async def cards(self, user: Any) -> dict[str, str]:
        """The cards of the user's collected book by address, as Radicale serves them."""
        found = await self.dav.find_emails(self.layout.book(user), [
            "carol@x.org", "alice@example.org", "bob@example.org", "noreply@x.org",
            "dev@lists.example.org", "dan@x.org"])
        return {parse_vcard(c.text).emails[0]: c.text for c in found}

    async def test_an_esn_event_collects_into_the_organizers_book_with_provenance(self) -> None:
        await self.hub.global_.topic("calendar:event:created").publish({
            "eventPath": "/calendars/%s/cal/ev-7.ics" % ESN_ALICE,
            "event": event_of("alice@example.org", "ev-7")})
        (outcome,) = await self.queue.settled(1)
        self.assertEqual(outcome.user, "alice@example.org")
        self.assertEqual(outcome.created, ["carol@x.org"])
        cards = await self.cards(ALICE)
        self.assertEqual(list(cards), ["carol@x.org"])
        lines = unfold(cards["carol@x.org"])
        self.assertIn("X-MAILHUB-SOURCE:calendar", lines)
        self.assertIn("X-MAILHUB-EVENT-UID:ev-7", lines)
        self.assertTrue([line for line in lines if line.startswith(
            "NOTE:Collected automatically from a calendar event on ")], lines)
        self.assertTrue([line for line in lines if line.startswith("X-MAILHUB-FIRST-SEEN:")])
        (event,) = self.events
        self.assertEqual((event["bookHome"], event["bookId"]), (ESN_ALICE, ESN_ALICE))
        self.assertEqual(event["user"]["login"], "alice@example.org")

    async def test_the_attendees_copy_of_an_invitation_collects_nothing(self) -> None:
        # Bob's calendar holds Alice's invitation (and a spam one): not his action.
        for organizer, uid in (("alice@example.org", "ev-8"), ("m@evil.example", "spam")):
            await self.hub.global_.topic("calendar:event:created").publish({
                "eventPath": "/calendars/B2/cal/%s.ics" % uid, "event": event_of(organizer, uid)})
        self.assertEqual([o.created for o in await self.queue.settled(2)], [[], []])
        self.assertEqual(await self.cards(BOB), {})
        self.assertEqual(self.metrics.value("mailhub_collector_skipped_total",
                                            {"reason": "not_organizer"}), 2 + 3)

    async def test_an_unmapped_owner_is_found_by_the_organizer(self) -> None:
        await self.hub.global_.topic("calendar:event:created").publish({
            "eventPath": "/calendars/64aa00000000000000000009/cal/ev-9.ics",
            "event": event_of("bob@example.org", "ev-9")})
        (outcome,) = await self.queue.settled(1)
        self.assertEqual(outcome.user, "bob@example.org")
        self.assertEqual(outcome.skipped, {"own": ["bob@example.org"],
                                           "site_user": ["alice@example.org"]})
        self.assertEqual(list(await self.cards(BOB)), ["carol@x.org"])

    async def test_robots_lists_and_the_rest_of_a_sent_message(self) -> None:
        outcome = await self.engine.handle(json.dumps({
            "userId": "A1", "source": "mail", "messageId": "<m1@example.org>",
            "emails": ["noreply@x.org, Dev <dev@lists.example.org>, Dan <dan@x.org>"]}
        ).encode())
        self.assertEqual(outcome.created, ["dan@x.org"])
        self.assertEqual(outcome.skipped, {"robot": ["noreply@x.org"],
                                           "mailing_list": ["dev@lists.example.org"]})
        cards = await self.cards(ALICE)
        self.assertEqual(list(cards), ["dan@x.org"])
        self.assertIn("X-MAILHUB-MESSAGE-ID:<m1@example.org>", unfold(cards["dan@x.org"]))
        self.assertIn("X-MAILHUB-SOURCE:mail", unfold(cards["dan@x.org"]))
