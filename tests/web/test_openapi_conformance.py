"""``/openapi.json`` is exact: schemathesis ``--checks all`` finds nothing on a real mailhub.

A real ``twistd mailhub`` with data in it (two groups, members, a user with a
password, the site token, push and MailStore credentials) serves its own
document; schemathesis reads it from ``/openapi.json`` and drives every JSON
endpoint with it: the GroupServer hooks (form-encoded and JSON bodies, GET
queries, with the site token from the security scheme), both push receivers
(Basic), MailStore, the calendar collector, ``/healthz``, ``/openapi.json``,
and the error answers each documents (400, 401, 403, 404, 405, 413, 503).
Every check runs: a schema-valid request must be accepted, a schema-invalid
one refused, every answer's status, media type, headers and body must be
documented, and no request may give a 500.

The event stream (``/api/v1/events``, Server-Sent Events that last until the
client leaves) is not JSON and is left out; ``/metrics`` is text.

Bounded and repeatable: a fixed seed, deterministic generation, a few
examples per operation. A valid add request names a group the site has
(tests/web/openapi_site_data.py), so a schema-valid request means one the
site can carry out.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.process import Mailhub

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
MAILHUB = str(BIN / "mailhub")
SCHEMATHESIS = BIN / "st"

PUSH = ("dovecot", "push-basic-secret")
MAILSTORE = ("mailstore", "ms-basic-secret")
ALICE = ("alice@example.org", "wonderland")

CONFIG = """\
[mailstore]
username = %s
password = %s
[push]
username = %s
password = %s
""" % (MAILSTORE + PUSH)

#: Examples per operation and phase: the whole run stays well under two
#: minutes on a loaded two-core machine.
MAX_EXAMPLES = 5


def _cli(folder: Path, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run([MAILHUB, *args, "--config", str(folder / "mailhub.ini")],
                          cwd=folder, input=stdin, capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout


def _site_with_data(folder: Path) -> str:
    """Groups, users and members in ``folder``'s site; the site token."""
    (folder / "mailhub.ini").write_text(CONFIG)
    token = _cli(folder, "token", "create").splitlines()[1].strip()
    _cli(folder, "group", "add", "--name", "Team", "--email", "team@example.org", "team")
    _cli(folder, "group", "add", "--name", "Quiet", "--privacy", "secret", "quiet")
    _cli(folder, "user", "add", "--name", "Alice", "--password-stdin", ALICE[0],
         stdin=ALICE[1] + "\n")
    _cli(folder, "user", "add", "--name", "Bob", "bob@example.org")
    return token


def _schemathesis_config(token: str) -> str:
    return """\
seed = 20261202
continue-on-failure = true

[generation]
deterministic = true
max-examples = %(examples)d
database = "none"

# The coverage phase (every boundary of every schema, thousands of requests)
# once per handler: PUT and POST of a push endpoint are one handler, and
# /gs-site-member.json is /gs-site-member-list.json. The fuzzing and
# stateful phases still send every operation its examples.
[[operations]]
include-method = "PUT"
phases.coverage.enabled = false

[[operations]]
include-path = "/gs-site-member.json"
phases.coverage.enabled = false

[auth.openapi.siteToken]
api_key = "%(token)s"
[auth.openapi.siteTokenBearer]
bearer = "%(token)s"
[auth.openapi.pushBasic]
username = "%(push_user)s"
password = "%(push_password)s"
[auth.openapi.mailstoreBasic]
username = "%(ms_user)s"
password = "%(ms_password)s"
[auth.openapi.siteUserBasic]
username = "%(alice)s"
password = "%(alice_password)s"

""" % {"examples": MAX_EXAMPLES, "token": token, "push_user": PUSH[0],
       "push_password": PUSH[1], "ms_user": MAILSTORE[0], "ms_password": MAILSTORE[1],
       "alice": ALICE[0], "alice_password": ALICE[1]}


def test_schemathesis_finds_nothing_with_every_check(tmp_path: Path) -> None:
    if not SCHEMATHESIS.exists():
        pytest.skip("schemathesis is not installed (it is in the test extras)")
    token = _site_with_data(tmp_path)
    settings = tmp_path / "schemathesis.toml"
    settings.write_text(_schemathesis_config(token))
    with Mailhub(tmp_path, config=CONFIG) as mailhub:
        # Members, so user_groups lists profiles (the empty list is checked
        # by the requests schemathesis makes before any add succeeds).
        status, _ = mailhub.post_form("/gs-group-member-add.json",
                                      "token=%s&add&groupId=team&email=alice%%40example.org"
                                      "&fn=Alice" % token)
        assert status == 200
        run = subprocess.run(
            [str(SCHEMATHESIS), "--config-file", str(settings), "run",
             mailhub.url + "/openapi.json", "--checks", "all",
             "--exclude-path", "/api/v1/events", "--workers", "1",
             "--request-timeout", "20", "--no-color",
             "--report", "junit", "--report-dir", str(tmp_path / "report")],
            cwd=tmp_path, capture_output=True, text=True, timeout=600,
            env=dict(os.environ, SCHEMATHESIS_HOOKS="tests.web.openapi_site_data",
                     PYTHONPATH=str(ROOT)))
        refused = _error_answers(mailhub, token)
    # Each failure with its curl line; long generated values cut short.
    report = "\n".join(line[:400] for line in (run.stdout + run.stderr).splitlines())
    assert run.returncode == 0, report[-30000:]
    assert refused == [], refused


def _error_answers(mailhub: Mailhub, token: str) -> list[str]:
    """Errors schemathesis does not provoke, each checked against the document:
    a body over ``max_body`` (413), a wrong token (403), no credentials (401)."""
    import jsonschema

    _, document = mailhub.get("/openapi.json")
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    cases = [
        ("/gs-group-groups.json", "post", 413, b"get&x=" + b"a" * (1024 * 1024 + 1), form,
         ""),
        ("/gs-group-groups.json", "post", 403, b"get&token=wrong", form, ""),
        ("/gs-search-people.json", "get", 403, None, {}, "?search&user=a%40b.example"),
        ("/push/v1/notify", "post", 401, b"{}", {"Content-Type": "application/json"}, ""),
        ("/mailstore", "post", 413, b"cmd=list&x=" + b"a" * (1024 * 1024), form, ""),
        ("/collector/v1/calendar", "post", 403, b"", {"Content-Type": "text/calendar"},
         "?user=alice%40example.org&token=wrong"),
    ]
    wrong = []
    for path, method, status, body, headers, query in cases:
        got, answer = mailhub.request(method.upper(), path + query, body, headers)
        described = document["paths"][path][method]["responses"].get(str(got))
        if got != status or described is None:
            wrong.append("%s %s: %s %r" % (method, path, got, answer))
            continue
        schema = dict(described["content"]["application/json"]["schema"],
                      components=document["components"])
        for error in jsonschema.Draft202012Validator(schema).iter_errors(answer):
            wrong.append("%s %s %s: %s" % (method, path, got, error.message))
    return wrong
