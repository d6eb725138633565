"""One JSON decoder and one address validator: their rules, and every queue that uses them."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
from typing import Any
from unittest import SkipTest

from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailhub.collector.carddav import BookLayout, CardDAVClient
from mailhub.collector.engine import CollectorEngine
from mailhub.decoding import (
    MAX_BYTES, MAX_DEPTH, address_problem, decode_json, decode_json_object, sanitise_address,
)
from mailhub.directory.model import User
from mailhub.errors import ValidationError
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.pubsub.workqueue import REASON_HEADER, WorkQueue
from tests.collector.fakes import FakeCardDAV, FakeUsers
from tests.pubsub.fakes import FakeBroker, FakeChannel, FakeDelivery


def nested(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


#: Inputs every decoder site refuses, with (part of) the reason it gives.
REFUSED = {
    b'{"a": NaN}': "NaN is not JSON",
    b'{"a": Infinity}': "Infinity is not JSON",
    b'{"a": -Infinity}': "-Infinity is not JSON",
    b'{"a": 1e400}': "would read as Infinity",
    b'[-1.5e999]': "would read as Infinity",
    b'{"a": ' + nested(MAX_DEPTH) + b"}": "nested too deeply",
    b"[" * 200_000: "nested too deeply",
    '{"a": "b"}'.encode("utf-16"): "not valid UTF-8",
    '{"a": "b"}'.encode("utf-16-le"): "not valid JSON",
    '{"a": "b"}'.encode("utf-32"): "not valid UTF-8",
    b'\xef\xbb\xbf{"a": "b"}': "not valid JSON",
    b'{"a": "\\ud800"}': "lone surrogate",
    b'{"a": "' + b"x" * MAX_BYTES + b'"}': "larger than %d bytes" % MAX_BYTES,
}


class JSONRules(SynchronousTestCase):
    def test_each_refused_input_says_why(self) -> None:
        for raw, why in REFUSED.items():
            with self.assertRaises(ValidationError, msg=raw[:40]) as raised:
                decode_json(raw, "the body")
            self.assertIn(why, raised.exception.messages[0], raw[:40])
            self.assertTrue(raised.exception.messages[0].startswith("the body "))

    def test_depth_up_to_the_bound_is_accepted(self) -> None:
        self.assertEqual(decode_json(nested(MAX_DEPTH)), json.loads(nested(MAX_DEPTH)))
        self.assertEqual(decode_json_object(b'{"a": %s}' % nested(MAX_DEPTH - 1))["a"],
                         json.loads(nested(MAX_DEPTH - 1)))

    def test_brackets_inside_strings_do_not_count_as_depth(self) -> None:
        text = json.dumps({"subject": "[" * 500})
        self.assertEqual(decode_json(text), {"subject": "[" * 500})

    def test_surrogate_pairs_and_escaped_text_are_fine(self) -> None:
        self.assertEqual(decode_json(b'"\\ud83d\\ude00 \\u00e9"'), "\U0001f600 \u00e9")

    def test_a_bound_of_the_callers_own(self) -> None:
        with self.assertRaises(ValidationError):
            decode_json(b"[1, 2, 3]", max_bytes=5)

    def test_object_decoder_wants_an_object(self) -> None:
        for raw in (b"[1]", b'"a"', b"1", b"null"):
            with self.assertRaises(ValidationError) as raised:
                decode_json_object(raw, "the message")
            self.assertEqual(raised.exception.messages,
                             ["the message must be a JSON object"])

    @settings(max_examples=300, deadline=None)
    @given(st.recursive(
        st.none() | st.booleans() | st.integers() | st.text()
        | st.floats(allow_nan=False, allow_infinity=False),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner,
                                                                    max_size=4),
        max_leaves=20))
    def test_any_json_mailhub_could_write_reads_back_the_same(self, value: Any) -> None:
        for ensure_ascii in (True, False):
            text = json.dumps(value, ensure_ascii=ensure_ascii)
            self.assertEqual(decode_json(text.encode("utf-8", "surrogatepass")),
                             json.loads(text))

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=60))
    def test_any_bytes_give_a_value_or_a_validation_error(self, raw: bytes) -> None:
        try:
            decode_json(raw)
        except ValidationError as e:
            self.assertTrue(e.messages[0])


class AddressRules(SynchronousTestCase):
    # Moved from tests/web/test_hooks.py (check_address) with its assertions.
    def test_addresses(self) -> None:
        for good in ("a@example.com", "a.b+c@sub.example.co.uk", "o'neil@example.ie",
                     "a%b@example.com", "jörg@bücher.example", "x_y@example.com"):
            self.assertIsNone(address_problem(good), good)
        for bad in ("", "@example.com", "a@", "a@b", "a..b@example.com", "a@b..com",
                    "a(b)@example.com", "<a@example.com>", "a@example.com.", "a\x00@example.com"):
            self.assertIsNotNone(address_problem(bad), bad)

    def test_the_rules_of_the_collector_and_the_command_line_too(self) -> None:
        for good in ('"john doe"@x.org', "j@xn--bcher-kva.de", "üser@x.org",
                     "a+tag@x.org", "a@" + "x" * 63 + ".org"):
            self.assertIsNone(address_problem(good), good)
        for bad in ("not-an-address", "a b@c.org", "a@localhost", "a@1.2.3.4",
                    "a@[1.2.3.4]", "a@-x.org", "a@x_y.org", "a@" + "x" * 64 + ".org",
                    "x" * 65 + "@x.org", "x@y@z.org", "\ud800@x.org",
                    "a@" + ".".join(["x" * 60] * 5) + ".org"):
            self.assertIsNotNone(address_problem(bad), bad)


ALICE = User(login="alice@example.org", emails=("alice@example.org",), id="A1")


class QueueSites(SynchronousTestCase):
    """The collector's work queue: what the decoder refuses is a dead letter with the reason."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.broker = FakeBroker()
        self.channel = FakeChannel()
        self.broker.outbox.attach(self.channel)
        self.queue = WorkQueue(self.broker.outbox, "collector:email", self.clock,
                               retry_initial=1.0, retry_max=4.0,
                               metrics=self.broker.metrics, broker=self.broker)
        dav = FakeCardDAV()
        engine = CollectorEngine(
            FakeUsers([ALICE]),
            CardDAVClient(StubTreq(dav), self.clock, credentials=("svc", "pw")),
            BookLayout.from_config("http://dav.test/dav/", ""), Hub(), Metrics(), self.clock)
        self.queue.consume(engine.handle)

    def test_refused_messages_are_dead_lettered_with_the_reason(self) -> None:
        for n, (raw, why) in enumerate(REFUSED.items(), 1):
            delivery = FakeDelivery(raw)
            d = self.queue.handle(delivery)
            self.broker.outbox.ack(n, False)  # the broker confirms the dead letter
            self.successResultOf(d)
            self.assertEqual(delivery.acks, 1)
            route, body, properties = self.channel.published[-1]
            self.assertEqual(route.routing_key, "collector:email:dead")
            self.assertEqual(body, raw)
            reason = properties["headers"][REASON_HEADER]
            self.assertTrue(reason.startswith("the message "), reason)
            self.assertIn(why, reason, raw[:40])


