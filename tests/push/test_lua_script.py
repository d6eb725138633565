"""The shipped Lua script under plain Lua 5.4, against fake Dovecot 2.4 and 2.3 APIs.

Debian has Dovecot 2.3 only, which test_dovecot_e2e.py drives for real. Here
``tests/push/lua/fake_dovecot.lua`` plays the push driver the way Dovecot's
sources do it (2.4.2 and 2.3.19: script_init, the mail user, dovecot.http and
its settings) and records each request the script submits; these tests read
the requests: method, URL, credentials, headers and JSON body.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import attrs
import pytest

from mailhub.push.dovecot_config import lua_script_path
from tests.support.require import require_program

HARNESS = Path(__file__).resolve().parent / "lua" / "fake_dovecot.lua"
URL = "http://127.0.0.1:8080/push/v1/notify"


@attrs.frozen
class Request:
    """One request the script submitted, as Dovecot would send it."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    userinfo: str | None = None

    @property
    def credentials(self) -> str | None:
        """The Basic credentials sent: the Authorization header, else the URL's."""
        header = self.headers.get("authorization")
        if header is not None:
            scheme, _, encoded = header.partition(" ")
            assert scheme == "Basic"
            return base64.b64decode(encoded).decode("utf-8")
        return self.userinfo

    def json(self) -> Any:
        return json.loads(self.body)


@attrs.define
class Run:
    """What the script did: client options, requests, log lines."""

    options: dict[str, str] = attrs.Factory(dict)
    requests: list[Request] = attrs.Factory(list)
    logs: list[tuple[str, str]] = attrs.Factory(list)


