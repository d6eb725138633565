"""vCards: what the collector writes, and what it reads from other programs' cards."""

from __future__ import annotations

from datetime import datetime, timezone

import vobject
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailhub.collector.vcard import (
    Contact, contact_uuid, escape, fold, parse_vcard, to_jcard, to_vcard, unescape, unfold,
    with_name)

WHEN = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
text_values = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=120)


class WriteTests(SynchronousTestCase):
    def test_the_card_has_every_property_in_crlf_lines(self) -> None:
        card = to_vcard(Contact(uid="u-1", email="jd@x.org", fn="Doe, John",
                                family="Doe", given="John", rev=WHEN))
        self.assertEqual(card, "BEGIN:VCARD\r\nVERSION:4.0\r\nPRODID:-//mailhub//collector//EN\r\n"
                               "UID:urn:uuid:u-1\r\nFN:Doe\\, John\r\nN:Doe;John;;;\r\n"
                               "EMAIL;TYPE=work:jd@x.org\r\nREV:20240506T070809Z\r\nEND:VCARD\r\n")

    def test_uid_is_a_stable_uuid_of_the_key(self) -> None:
        self.assertEqual(contact_uuid("a@x.org"), contact_uuid("a@x.org"))
        self.assertNotEqual(contact_uuid("a@x.org"), contact_uuid("b@x.org"))
        self.assertEqual(len(contact_uuid("a@x.org")), 36)
        self.assertEqual(contact_uuid("a@x.org")[14], "5")

    def test_vobject_reads_our_card(self) -> None:
        card = to_vcard(Contact(uid="u", email="j@x.org", fn="Jürgen; \"Jo\", Müller " * 5,
                                family="Müller", given="Jürgen", rev=WHEN))
        parsed = vobject.readOne(card)
        self.assertEqual(parsed.fn.value, "Jürgen; \"Jo\", Müller " * 5)
        self.assertEqual(parsed.email.value, "j@x.org")
        self.assertEqual(parsed.n.value.family, "Müller")

    def test_the_jcard_has_the_same_values(self) -> None:
        jcard = to_jcard(Contact(uid="u", email="j@x.org", fn="J", family="", given="J", rev=WHEN))
        props = {p[0]: p[3] for p in jcard[1]}
        self.assertEqual(props["uid"], "urn:uuid:u")
        self.assertEqual(props["n"], ["", "J", "", "", ""])
        self.assertEqual(props["rev"], "2024-05-06T07:08:09Z")

    @settings(max_examples=300, deadline=None)
    @given(text_values)
    def test_folded_lines_are_at_most_75_octets_and_unfold_back(self, value: str) -> None:
        line = "FN:" + escape(value)
        folded = fold(line)
        for piece in folded.split("\r\n"):
            self.assertLessEqual(len(piece.encode("utf-8")), 75)
        self.assertEqual(unfold(folded + "\r\n"), [line] if line.strip() else [])

    @settings(max_examples=300, deadline=None)
    @given(text_values)
    def test_escaping_round_trips(self, value: str) -> None:
        expected = value.replace("\r\n", "\n").replace("\r", "\n")
        self.assertEqual(unescape(escape(value)), expected)

    @settings(max_examples=200, deadline=None)
    @given(text_values)
    def test_written_names_read_back(self, name: str) -> None:
        name = " ".join(name.split())
        card = to_vcard(Contact(uid="u", email="a@x.org", fn=name or "a@x.org", rev=WHEN))
        self.assertEqual(parse_vcard(card).fn, name or "a@x.org")


class ReadTests(SynchronousTestCase):
    def test_emails_of_other_programs_cards(self) -> None:
        card = ("BEGIN:VCARD\nVERSION:3.0\nFN:Pat\nitem1.EMAIL;TYPE=INTERNET:p@x.org\n"
                'EMAIL;TYPE="work,pref":mailto:P2@x.org\nEMAIL;TYPE=home:p3@x\n'
                " .org\nEND:VCARD\n")
        parsed = parse_vcard(card)
        self.assertEqual(parsed.emails, ("p@x.org", "P2@x.org", "p3@x.org"))
        self.assertTrue(parsed.has_display_name())

    def test_no_name_means_missing_empty_or_the_address(self) -> None:
        for fn in ["", "FN:\r\n", "FN:p@x.org\r\n", "FN:P@X.org\r\n"]:
            card = "BEGIN:VCARD\r\n%sEMAIL:p@x.org\r\nEND:VCARD\r\n" % fn
            self.assertFalse(parse_vcard(card).has_display_name(), fn)

    def test_with_name_keeps_other_lines(self) -> None:
        card = ("BEGIN:VCARD\r\nVERSION:4.0\r\nUID:x\r\nFN:p@x.org\r\nNOTE:keep me\r\n"
                "REV:20000101T000000Z\r\nEMAIL:p@x.org\r\nEND:VCARD\r\n")
        out = with_name(card, "Pat Smith", "Smith", "Pat", WHEN)
        self.assertEqual(out, "BEGIN:VCARD\r\nVERSION:4.0\r\nUID:x\r\nFN:Pat Smith\r\n"
                              "NOTE:keep me\r\nEMAIL:p@x.org\r\nN:Smith;Pat;;;\r\n"
                              "REV:20240506T070809Z\r\nEND:VCARD\r\n")
