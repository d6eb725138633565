"""Issue 13: two ``twistd mailhub`` processes on one PostgreSQL and one RabbitMQ queue
honour the same tombstone.

The instance whose copy of the book held the card sees the user's deletion and
records it; the other one, whose copy never held it (it would collect the
address again on its own), learns it from the database: the change log and
PostgreSQL's LISTEN/NOTIFY drop its cached copy of the user's rules.
"""

from __future__ import annotations

from typing import Callable

from tests.collector import test_end_to_end as e2e
from tests.collector.test_end_to_end import (
    ALICE, PASSWORDS, Site, external, handled, metric, read_collected, wait_until,
)
from tests.support import dav
from tests.support.amqp_peer import WorkQueuePeer
from tests.support.postgres import throwaway_database
from tests.support.process import Mailhub
from tests.support.radicale import RadicaleServer

# The end-to-end tests' fixtures: a vhost, a queue, a Radicale, sites on them.
vhost, peer, radicale, sites = e2e.vhost, e2e.peer, e2e.radicale, e2e.sites


def test_two_instances_honour_one_tombstone(
        sites: Callable[..., Site], peer: WorkQueuePeer, radicale: RadicaleServer) -> None:
    with throwaway_database() as dsn:
        site = sites(external(radicale), database=dsn)
        site.add_user(ALICE, "Alice Example")
        one, two = site.start(), site.start()
        peer.wait_consumers(2)
        sent = 0

        def send(*emails: str) -> None:
            nonlocal sent
            peer.publish({"userEmail": ALICE, "emails": list(emails)})
            sent += 1
            wait_until(lambda: handled(one) + handled(two) >= sent, "message %d" % sent)

        send("Bob <bob@x.org>")
        [maker] = [m for m in (one, two) if metric(m, "mailhub_collector_collected_total")]
        other: Mailhub = two if maker is one else one
        assert [c.emails for c in read_collected(radicale, ALICE)] == [("bob@x.org",)]

        # Alice deletes Bob in her client.
        [card] = read_collected(radicale, ALICE)
        answer = dav.request("DELETE", card.href, (ALICE, PASSWORDS[ALICE]))
        assert answer.status in (200, 204), answer

        # New addresses, one message at a time, until the instance that wrote
        # Bob has looked the book up again (the broker alternates consumers).
        n = 0
        while metric(maker, "mailhub_collector_messages_total", outcome="done") < 2:
            n += 1
            send("new%d@x.org" % n)
        assert "forgotten: bob@x.org" in site.cli("user", "set", ALICE)

        # Bob again, until the other instance has had him (several times).
        while metric(other, "mailhub_collector_skipped_total", reason="forgotten") < 2:
            send("bob@x.org")
            assert sent < 40, "the other instance never had Bob"
        emails = {e for c in read_collected(radicale, ALICE) for e in c.emails}
        assert "bob@x.org" not in emails
        assert emails == {"new%d@x.org" % i for i in range(1, n + 1)}
        assert metric(other, "mailhub_collector_collected_total") + metric(
            maker, "mailhub_collector_collected_total") == n + 1
        site.stop()
        site.assert_clean_log()
