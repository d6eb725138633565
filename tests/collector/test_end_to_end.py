"""The contact collector end to end, with real processes only.

RabbitMQ carries OpenPaaS-shaped ``collector:email`` messages (published by a
separate AMQP client, pika, as OpenPaaS or James would) to the real
``twistd -n mailhub``, which writes vCards into a real Radicale subprocess
(or its embedded one at ``/dav/``); the tests read the books back over
CardDAV. They prove what a site would notice: contacts appear with the right
FN, EMAIL and UID; a contact known in another book is not collected again;
poison goes to the dead-letter queue with its reason while the rest flows;
nothing is lost while Radicale is down, nor when mailhub is killed with
SIGKILL, and nothing is doubled, even with two mailhub processes on one
queue; collected contacts are private to their owner.

The tests run in a RabbitMQ vhost of their own (global topics such as
``calendar:event:created`` feed the collector too, and other test runs publish
there); each test uses its own queue names (deleted afterwards) and its own
Radicale and data folder.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote

import pytest

from mailhub.collector.addresses import address_key
from mailhub.collector.vcard import contact_uuid
from tests.support import dav, metrics
from tests.support.amqp_peer import VirtualHost, WorkQueuePeer
from tests.support.postgres import throwaway_database
from tests.support.process import TWISTD, Mailhub
from tests.support.radicale import RadicaleServer
from tests.support.wait import wait_until

MAILHUB_CLI = str(Path(TWISTD).with_name("mailhub"))
ALICE = "alice@example.org"
BOB = "bob@example.org"
PASSWORDS = {ALICE: "pw-alice", BOB: "pw-bob"}


# -- helpers -------------------------------------------------------------------



def metric(mailhub: Mailhub, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` on /metrics whose labels include ``labels``."""
    status, text = mailhub.get("/metrics")
    assert status == 200
    return metrics.total(text, name, **labels)


def handled(mailhub: Mailhub) -> float:
    """Collector messages handled to the end (collected or decided) by this process."""
    return metric(mailhub, "mailhub_collector_messages_total", outcome="done")


def by_email(cards: list[dav.StoredCard]) -> dict[str, dav.StoredCard]:
    """Cards keyed by their one EMAIL, after checking each has exactly one."""
    out: dict[str, dav.StoredCard] = {}
    for card in cards:
        assert len(card.emails) == 1, card
        email = card.emails[0].lower()
        assert email not in out, "two cards for %s: %s, %s" % (email, out[email], card)
        out[email] = card
    return out


def assert_is_collected_card(card: dav.StoredCard, email: str, fn: str) -> None:
    """FN as expected; UID (a urn:uuid) derived from the address; stored as {uuid}.vcf."""
    assert card.fn == fn
    # The spelling that arrived first is kept (``JOHN@X.ORG`` may win the race
    # against ``john@x.org``, with its domain lowercased): compare addresses.
    assert [e.lower() for e in card.emails] == [email]
    key = address_key(email)
    assert key is not None
    uuid = contact_uuid(key)
    assert card.uid == "urn:uuid:" + uuid
    assert card.href.endswith("/" + uuid + ".vcf")


