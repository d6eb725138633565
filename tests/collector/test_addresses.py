"""Address parsing: the forms mail and calendar systems really write, and properties."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailhub.collector.addresses import (
    Recipient, Rejected, address_key, clean_name, format_address, parse_entries, parse_one,
    split_list, split_name)


def one(text: str) -> Recipient:
    result = parse_one(text)
    assert isinstance(result, Recipient), result
    return result


class RealWorldForms(SynchronousTestCase):
    def test_forms(self) -> None:
        cases = [
            # (entry, email, name)
            ("user1@open-paas.org", "user1@open-paas.org", ""),
            ("User2 <user2@open-paas.org>", "user2@open-paas.org", "User2"),
            ("John Doe <john.doe@open-paas.org>", "john.doe@open-paas.org", "John Doe"),
            ('"Doe, John" <jd@x.org>', "jd@x.org", "Doe, John"),
            ("'John Doe' <jd@x.org>", "jd@x.org", "John Doe"),
            ('"  John \t  Doe  " <jd@x.org>', "jd@x.org", "John Doe"),
            ("<jd@x.org>", "jd@x.org", ""),
            ("jd@x.org (John Doe)", "jd@x.org", ""),
            ('"jd@x.org" <jd@x.org>', "jd@x.org", ""),
            ("=?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <jm@x.de>", "jm@x.de", "Jürgen Müller"),
            ("=?ISO-8859-1?Q?Andr=E9?= Pirard <pirard@x.be>", "pirard@x.be", "André Pirard"),
            ("=?utf-8?b?5bGx55Sw5aSq6YOO?= <yamada@x.jp>", "yamada@x.jp", "山田太郎"),
            ("José <jose@exämple.com>", "jose@exämple.com", "José"),
            ("j@XN--BCHER-KVA.DE", "j@xn--bcher-kva.de", ""),
            ("a+tag@x.org", "a+tag@x.org", ""),
            ('"john doe"@x.org', '"john doe"@x.org', ""),
            ("Üser <üser@x.org>", "üser@x.org", "Üser"),
            ('"O\'Brien, Pat" <pat@x.ie>', "pat@x.ie", "O'Brien, Pat"),
            ('"Say \\"Hi\\"" <hi@x.org>', "hi@x.org", 'Say "Hi"'),
        ]
        for entry, email, name in cases:
            r = one(entry)
            self.assertEqual((r.email, r.name), (email, name), entry)

    def test_junk_is_rejected_with_a_reason(self) -> None:
        for junk in ["junk", "", "<>", "a@", "@x.org", "x@y@z.org", "a b@c.org",
                     "a@localhost", "a@1.2.3.4", "<a@[1.2.3.4]>", "a@-x.org",
                     "a@x_y.org", "Bob <b@x.org", "a\x00b@x.org", "a@" + "x" * 64 + ".org",
                     "x" * 65 + "@x.org"]:
            result = parse_one(junk)
            self.assertIsInstance(result, Rejected, junk)
            assert isinstance(result, Rejected)
            self.assertTrue(result.reason)

    def test_a_list_in_one_entry(self) -> None:
        parsed = parse_entries(['A <a@x.org>, "Doe, J" <j@y.org>, c@z.org'])
        self.assertEqual([r.email for r in parsed.recipients], ["a@x.org", "j@y.org", "c@z.org"])
        self.assertEqual(parsed.recipients[1].name, "Doe, J")

    def test_groups_give_their_members(self) -> None:
        parsed = parse_entries(["team: a@x.org, B <b@x.org>;", "undisclosed-recipients:;"])
        self.assertEqual([r.email for r in parsed.recipients], ["a@x.org", "b@x.org"])
        self.assertEqual(len(parsed.rejected), 1)

    def test_one_contact_per_address_preferring_the_named_form(self) -> None:
        parsed = parse_entries(["a@x.org", "A@X.ORG", "Ann <a@x.org>", "Other <A@x.org>"])
        self.assertEqual(len(parsed.recipients), 1)
        self.assertEqual(parsed.recipients[0].name, "Ann")

    def test_idn_spellings_share_one_key_and_list_both_forms(self) -> None:
        a = one("j@bücher.de")
        b = one("J@XN--BCHER-KVA.de")
        self.assertEqual(a.key, b.key)
        self.assertEqual(set(a.forms), {"j@bücher.de", "j@xn--bcher-kva.de"})

    def test_nfc_and_nfd_names_and_addresses_are_one(self) -> None:
        nfc = one("Jos\u00e9 <jos\u00e9@x.org>")
        nfd = one("Jose\u0301 <jose\u0301@x.org>")
        self.assertEqual(nfc.key, nfd.key)
        self.assertEqual(nfc.name, nfd.name)

    def test_non_strings_are_rejected(self) -> None:
        parsed = parse_entries([None, 3, {"a": 1}, "ok@x.org"])
        self.assertEqual(len(parsed.rejected), 3)
        self.assertEqual(len(parsed.recipients), 1)

    def test_commas_in_quotes_comments_and_angles_do_not_split(self) -> None:
        self.assertEqual(split_list('"a, b" <x@y.org>, (c, d) e@f.org, <g@h.org>'),
                         ['"a, b" <x@y.org>', "(c, d) e@f.org", "<g@h.org>"])

    def test_names_split_as_openpaas_and_as_address_books_write(self) -> None:
        self.assertEqual(split_name("John Ronald Tolkien"), ("Ronald Tolkien", "John"))
        self.assertEqual(split_name("Doe, John"), ("Doe", "John"))
        self.assertEqual(split_name("Cher"), ("", "Cher"))
        self.assertEqual(split_name(""), ("", ""))

    def test_fn_is_the_address_without_a_name(self) -> None:
        self.assertEqual(one("a@x.org").fn, "a@x.org")

    def test_address_key(self) -> None:
        self.assertEqual(address_key(" A@B\u00dcCHER.de "), "a@bücher.de")
        self.assertIsNone(address_key("nope"))


names = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")),
                max_size=30)
locals_ = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,20}[A-Za-z0-9]", fullmatch=True).filter(
    lambda s: ".." not in s)
domains = st.sampled_from(["x.org", "example.com", "bücher.de", "xn--bcher-kva.de",
                           "mail.example.co.uk", "пример.рф"])


class Properties(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(names, locals_, domains)
    def test_formatted_addresses_read_back(self, name: str, local: str, domain: str) -> None:
        email = "%s@%s" % (local, domain)
        r = one(format_address(name, email))
        self.assertEqual(r.key, address_key(email))
        expected = clean_name(name)
        if address_key(expected) == r.key:
            expected = ""
        self.assertEqual(r.name, expected)

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=80))
    def test_any_text_gives_recipients_or_reasons_never_an_exception(self, text: str) -> None:
        parsed = parse_entries([text])
        for r in parsed.recipients:
            self.assertEqual(address_key(r.email), r.key)
            self.assertNotIn("\n", r.name)
            self.assertEqual(r.name, r.name.strip())
        for bad in parsed.rejected:
            self.assertTrue(bad.reason)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(names, locals_, domains), max_size=6))
    def test_a_joined_list_gives_each_address_once(self, items: list) -> None:
        text = ", ".join(format_address(n, "%s@%s" % (lo, d)) for n, lo, d in items)
        parsed = parse_entries([text])
        keys = {address_key("%s@%s" % (lo, d)) for _, lo, d in items}
        self.assertEqual({r.key for r in parsed.recipients}, keys)
        self.assertEqual(len(parsed.recipients), len(keys))