def lua(value: Any) -> str:
    """A Python value as a Lua literal (str, int, float, bool, list, dict)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"%s"' % "".join("\\%d" % b for b in value.encode("utf-8"))
    if isinstance(value, list):
        return "{%s}" % ", ".join(lua(v) for v in value)
    if isinstance(value, dict):
        return "{%s}" % ", ".join("[%s] = %s" % (lua(k), lua(v)) for k, v in value.items())
    raise TypeError(value)


def run(tmp_path: Path, version: str, settings: dict[str, str],
        transactions: list[dict[str, Any]], responses: list[int] | None = None,
        script: Path | None = None) -> Run:
    """Run a script (default: the installed one) in the fake Dovecot."""
    interpreter = require_program("lua5.4")
    scenario = tmp_path / "scenario.lua"
    scenario.write_text("return " + lua({"version": version, "settings": settings,
                                         "transactions": transactions,
                                         "responses": responses or []}))
    done = subprocess.run([interpreter, str(HARNESS), str(script or lua_script_path()),
                           str(scenario)], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    result, current = Run(), None
    for line in done.stdout.decode("ascii").splitlines():
        kind, *values = line.split(" ")
        text = [bytes.fromhex(v).decode("utf-8", "surrogateescape") for v in values]
        if kind == "option":
            result.options[text[0]] = text[1]
        elif kind == "log":
            result.logs.append((text[0], text[1]))
        elif kind == "request":
            current = {"headers": {}}
        else:
            assert current is not None, line
            if kind == "header":
                name, _, value = text[0].partition(": ")
                current["headers"][name.lower()] = value
            elif kind == "body":
                current["body"] = bytes.fromhex(values[0])
                result.requests.append(Request(**current))
                current = None
            else:
                current[kind] = text[0]
    return result


def no_floats(text: str) -> Any:
    pytest.fail("a number with a fraction in the body: %s" % text)


NEW = {"name": "MessageNew", "mailbox": "INBOX", "uid": 12, "uid_validity": 1700000000,
       "date": 1704099600, "tz": 60, "from": "Zoë <zoe@example.org>",
       "to": "alice@example.org", "from_address": "zoe@example.org",
       "from_display_name": "Zoë", "to_address": "alice@example.org",
       "to_display_name": "", "subject": "Lunch?", "snippet": "Shall we?",
       "message_id": "<lunch@example.org>", "flags": [], "keywords": []}
CREATE = {"name": "MailboxCreate", "mailbox": "Archive"}
SETTINGS = {"mailhub_push_url": URL, "mailhub_push_username": "dovecot",
            "mailhub_push_password": "push-s3cret"}


@pytest.mark.parametrize("version", ["2.4", "2.3"])
def test_one_post_per_transaction_with_every_event_as_json(tmp_path: Path,
                                                           version: str) -> None:
    done = run(tmp_path, version, SETTINGS, [
        {"user": "alice", "events": [NEW, CREATE]},
        {"user": "bob", "events": [{"name": "FlagsSet", "mailbox": "INBOX", "uid": 3,
                                    "uid_validity": 9, "flags": ["\\Seen"],
                                    "keywords": ["$label1"]}]},
    ])
    assert done.logs == []
    first, second = done.requests
    assert (first.method, first.url, first.credentials) == ("POST", URL, "dovecot:push-s3cret")
    assert first.headers["content-type"] == "application/json; charset=utf-8"
    # Dovecot hands uid and the dates over as floats (12.0): they leave as integers.
    assert json.loads(first.body, parse_float=no_floats) == {"user": "alice",
                                                             "events": [NEW, CREATE]}
    assert second.json() == {"user": "bob", "events": [
        {"name": "FlagsSet", "mailbox": "INBOX", "uid": 3, "uid_validity": 9,
         "flags": ["\\Seen"], "keywords": ["$label1"]}]}


def test_on_dovecot_24_settings_come_from_script_init_and_the_client_gets_24_names(
        tmp_path: Path) -> None:
    done = run(tmp_path, "2.4", {**SETTINGS, "mailhub_push_timeout_msecs": "1500"},
               [{"user": "alice", "events": [NEW]}])
    assert [r.credentials for r in done.requests] == ["dovecot:push-s3cret"]
    # 2.4 refuses 2.3's request_timeout_msecs and max_attempts, and wants units.
    assert done.options == {"request_timeout": "1500 msecs", "request_max_attempts": "2",
                            "user_agent": "dovecot-mailhub-push/1"}


def test_on_dovecot_23_the_client_keeps_its_23_settings(tmp_path: Path) -> None:
    done = run(tmp_path, "2.3", {**SETTINGS, "mailhub_push_timeout_msecs": "1500"},
               [{"user": "alice", "events": [NEW]}])
    assert done.options == {"request_timeout_msecs": "1500", "max_attempts": "2",
                            "user_agent": "dovecot-mailhub-push/1"}
    assert len(done.requests) == 1


@pytest.mark.parametrize("version", ["2.4", "2.3"])
def test_credentials_in_the_url_are_left_to_dovecot(tmp_path: Path, version: str) -> None:
    done = run(tmp_path, version,
               {"mailhub_push_url": "http://dovecot:push-s3cret@127.0.0.1:8080/push/v1/notify"},
               [{"user": "alice", "events": [CREATE]}])
    [request] = done.requests
    assert "authorization" not in request.headers
    assert (request.url, request.credentials) == (URL, "dovecot:push-s3cret")


def test_on_dovecot_24_a_missing_url_is_logged_and_nothing_is_sent(tmp_path: Path) -> None:
    done = run(tmp_path, "2.4", {}, [{"user": "alice", "events": [NEW]}])
    assert done.requests == []
    assert done.logs == [("error", "mailhub-push: mailhub_push_url is not set "
                                   "(lua_settings section)")]


def test_failed_or_empty_transactions_send_nothing(tmp_path: Path) -> None:
    done = run(tmp_path, "2.4", SETTINGS, [
        {"user": "alice", "events": [NEW], "success": False},
        {"user": "alice", "events": []},
    ])
    assert (done.requests, done.logs) == ([], [])


def test_a_refusal_is_logged_without_the_password(tmp_path: Path) -> None:
    done = run(tmp_path, "2.4",
               {"mailhub_push_url": "http://dovecot:push-s3cret@127.0.0.1:8080/push/v1/notify"},
               [{"user": "alice", "events": [NEW, CREATE]}], responses=[503])
    assert len(done.requests) == 1
    assert done.logs == [("error", "mailhub-push: http://127.0.0.1:8080/push/v1/notify "
                                   "answered 503 Service Unavailable for 2 event(s)")]


def test_every_event_the_driver_offers_is_sent(tmp_path: Path) -> None:
    names = ["MessageNew", "MessageAppend", "MessageRead", "MessageTrash", "MessageExpunge",
             "FlagsSet", "FlagsClear", "MailboxCreate", "MailboxDelete", "MailboxRename",
             "MailboxSubscribe", "MailboxUnsubscribe"]
    events = [{"name": name, "mailbox": "INBOX"} for name in names]
    [request] = run(tmp_path, "2.4", SETTINGS, [{"user": "alice", "events": events}]).requests
    assert [e["name"] for e in request.json()["events"]] == names


def test_the_fake_24_api_refuses_what_24_refuses(tmp_path: Path) -> None:
    """The harness bites: a script written for 2.3 only fails on it as on 2.4."""
    script = tmp_path / "only-23.lua"
    script.write_text(
        'function dovecot_lua_notify_begin_txn(user)\n'
        '  return {url = user:plugin_getenv("mailhub_push_url")}\n'
        'end\n'
        'function dovecot_lua_notify_event_message_new(ctx, event) end\n'
        'function dovecot_lua_notify_end_txn(ctx, success)\n'
        '  dovecot.http.client({request_timeout_msecs = 2000})\n'
        'end\n')
    done = run(tmp_path, "2.4", SETTINGS, [{"user": "alice", "events": [NEW]}], script=script)
    [(level, message)] = done.logs
    assert level == "error" and "attempt to call a nil value (method 'plugin_getenv')" in message
    script.write_text(script.read_text().replace('user:plugin_getenv("mailhub_push_url")', '""'))
    done = run(tmp_path, "2.4", SETTINGS, [{"user": "alice", "events": [NEW]}], script=script)
    [(level, message)] = done.logs
    assert "request_timeout_msecs is unknown setting" in message
