"""Issues 12 and 13 through the real ``twistd -n mailhub``, RabbitMQ and Radicale.

The ``[collector]`` keys, as a site writes them, reach the engine: an
OpenPaaS message naming its user by ESN id (a profile's nickname, set with
``mailhub user add --nickname``) is collected into that user's book; robots,
the site's list address and an excluded domain are not; the cards say where
they came from, as Radicale serves them to the user's client.
"""

from __future__ import annotations

from typing import Callable

from tests.collector.test_end_to_end import (  # noqa: F401 (fixtures)
    ALICE, Site, external, handled, metric, peer, radicale, sites, vhost, wait_until,
)
from tests.support import dav
from tests.support.amqp_peer import WorkQueuePeer
from tests.support.radicale import RadicaleServer

ESN_ALICE = "5f0c1a2b3c4d5e6f70819203"


def test_an_esn_id_message_is_collected_with_the_rules_and_provenance(
        sites: Callable[..., Site], peer: WorkQueuePeer, radicale: RadicaleServer) -> None:
    site = sites(external(radicale))
    site.text = site.text.replace(
        "[collector]\n", "[collector]\nesn_id_profile = nickname\n"
        "exclude_domains = spam.example\nnote = From {source}, {date}\n")
    site.config.write_text(site.text)
    site.cli("user", "add", ALICE, "--name", "Alice Example", "--nickname", ESN_ALICE)
    site.cli("group", "add", "dev", "--name", "Developers", "--email", "dev@lists.example.org")
    mailhub = site.start()
    # As OpenPaaS publishes it: the user's ESN (MongoDB) id.
    peer.publish({"userId": ESN_ALICE, "emails": [
        "Carol Ng <carol@x.org>", "noreply@shop.example", "no-reply@x.org",
        "Dev <dev@lists.example.org>", "x@mx.spam.example",
        "list-bounces+alice=example.org@lists.example.com"]})
    wait_until(lambda: handled(mailhub) == 1, "the message handled")
    book = "%s%s/collected/" % (radicale.url, ALICE)
    cards = dav.cards(book, radicale.service)
    assert [c.emails for c in cards] == [("carol@x.org",)]
    text = dav.request("GET", cards[0].href, radicale.service).body.decode("utf-8")
    assert "X-MAILHUB-SOURCE:queue\r\n" in text
    assert "NOTE:From the collector queue\\, 20" in text
    assert "X-MAILHUB-FIRST-SEEN:" in text
    skipped = {reason: metric(mailhub, "mailhub_collector_skipped_total", reason=reason)
               for reason in ("robot", "mailing_list", "excluded_domain")}
    assert skipped == {"robot": 3, "mailing_list": 1, "excluded_domain": 1}
    site.assert_clean_log()