#: Inputs of the add hook's ``email`` and what GroupServer's sanitise_address
#: (gs.profile.email.base: Python 2's parseaddr, then strip) made of each,
#: recorded with Python 2.7.18.
GROUPSERVER_SANITISED = [
    ('Name <a@x.org>', 'a@x.org'),
    ('<a@x.org>', 'a@x.org'),
    ('a@x.org,', 'a@x.org'),
    ('a@x.org, b@y.org', 'a@x.org'),
    ('a@x.org.', 'a@x.org'),
    ('"Q, N" <a@x.org>', 'a@x.org'),
    ('a@x.org (Name)', 'a@x.org'),
    ('bad', 'bad'),
    ('<>', ''),
    ('a b@x.org', 'ab@x.org'),
    ('a@x.org b@y.org', ''),
    ('a@x.org;', 'a@x.org'),
    ('[a@x.org]', ''),
    ('"q q"@x.org', '"q q"@x.org'),
    ('x <a@x.org', 'a@x.org'),
    ('a@x.org>', 'a@x.org'),
    ('"a@x.org"', 'a@x.org'),
    ('mailto:a@x.org', 'a@x.org'),
    ('a@exa mple.com', 'a@example.com'),
    ('a @x.org', 'a@x.org'),
    ('.a@x.org!', 'a@x.org'),
    ('(c) a@x.org', 'a@x.org'),
    ('a@x.org (c) (d)', 'a@x.org'),
    ('Group: a@x.org, b@y.org;', 'a@x.org'),
    ('A <a@x.org>, B <b@y.org>', 'a@x.org'),
    ('a@@x.org', ''),
    ('@x.org', '@x.org'),
    ('a@', ''),
    ('"a\\"b"@x.org', '"a\\"b"@x.org'),
    ('a(comment)@x.org', 'a@x.org'),
    ('a@[1.2.3.4]', 'a@[1.2.3.4'),
    (' ,a@x.org,,', ''),
    ('{a@x.org}', 'a@x.org'),
    ('a . b@x.org', 'a.b@x.org'),
    ('"a" b@x.org', '"a"b@x.org'),
    ('"a b" c d@x.org', '"a b"cd@x.org'),
    ('a\tb@x.org', 'ab@x.org'),
    ('A N <a b@x.org>', 'ab@x.org'),
    ('a b @ x . org', 'ab@x.org'),
    ('"a\\" b" c@x.org', '"a\\" b"c@x.org'),
]


