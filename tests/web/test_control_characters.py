"""NUL and other control characters are refused at the edge, on both databases.

PostgreSQL refuses NUL in text (psycopg's DataError), which reached the
clients as a 500 on ``/gs-search-people.json?user=%00`` and on ``leave``
with ``userId=%00``. Every hook and the MailStore surface now answer 400
with a JSON body before any store sees such a value. Each test runs on a
real SQLite file and a throwaway PostgreSQL database (the SQL runs inline).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlencode

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase

from mailhub.config import Config, MailhubSection, MailStoreSection
from mailhub.directory.service import Directory
from mailhub.directory.model import Email, Group, Profile
from mailhub.directory.sql import SQLStore, dialect_for
from mailhub.directory.users import SiteUserSource
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.web.common import refuse_controls
from mailhub.web.hooks import GroupHooks
from mailhub.web.mailstore import MailStoreIntegration
from mailhub.errors import ValidationError
from tests.support.deferreds import result
from tests.support.postgres import throwaway_database

TOKEN = "0123456789abcdefghijABCDEFGHIJ01"
BASE = "http://127.0.0.1"
FORM = {b"content-type": [b"application/x-www-form-urlencoded"]}
JSON = {b"content-type": [b"application/json"]}
ALICE = Profile(id="qK7SgjsTHcLNrJ2ClevcJ0", name="A Person",
                emails=(Email("a.person@example.com", True, True),))
#: Each hook with fields that would be valid but for the control character.
HOOK_FIELDS = {
    "/gs-group-groups.json": {"get": ""},
    "/gs-group-member-add.json": {"add": "", "groupId": "example", "email": "x@example.com",
                                  "fn": "X"},
    "/gs-search-people.json": {"search": "", "user": ALICE.id},
    "/gs-site-member-list.json": {"users": ""},
    "/gs-group-member-leave.json": {"leave": "", "groupId": "example", "userId": ALICE.id},
}
MAILSTORE_AUTH = {b"authorization": [b"Basic bWFpbHN0b3JlOlBhc3N3MHJk"]}  # mailstore:Passw0rd


class _ControlCharacters:
    """The tests; subclasses say which database the store uses."""

    def make_store(self) -> Iterator[str]:
        raise NotImplementedError

    def setUp(self) -> None:  # noqa: D401 (trial's name)
        dsns = self.make_store()
        dsn = next(dsns)
        self.addCleanup(lambda: next(dsns, None))  # type: ignore[attr-defined]
        self.store = SQLStore(dialect_for(dsn))
        self.addCleanup(self.store.close_all)  # type: ignore[attr-defined]
        result(self.store.migrate())
        result(self.store.set_token(TOKEN))
        result(self.store.create_group(Group("example", "Example", "example@example.com",
                                             "discussion", "public")))
        result(self.store.create_profile(ALICE))
        result(self.store.add_member("example", ALICE.id))
        clock = Clock()
        self.directory = Directory(self.store, clock)
        result(Deferred.fromCoroutine(self.directory.load()))
        config = Config(mailhub=MailhubSection(site_url="https://groups.example.com/",
                                               max_body=1024 * 1024),
                        mailstore=MailStoreSection(username="mailstore", password="Passw0rd"))
        self.hooks = StubTreq(GroupHooks(self.directory, config, Metrics(), Hub()).resource())
        pool = ThreadPool(minthreads=0, maxthreads=1)  # never started: nothing may hash
        users = SiteUserSource(self.store, clock, pool)
        self.mailstore = StubTreq(MailStoreIntegration(config, users, Hub(), Metrics(),
                                                       clock).resource())

    def send(self, http: StubTreq, url: str, body: bytes,
             headers: dict[bytes, list[bytes]]) -> tuple[int, Any]:
        d = http.request("POST", url, data=body, headers=headers)
        http.flush()
        response = result(d)
        raw = result(response.content())
        ctype = response.headers.getRawHeaders(b"content-type", [b""])[0]
        assert ctype.startswith(b"application/json"), (response.code, ctype, raw)
        return response.code, json.loads(raw)

    def test_nul_in_a_search_or_leave_is_400_not_500(self) -> None:
        for path, query in (("/gs-search-people.json", "search&user=%00"),
                            ("/gs-group-member-leave.json",
                             "leave&groupId=example&userId=%00")):
            status, body = self.send(self.hooks, BASE + path + "?" + query,
                                     ("token=" + TOKEN).encode(), FORM)
            self.assertEqual(status, 400, (path, body))  # type: ignore[attr-defined]
            self.assertEqual(body["status"], 100)  # type: ignore[attr-defined]
            self.assertIn("control character", body["message"][0])  # type: ignore

    def test_every_hook_refuses_control_characters_in_form_and_json_bodies(self) -> None:
        for path, fields in HOOK_FIELDS.items():
            for name in fields:
                for bad in ("\x00", "a\x01b", "\x1b[31m", "x\x7f"):
                    changed = {**fields, "token": TOKEN, name: bad}
                    for body, headers in ((urlencode(changed).encode(), FORM),
                                          (json.dumps(changed).encode(), JSON)):
                        status, answer = self.send(self.hooks, BASE + path, body, headers)
                        self.assertEqual(  # type: ignore[attr-defined]
                            (status, answer["status"]), (400, 100), (path, name, bad, body))

    def test_a_control_character_in_a_field_name_is_refused(self) -> None:
        status, body = self.send(self.hooks, BASE + "/gs-search-people.json",
                                 ("token=%s&search&user=%s&x%%00=1" % (TOKEN, ALICE.id)).encode(),
                                 FORM)
        self.assertEqual(status, 400)  # type: ignore[attr-defined]
        self.assertIn("x\\x00", body["message"][0])  # type: ignore[attr-defined]

    def test_the_token_itself_is_checked_before_the_store_is_asked(self) -> None:
        status, body = self.send(self.hooks, BASE + "/gs-search-people.json",
                                 b"token=%00&search&user=x", FORM)
        self.assertEqual((status, body["status"]), (400, 100))  # type: ignore[attr-defined]

    def test_tab_and_line_ends_still_pass(self) -> None:
        status, body = self.send(self.hooks, BASE + "/gs-search-people.json",
                                 urlencode({"token": TOKEN, "search": "",
                                            "user": ALICE.id}).encode(), FORM)
        self.assertEqual((status, body["id"]), (200, ALICE.id))  # type: ignore[attr-defined]
        status, body = self.send(
            self.hooks, BASE + "/gs-group-member-add.json",
            urlencode({"token": TOKEN, "add": "", "groupId": "example",
                       "email": "new@example.com", "fn": "New Person",
                       "biography": "line one\r\nline two\tend"}).encode(), FORM)
        self.assertEqual((status, body["status"]), (200, 0))  # type: ignore[attr-defined]

    def test_mailstore_refuses_nul_in_user_and_pass(self) -> None:
        for fields in ({"cmd": "auth", "user": "\x00", "pass": "x"},
                       {"cmd": "auth", "user": "a.person@example.com", "pass": "a\x00"},
                       {"cmd": "li\x00st"}):
            for body, headers in ((urlencode(fields).encode(), FORM),
                                  (json.dumps(fields).encode(), JSON)):
                status, answer = self.send(self.mailstore, "http://mailhub.test/",
                                           body, {**headers, **MAILSTORE_AUTH})
                self.assertEqual(status, 400, (fields, answer))  # type: ignore[attr-defined]
                self.assertIn("control character", answer["error"])  # type: ignore


class SQLiteControlCharacterTests(_ControlCharacters, SynchronousTestCase):
    def make_store(self) -> Iterator[str]:
        with tempfile.TemporaryDirectory() as folder:
            yield "sqlite:///%s" % (Path(folder) / "db.sqlite")


class PostgreSQLControlCharacterTests(_ControlCharacters, SynchronousTestCase):
    def make_store(self) -> Iterator[str]:
        with throwaway_database() as dsn:
            yield dsn


class RefuseControlsTests(SynchronousTestCase):
    def test_names_every_bad_field_escaped(self) -> None:
        with self.assertRaises(ValidationError) as caught:
            refuse_controls({"a": "ok", "b": "\x00", "c\r\n": "fine", "d": "\x1f"})
        self.assertEqual(len(caught.exception.messages), 2)
        self.assertTrue(caught.exception.messages[0].startswith("field b holds"))
        self.assertNotIn("\x00", str(caught.exception))

    def test_tab_cr_lf_and_unicode_are_allowed(self) -> None:
        refuse_controls({"bio": "a\tb\r\nc", "name": "Jörg \u2028 名前 \U0001F600"})
