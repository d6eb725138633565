"""The vCard version written is the one the book's server takes (supported-address-data).

The embedded Radicale (and any Radicale whose vobject predates 1.0) lists
only vCard 3.0 in ``supported-address-data``, while the collector wrote 4.0.
It now writes 4.0 where the book offers it and 3.0 otherwise (also where the
server says nothing: RFC 6352 6.2.2 then means 3.0 only), learnt from the
PROPFIND of the home that every lookup makes, with the same UID and href.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import vobject
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailhub.collector.carddav import BookLayout, CardDAVClient
from mailhub.collector.engine import CollectorEngine
from mailhub.collector.vcard import Contact, choose_version, contact_uuid, parse_vcard, to_vcard
from mailhub.directory.model import User
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from tests.collector.fakes import FakeCardDAV, FakeUsers

WHEN = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
ALICE = User(login="alice@example.org", emails=("alice@example.org",), id="A1")
HOME = "/dav/alice@example.org/"
COLLECTED = HOME + "collected/"


class WriteTests(SynchronousTestCase):
    def test_a_vcard_3_card(self) -> None:
        card = to_vcard(Contact(uid="u-1", email="jd@x.org", fn="Doe, John",
                                family="Doe", given="John", rev=WHEN), "3.0")
        self.assertEqual(card, "BEGIN:VCARD\r\nVERSION:3.0\r\nPRODID:-//mailhub//collector//EN\r\n"
                               "UID:urn:uuid:u-1\r\nFN:Doe\\, John\r\nN:Doe;John;;;\r\n"
                               "EMAIL;TYPE=INTERNET,WORK:jd@x.org\r\nREV:20240506T070809Z\r\n"
                               "END:VCARD\r\n")

    def test_vobject_reads_the_3_card_and_we_read_it_back(self) -> None:
        card = to_vcard(Contact(uid="u", email="j@x.org", fn="Jürgen Müller",
                                family="Müller", given="Jürgen", rev=WHEN), "3.0")
        parsed = vobject.readOne(card)
        self.assertEqual(parsed.version.value, "3.0")
        self.assertEqual(parsed.email.value, "j@x.org")
        self.assertEqual(parsed.n.value.family, "Müller")
        self.assertEqual(parse_vcard(card).emails, ("j@x.org",))

    def test_unknown_versions_are_refused(self) -> None:
        with self.assertRaises(ValueError):
            to_vcard(Contact(uid="u", email="j@x.org", fn="J"), "2.1")

    def test_choice(self) -> None:
        self.assertEqual(choose_version(("3.0", "4.0")), "4.0")
        self.assertEqual(choose_version(("4.0",)), "4.0")
        self.assertEqual(choose_version(("3.0",)), "3.0")
        self.assertEqual(choose_version(()), "3.0")
        self.assertEqual(choose_version(None), "3.0")


class NegotiationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dav = FakeCardDAV()
        self.dav.homes.add(HOME)
        self.clock = Clock()
        stub = StubTreq(self.dav)
        self.stub = stub
        client = CardDAVClient(stub, self.clock)
        self.engine = CollectorEngine(FakeUsers([ALICE]), client,
                                      BookLayout.from_config("http://dav.test/dav/", ""),
                                      Hub(), Metrics(), self.clock)

    def collect(self, *emails: str) -> Any:
        d = self.engine.handle(json.dumps({"userId": "A1", "emails": list(emails)}).encode())
        self.stub.flush()
        return self.successResultOf(d)

    def card(self, email: str) -> str:
        return self.dav.cards(COLLECTED)[contact_uuid(email) + ".vcf"]

    def test_a_book_offering_only_3_gets_3(self) -> None:
        self.dav.vcard_versions = ("3.0",)
        self.dav.books[COLLECTED] = {}
        self.collect("Ann Lee <ann@x.org>")
        self.assertIn("VERSION:3.0\r\n", self.card("ann@x.org"))
        self.assertIn("EMAIL;TYPE=INTERNET,WORK:ann@x.org\r\n", self.card("ann@x.org"))
        self.assertIn("UID:urn:uuid:%s\r\n" % contact_uuid("ann@x.org"), self.card("ann@x.org"))

    def test_a_book_offering_4_gets_4(self) -> None:
        self.dav.vcard_versions = ("3.0", "4.0")
        self.dav.books[COLLECTED] = {}
        self.collect("ann@x.org")
        self.assertIn("VERSION:4.0\r\n", self.card("ann@x.org"))

    def test_a_server_that_says_nothing_gets_3(self) -> None:
        self.dav.vcard_versions = None
        self.dav.books[COLLECTED] = {}
        self.collect("ann@x.org")
        self.assertIn("VERSION:3.0\r\n", self.card("ann@x.org"))

    def test_a_new_book_beside_others_takes_their_answer_without_a_request(self) -> None:
        self.dav.vcard_versions = ("3.0",)
        self.dav.books[HOME + "personal/"] = {}
        self.collect("ann@x.org", "bob@x.org")
        self.assertEqual(self.dav.methods().count("PROPFIND"), 1)
        self.assertIn("VERSION:3.0\r\n", self.card("bob@x.org"))

    def test_a_first_book_is_asked_once_after_it_is_made(self) -> None:
        self.dav.vcard_versions = ("3.0",)
        self.collect("ann@x.org", "bob@x.org", "cy@x.org")
        self.assertEqual(self.dav.log[:4], [("PROPFIND", HOME), ("MKCOL", COLLECTED),
                                            ("PROPFIND", COLLECTED), ("PUT", COLLECTED
                                             + contact_uuid("ann@x.org") + ".vcf")][:4])
        self.assertEqual(self.dav.methods().count("PROPFIND"), 2)
        for email in ("ann@x.org", "bob@x.org", "cy@x.org"):
            self.assertIn("VERSION:3.0\r\n", self.card(email))

    def test_a_server_that_changes_its_answer_is_followed_at_the_next_lookup(self) -> None:
        self.dav.vcard_versions = ("3.0",)
        self.dav.books[COLLECTED] = {}
        self.collect("ann@x.org")
        self.dav.vcard_versions = ("3.0", "4.0")  # e.g. Radicale with a newer vobject
        self.collect("bob@x.org")
        self.assertIn("VERSION:3.0\r\n", self.card("ann@x.org"))
        self.assertIn("VERSION:4.0\r\n", self.card("bob@x.org"))


class SupportedAddressDataTests(SynchronousTestCase):
    """What a PROPFIND answer says about a book's vCard versions (no server needed)."""

    def books(self, props: str, status: str = "200 OK") -> Any:
        from mailhub.collector.carddav import _books

        body = ('<?xml version="1.0"?><d:multistatus xmlns:d="DAV:" '
                'xmlns:c="urn:ietf:params:xml:ns:carddav"><d:response>'
                "<d:href>/h/b/</d:href><d:propstat><d:prop><d:resourcetype><d:collection/>"
                "<c:addressbook/></d:resourcetype></d:prop><d:status>HTTP/1.1 200 OK"
                "</d:status></d:propstat><d:propstat><d:prop>%s</d:prop><d:status>HTTP/1.1 %s"
                "</d:status></d:propstat></d:response></d:multistatus>" % (props, status))
        return _books(body.encode(), "http://dav.test/h/")

    def test_sabredav_lists_3_4_and_jcard(self) -> None:
        (book,) = self.books(
            "<c:supported-address-data>"
            '<c:address-data-type content-type="text/vcard" version="3.0"/>'
            '<c:address-data-type content-type="text/vcard" version="4.0"/>'
            '<c:address-data-type content-type="application/vcard+json" version="4.0"/>'
            "</c:supported-address-data>")
        self.assertEqual(book.url, "http://dav.test/h/b/")
        self.assertEqual(book.versions, ("3.0", "4.0"))
        self.assertEqual(choose_version(book.versions), "4.0")

    def test_radicale_with_an_old_vobject_lists_3(self) -> None:
        (book,) = self.books(
            '<c:supported-address-data><c:address-data-type content-type="text/vcard" '
            'version="3.0"/></c:supported-address-data>')
        self.assertEqual(choose_version(book.versions), "3.0")

    def test_a_property_the_server_does_not_know_means_3(self) -> None:
        (book,) = self.books("<c:supported-address-data/>", "404 Not Found")
        self.assertEqual(book.versions, ())
        self.assertEqual(choose_version(book.versions), "3.0")