class SanitiseAddress(SynchronousTestCase):
    def test_reads_every_form_as_groupserver_did(self) -> None:
        for given, expected in GROUPSERVER_SANITISED:
            self.assertEqual(sanitise_address(given), expected, given)

    def test_agrees_with_groupserver_code_under_python2_where_installed(self) -> None:
        # On PATH, or among pyenv's versions (its shims may not be on PATH).
        pyenv = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
        python2 = shutil.which("python2.7") or next(
            iter(sorted(glob.glob(os.path.join(pyenv, "versions", "2.7*", "bin", "python2.7")))),
            "")
        if not python2 or not os.path.exists(python2):
            raise SkipTest("no Python 2.7 here; the recorded table above still runs")
        script = ("import json, sys\n"
                  "from email.utils import parseaddr\n"
                  "given = json.load(sys.stdin)\n"
                  "print(json.dumps([parseaddr(t)[1].strip(',.!?; \\t\\n\\r<>(){}[]') "
                  "for t in given]))\n")
        given = [g for g, _ in GROUPSERVER_SANITISED] + [
            "A N <a.b@x.org>", "<a.b c@x.org>", '"x y" <"a b"@x.org>', "a,b@x.org"]
        done = subprocess.run([python2, "-c", script], input=json.dumps(given),
                              capture_output=True, text=True, timeout=60,
                              env={"PYENV_VERSION": "2.7.18", "PATH": os.environ["PATH"]})
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual([sanitise_address(g) for g in given], json.loads(done.stdout))

    def test_what_it_leaves_is_checked_by_the_one_validator(self) -> None:
        self.assertIsNone(address_problem(sanitise_address("A Person <a@example.com>,")))
        self.assertIsNotNone(address_problem(sanitise_address("a@[1.2.3.4]")))

    def test_deep_comments_and_long_texts_are_no_address_and_quick(self) -> None:
        # Python's parser recurses into nested comments; a client must not
        # turn that into an error, nor hold the reactor with a long text.
        self.assertEqual(sanitise_address("(" * 5000 + "a@example.com"), "")
        self.assertEqual(sanitise_address("(" * 900 + "a@example.com"), "")
        self.assertEqual(sanitise_address("a@example.com," * 100_000), "")
        self.assertEqual(sanitise_address(" " * 1000 + "<a@example.com>"), "a@example.com")

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet=st.sampled_from('a@.<>(),;"\\ \tx:[]!?{}é'), max_size=200))
    def test_never_raises_and_what_it_gives_needs_no_more_sanitising(self, text: str) -> None:
        once = sanitise_address(text)
        self.assertIsInstance(once, str)
        self.assertEqual(once.strip(",.!?; \t\n\r<>(){}[]"), once)
