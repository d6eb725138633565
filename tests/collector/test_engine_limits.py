"""One large collector message: capped at [collector] max_addresses, and never
in front of every other message.

A 1.28 MB message with 40,000 addresses took about 2 h, and a one-address
message behind it waited over 120 s: its PUT queued behind all of them. The
engine now collects the first ``max_addresses`` and dead-letters the message
with the reason, parses in slices (the reactor turns between them), and
keeps at most ``[carddav] concurrency`` of one message's PUTs queued.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailhub.collector.carddav import BookLayout, CardDAVClient
from mailhub.collector.engine import CollectorEngine
from mailhub.pubsub.spool import Spool, SpoolQueue
from mailhub.collector.vcard import contact_uuid
from mailhub.directory.model import User
from mailhub.errors import ValidationError
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from tests.collector.fakes import FakeCardDAV, FakeUsers

ALICE = User(login="alice@example.org", emails=("alice@example.org",), id="A1")
BOB = User(login="bob@example.org", emails=("bob@example.org",), id="B2")
ALICE_BOOK = "/dav/alice@example.org/collected/"
BOB_BOOK = "/dav/bob@example.org/collected/"


def body(**message: Any) -> bytes:
    return json.dumps(message).encode("utf-8")


class _Case(SynchronousTestCase):
    """Two users with collected books on the fake server; a client of concurrency 2."""

    def setUp(self) -> None:
        self.dav = FakeCardDAV()
        for user in ("alice", "bob"):
            self.dav.homes.add("/dav/%s@example.org/" % user)
            self.dav.books["/dav/%s@example.org/collected/" % user] = {}
        self.clock = Clock()
        self.metrics = Metrics()
        self.stub = StubTreq(self.dav)
        self.client = CardDAVClient(self.stub, self.clock, concurrency=2, metrics=self.metrics)

    def engine(self, **kw: Any) -> CollectorEngine:
        return CollectorEngine(FakeUsers([ALICE, BOB]), self.client,
                               BookLayout.from_config("http://dav.test/dav/", ""),
                               Hub(), self.metrics, self.clock, **kw)

    def pump(self, *ds: "Deferred[Any]", rounds: int = 1000) -> None:
        """Turn the fake reactor and the fake server until every ``ds`` fired."""
        for _ in range(rounds):
            if all(d.called for d in ds):
                return
            self.clock.advance(0)
            self.stub.flush()
            self.dav.release()
            self.stub.flush()
        self.fail("not finished after %d rounds" % rounds)


class LimitTests(_Case):

    def test_the_first_max_addresses_are_collected_and_the_message_dead_lettered(self) -> None:
        engine = self.engine(max_addresses=120)
        emails = ["Person %d <p%03d@x.org>" % (n, n) for n in range(150)]
        d = engine.handle(body(userId="A1", emails=emails))
        self.pump(d)
        failure = self.failureResultOf(d, ValidationError)
        reason = failure.getErrorMessage()
        self.assertIn("max_addresses = 120", reason)
        self.assertIn("120 created", reason)
        self.assertIn("30 more entries were left out", reason)
        cards = self.dav.cards(ALICE_BOOK)
        self.assertEqual(len(cards), 120)
        self.assertIn(contact_uuid("p119@x.org") + ".vcf", cards)
        self.assertNotIn(contact_uuid("p120@x.org") + ".vcf", cards)
        self.assertEqual(self.metrics.value("mailhub_collector_skipped_total",
                                            {"reason": "over_limit"}), 30)

    def test_list_entries_count_each_address(self) -> None:
        engine = self.engine(max_addresses=3)
        d = engine.handle(body(userId="A1", emails=["a@x.org, b@x.org", "c@x.org, d@x.org"]))
        self.pump(d)
        self.assertIn("1 more entries", self.failureResultOf(d, ValidationError)
                      .getErrorMessage())
        self.assertEqual(len(self.dav.cards(ALICE_BOOK)), 3)

    def test_a_message_within_the_limit_is_collected_as_before(self) -> None:
        engine = self.engine(max_addresses=120)
        emails = ["p%03d@x.org" % n for n in range(120)]
        d = engine.handle(body(userId="A1", emails=emails))
        self.pump(d)
        self.assertEqual(len(self.successResultOf(d).created), 120)

    def test_the_reactor_turns_while_a_long_list_is_parsed(self) -> None:
        engine = self.engine(max_addresses=1000)
        d = engine.handle(body(userId="A1", emails=["p%03d@x.org" % n for n in range(200)]))
        # Nothing else ran: only the first slice is parsed, no request made yet.
        self.assertEqual(self.dav.log, [])
        self.assertFalse(d.called)
        self.pump(d)
        self.assertEqual(len(self.successResultOf(d).created), 200)

    def test_a_large_message_does_not_hold_up_a_small_one_behind_it(self) -> None:
        engine = self.engine(max_addresses=1000)
        self.dav.hold.add("PUT")
        large = engine.handle(body(userId="A1",
                                   emails=["p%03d@x.org" % n for n in range(300)]))
        for _ in range(20):  # until the large message's PUTs are waiting
            self.clock.advance(0)
            self.stub.flush()
        self.assertTrue(self.dav.held)
        small = engine.handle(body(userId="B2", emails=["Ann <ann@y.org>"]))
        self.pump(small)
        self.assertEqual(self.successResultOf(small).created, ["ann@y.org"])
        self.assertFalse(large.called)
        puts = [path for method, path in self.dav.log if method == "PUT"]
        small_at = next(i for i, path in enumerate(puts) if path.startswith(BOB_BOOK))
        # Behind a few of the large message's PUTs (its window, the client's
        # concurrency of 2, and what was in flight), not behind 300.
        self.assertLessEqual(small_at, 6)
        self.pump(large)
        self.assertEqual(len(self.successResultOf(large).created), 300)


class LocalQueueTests(_Case):
    """The same, fed through the local work queue (no broker) with its spool."""

    def test_through_the_local_queue_the_small_message_passes_and_the_large_is_dead(
            self) -> None:
        folder = Path(tempfile.mkdtemp(prefix="mailhub-spool-"))
        self.addCleanup(shutil.rmtree, folder, True)
        spool = Spool(folder)
        engine = self.engine(max_addresses=200)
        queue = SpoolQueue("collector:email", spool, self.clock)
        queue.consume(engine.handle)
        self.dav.hold.add("PUT")
        queue.publish(body(userId="A1", emails=["p%03d@x.org" % n for n in range(250)]))
        for _ in range(20):
            self.clock.advance(0)
            self.stub.flush()
        queue.publish(body(userId="B2", emails=["ann@y.org"]))
        for _ in range(10):
            self.clock.advance(0)
            self.stub.flush()
            self.dav.release()
            self.stub.flush()
        # The small message is collected while the large one is still being written.
        self.assertIn(contact_uuid("ann@y.org") + ".vcf", self.dav.cards(BOB_BOOK))
        self.assertLess(len(self.dav.cards(ALICE_BOOK)), 200)
        for _ in range(1000):
            if spool.dead_count():
                break
            self.clock.advance(0)
            self.stub.flush()
            self.dav.release()
            self.stub.flush()
        self.assertEqual(spool.dead_count(), 1)
        reasons = [p.read_text() for p in spool.dead_folder.glob("*.reason")]
        self.assertIn("max_addresses = 200", reasons[0])
        self.assertIn("50 more entries were left out", reasons[0])
        self.assertEqual(len(self.dav.cards(ALICE_BOOK)), 200)
        self.assertEqual(spool.messages(), [])