class Site:
    """One mailhub configuration (a temp folder, its users) and the processes run on it."""

    def __init__(self, folder: Path, peer: WorkQueuePeer, amqp: str, carddav: str,
                 database: str = "") -> None:
        self.folder = folder
        self.peer = peer
        self.text = (
            "[mailhub]\ndata = %s\n"
            "[database]\ndsn = %s\n"
            "[amqp]\nurl = %s\n"
            "%s"
            "[collector]\nqueue = %s\ndead_letter = %s\nretry_initial = 0.2\nretry_max = 1\n"
            % (folder / "data", database, amqp, carddav, peer.queue, peer.dead_letter))
        self.config = folder / "mailhub.ini"
        self.config.write_text(self.text)
        self.processes: list[Mailhub] = []

    def cli(self, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run([MAILHUB_CLI, *args, "--config", str(self.config)], input=stdin,
                              capture_output=True, text=True, timeout=60, cwd=self.folder)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def add_user(self, email: str, name: str, password: str | None = None) -> str:
        """Create a site user with the CLI (and set a password); their id."""
        user_id = self.cli("user", "add", email, "--name", name)
        if password is not None:
            self.cli("user", "passwd", email, stdin=password + "\n")
        return user_id

    def start(self) -> Mailhub:
        """Start one more ``twistd -n mailhub`` on this configuration, consuming."""
        run = self.folder / ("run%d" % len(self.processes))
        run.mkdir()
        mailhub = Mailhub(run, config=self.text)
        self.processes.append(mailhub)
        mailhub.start()
        wait_until(lambda: mailhub.get("/healthz")[1]["dependencies"]["amqp"]["ok"],
                   "mailhub to connect to RabbitMQ")
        return mailhub

    def assert_clean_log(self, skip: int = 0) -> None:
        """No failure was logged (retries log one) by the processes after the first ``skip``."""
        log = "".join(p.log.read_text() for p in self.processes[skip:])
        assert "Unhandled" not in log and "Traceback" not in log, log

    def stop(self) -> None:
        for process in self.processes:
            if process.process is not None and process.process.poll() is None:
                process.stop()

    def drained(self) -> bool:
        """No message waits in the work queue (some may still be unacked)."""
        return self.peer.ready()[0] == 0


@pytest.fixture(scope="module")
def vhost() -> Iterator[VirtualHost]:
    vhost = VirtualHost().create()
    yield vhost
    vhost.delete()


@pytest.fixture
def peer(vhost: VirtualHost) -> Iterator[WorkQueuePeer]:
    peer = WorkQueuePeer(vhost.name)
    yield peer
    peer.delete()


@pytest.fixture
def radicale() -> Iterator[RadicaleServer]:
    server = RadicaleServer(PASSWORDS)
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def sites(tmp_path: Path, vhost: VirtualHost,
          peer: WorkQueuePeer) -> Iterator[Callable[..., Site]]:
    """Make Sites on the test's queue; stops their processes (before the queue goes)."""
    made: list[Site] = []

    def make(carddav: str, database: str = "") -> Site:
        folder = tmp_path / ("site%d" % len(made))
        folder.mkdir()
        made.append(Site(folder, peer, vhost.url, carddav, database))
        return made[-1]

    yield make
    for site in made:
        site.stop()


def external(radicale: RadicaleServer) -> str:
    """The [carddav] section for the test Radicale, with the collector's service login."""
    return ("[carddav]\nurl = %s\nusername = %s\npassword = %s\n"
            "addressbook = %s{user}/collected/\n"
            % (radicale.url, radicale.service[0], radicale.service[1], radicale.url))


def collected(radicale: RadicaleServer, user: str) -> str:
    return "%s%s/collected/" % (radicale.url, quote(user, safe="@+"))


def read_collected(radicale: RadicaleServer, user: str) -> list[dav.StoredCard]:
    return dav.cards(collected(radicale, user), radicale.service)


# -- 1. messages in, vCards out ------------------------------------------------

def test_openpaas_messages_become_vcards_in_radicale(
        sites: Callable[..., Site], peer: WorkQueuePeer, radicale: RadicaleServer) -> None:
    site = sites(external(radicale))
    alice_id = site.add_user(ALICE, "Alice Example")
    site.add_user(BOB, "Bob Example")
    mailhub = site.start()
    # As James' AmqpForwardAttribute sends it: envelope sender + To/Cc/Bcc.
    peer.publish({"userEmail": ALICE, "emails": [
        "John Doe <john@x.org>", "jane@y.org", BOB, "Alice <%s>" % ALICE,
        "ann@x.org", "Ann Lee <ANN@x.org>"]})
    # As the OpenPaaS calendar sends it: the user's id.
    peer.publish({"userId": alice_id, "emails": ["=?utf-8?q?=C3=89mile_Zola?= <emile@z.org>",
                                                 "JOHN@X.ORG", "not an address"]})
    wait_until(lambda: handled(mailhub) == 2, "two messages handled")
    cards = by_email(read_collected(radicale, ALICE))
    assert sorted(cards) == ["ann@x.org", "emile@z.org", "jane@y.org", "john@x.org"]
    assert_is_collected_card(cards["john@x.org"], "john@x.org", "John Doe")
    assert_is_collected_card(cards["jane@y.org"], "jane@y.org", "jane@y.org")
    assert_is_collected_card(cards["emile@z.org"], "emile@z.org", "Émile Zola")
    # a@x and A <a@x> in one message: one contact, with the name.
    assert_is_collected_card(cards["ann@x.org"], "ann@x.org", "Ann Lee")
    # Bob is a site user and Alice is herself: neither is collected anywhere.
    assert read_collected(radicale, BOB) == []
    assert metric(mailhub, "mailhub_workqueue_acked_total", queue=peer.queue) == 2
    assert site.drained()
    site.assert_clean_log()


def test_a_user_added_while_mailhub_runs_is_collected_for_at_once(
        sites: Callable[..., Site], peer: WorkQueuePeer, radicale: RadicaleServer) -> None:
    site = sites(external(radicale))
    # Users in memory follow the database every poll_interval: make that long,
    # so that the user below is in the database and not yet in memory.
    site.text = site.text.replace("[database]\n", "[database]\npoll_interval = 600\n")
    site.config.write_text(site.text)
    mailhub = site.start()
    site.add_user(ALICE, "Alice Example")
    peer.publish({"userEmail": ALICE, "emails": ["New One <new@x.org>"]})
    wait_until(lambda: handled(mailhub) == 1, "the message handled")
    [card] = read_collected(radicale, ALICE)
    assert_is_collected_card(card, "new@x.org", "New One")
    assert metric(mailhub, "mailhub_workqueue_dead_lettered_total", queue=peer.queue) == 0
    site.assert_clean_log()


# -- 2. dedup across books -----------------------------------------------------

PERSONAL_CARD = ("BEGIN:VCARD\r\nVERSION:3.0\r\nUID:personal-1\r\nFN:Known Person\r\n"
                 "EMAIL;TYPE=INTERNET:Known@X.org\r\nEND:VCARD\r\n")


def test_a_contact_in_another_of_the_users_books_is_not_collected(
        sites: Callable[..., Site], peer: WorkQueuePeer, radicale: RadicaleServer) -> None:
    site = sites(external(radicale))
    alice_id = site.add_user(ALICE, "Alice Example")
    # Alice keeps a personal book of her own on the CardDAV server.
    own = (ALICE, PASSWORDS[ALICE])
    home = "%s%s/" % (radicale.url, quote(ALICE, safe="@+"))
    assert dav.request("PROPFIND", home, own, headers={"Depth": "0"}).status == 207
    dav.make_book(home + "personal/", own, "Personal")
    dav.put_card(home + "personal/personal-1.vcf", own, PERSONAL_CARD)
    mailhub = site.start()
    peer.publish({"userEmail": ALICE, "emails": ["Known Person <known@x.org>", "new@x.org"]})
    peer.publish({"userId": alice_id, "emails": ["KNOWN@x.ORG"]})
    wait_until(lambda: handled(mailhub) == 2, "two messages handled")
    assert [c.emails for c in read_collected(radicale, ALICE)] == [("new@x.org",)]
    assert [c.uid for c in dav.cards(home + "personal/", own)] == ["personal-1"]
    assert metric(mailhub, "mailhub_collector_skipped_total", reason="exists") == 2
    site.assert_clean_log()


# -- 3. poison is dead-lettered, the rest flows --------------------------------

def test_poison_goes_to_the_dead_letter_queue_with_its_reason_and_the_rest_is_collected(
        sites: Callable[..., Site], peer: WorkQueuePeer, radicale: RadicaleServer) -> None:
    site = sites(external(radicale))
    site.add_user(ALICE, "Alice Example")
    mailhub = site.start()
    poison = {
        b"this is not JSON": "not valid JSON",
        '{"userEmail": "alice@example.org", "emails": ["u16@y.org"]}'.encode("utf-16"):
            "not valid UTF-8",
        b'{"userEmail": "alice@example.org", "emails": ["nan@y.org"], "n": NaN}':
            "NaN is not JSON",
        b'{"userEmail": "nobody@example.org", "emails": ["x@y.org"]}': "unknown user",
        b'{"userEmail": "alice@example.org", "emails": []}': "no emails",
        b'{"emails": ["x@y.org"]}': "no user",
    }
    for body in poison:
        peer.publish(body)
    peer.publish({"userEmail": ALICE, "emails": ["Good One <good@x.org>"]})
    dead = dict(peer.dead_letters(len(poison)))
    assert sorted(dead) == sorted(poison)
    for body, reason in poison.items():
        assert reason in dead[body]["x-mailhub-reason"], (body, dead[body])
        assert dead[body]["x-mailhub-queue"] == peer.queue
    wait_until(lambda: read_collected(radicale, ALICE), "the good message to be collected")
    [card] = read_collected(radicale, ALICE)
    assert_is_collected_card(card, "good@x.org", "Good One")
    wait_until(lambda: metric(mailhub, "mailhub_workqueue_acked_total", queue=peer.queue) == 1,
               "the good message to be acked")
    assert metric(mailhub, "mailhub_workqueue_dead_lettered_total",
                  queue=peer.queue) == len(poison)
    assert site.drained()
    site.assert_clean_log()


# -- 4. CardDAV server away for a while ----------------------------------------

def test_messages_published_while_radicale_is_down_all_arrive_once_it_is_back(
        sites: Callable[..., Site], peer: WorkQueuePeer, radicale: RadicaleServer) -> None:
    site = sites(external(radicale))
    site.add_user(ALICE, "Alice Example")
    mailhub = site.start()
    radicale.stop()
    addresses = ["late%d@x.org" % i for i in range(5)]
    for address in addresses:
        peer.publish({"userEmail": ALICE, "emails": ["Late %s <%s>" % (address[4], address)]})
    # Every message failed at least twice (first try and a retry), none was acked.
    wait_until(lambda: metric(mailhub, "mailhub_workqueue_retries_total",
                              queue=peer.queue) >= 2 * len(addresses),
               "the messages to be retried while Radicale is down")
    assert metric(mailhub, "mailhub_workqueue_acked_total", queue=peer.queue) == 0
    assert metric(mailhub, "mailhub_workqueue_dead_lettered_total", queue=peer.queue) == 0
    radicale.start()
    wait_until(lambda: metric(mailhub, "mailhub_workqueue_acked_total",
                              queue=peer.queue) == len(addresses),
               "every message to be acked after Radicale came back", timeout=20)
    cards = by_email(read_collected(radicale, ALICE))
    assert sorted(cards) == sorted(addresses)
    for address in addresses:
        assert_is_collected_card(cards[address], address, "Late %s" % address[4])
    assert site.drained()


# -- 5. SIGKILL mid-stream -----------------------------------------------------

def test_sigkill_mid_stream_loses_nothing_and_doubles_nothing(
        sites: Callable[..., Site], peer: WorkQueuePeer, radicale: RadicaleServer) -> None:
    site = sites(external(radicale))
    site.add_user(ALICE, "Alice Example")
    first = site.start()
    addresses = ["person%03d@kill.example" % i for i in range(100)]
    for address in addresses:
        peer.publish({"userEmail": ALICE, "emails": ["Person %s <%s>" % (address[6:9], address)]})
    wait_until(lambda: metric(first, "mailhub_workqueue_acked_total", queue=peer.queue) >= 5,
               "the first process to collect some contacts")
    first.stop(signal.SIGKILL)
    # Killed mid-stream: what it held unacked is back in the queue with the rest.
    wait_until(lambda: peer.ready()[1] == 0, "the broker to drop the killed consumer")
    left = peer.ready()[0]
    assert 0 < left < len(addresses)
    second = site.start()
    # The second process acks every message the broker still held, no more.
    wait_until(lambda: metric(second, "mailhub_workqueue_acked_total",
                              queue=peer.queue) >= left, "the second process to ack the rest",
               timeout=40)
    assert metric(second, "mailhub_workqueue_acked_total", queue=peer.queue) == left
    assert second.stop() == -signal.SIGTERM
    # Nothing was left unacked either: with no consumer, the queue is empty.
    assert peer.ready() == (0, 0)
    cards = by_email(read_collected(radicale, ALICE))
    assert sorted(cards) == addresses
    for address in addresses:
        assert_is_collected_card(cards[address], address, "Person %s" % address[6:9])
    site.assert_clean_log(skip=1)


# -- 6. competing consumers ----------------------------------------------------

def test_two_mailhub_processes_share_the_queue_and_collect_each_address_once(
        sites: Callable[..., Site], peer: WorkQueuePeer, radicale: RadicaleServer) -> None:
    with throwaway_database() as dsn:
        site = sites(external(radicale), database=dsn)
        site.add_user(ALICE, "Alice Example")
        one, two = site.start(), site.start()
        peer.wait_consumers(2)
        addresses = ["shared%02d@two.example" % i for i in range(30)]
        for address in addresses:
            # Each address twice, in separate messages: once only as a contact.
            peer.publish({"userEmail": ALICE, "emails": [address]})
        for address in addresses:
            peer.publish({"userEmail": ALICE, "emails": ["Shared %s <%s>" % (address[6:8],
                                                                             address)]})
        total = 2 * len(addresses)
        wait_until(lambda: handled(one) + handled(two) >= total and site.drained(),
                   "every message to be handled", timeout=40)
        shares = handled(one), handled(two)
        site.stop()
        assert peer.ready() == (0, 0)
        cards = by_email(read_collected(radicale, ALICE))
        assert sorted(cards) == addresses
        for address in addresses:
            # Whichever message came second filled in the display name.
            assert_is_collected_card(cards[address], address, "Shared %s" % address[6:8])
        # The broker hands messages round robin to the two consumers.
        assert shares[0] > 0 and shares[1] > 0, shares
        site.assert_clean_log()


# -- 7. embedded CardDAV -------------------------------------------------------

def test_embedded_mode_serves_collected_contacts_to_their_owner_only(
        sites: Callable[..., Site], peer: WorkQueuePeer) -> None:
    site = sites("[carddav]\nurl = embedded\n")
    site.add_user(ALICE, "Alice Example", password=PASSWORDS[ALICE])
    site.add_user(BOB, "Bob Example", password=PASSWORDS[BOB])
    mailhub = site.start()
    peer.publish({"userEmail": ALICE, "emails": ["Carol Chan <carol@x.org>"]})
    wait_until(lambda: handled(mailhub) == 1, "the message to be handled")
    book = "%s/dav/%s/collected/" % (mailhub.url, quote(ALICE, safe="@+"))
    alice = (ALICE, PASSWORDS[ALICE])
    [card] = dav.cards(book, alice)
    assert_is_collected_card(card, "carol@x.org", "Carol Chan")
    bob = (BOB, PASSWORDS[BOB])
    assert dav.request("GET", card.href, bob).status in (403, 404)
    assert dav.request("PROPFIND", book, bob, headers={"Depth": "1"}).status in (403, 404)
    assert dav.request("GET", card.href, (ALICE, "wrong")).status == 401
    assert dav.request("GET", card.href).status == 401
    # Bob's own (empty) space works with his credentials.
    assert dav.request("PROPFIND", "%s/dav/%s/" % (mailhub.url, quote(BOB, safe="@+")), bob,
                       headers={"Depth": "1"}).status == 207
    site.assert_clean_log()
