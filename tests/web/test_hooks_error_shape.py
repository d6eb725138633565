"""Every error a client of the hooks can meet has one shape, on a real ``twistd mailhub``.

GroupServer's ``{"status": N, "message": [reasons]}`` (doc/hooks.rst,
"Answers and errors"): N is 100 when the request's content is refused (400,
403, 413), else the HTTP status (404, 405, 503). That holds for what the
hooks answer themselves and for what the site answers before the hooks see
the request (an unknown ``/gs-*`` path, a body over ``[mailhub] max_body``).

The hooks answer no 401, 415 or 429: Basic credentials are not theirs (the
token is), any content type is read as a form (GroupServer's clients send
all sorts), and a token that keeps failing is slowed down, then refused with
403. Those requests are sent too, and their answers must have the shape.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.process import Mailhub

MAX_BODY = 4096
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("hooks-errors")
    with Mailhub(folder, "[mailhub]\nmax_body = %d\n" % MAX_BODY) as mailhub:
        mailhub_cli = str(Path(sys.executable).with_name("mailhub"))
        done = subprocess.run([mailhub_cli, "token", "create", "--config",
                               str(folder / "mailhub.ini")], cwd=folder, capture_output=True,
                              text=True, timeout=60, check=True)
        yield mailhub, done.stdout.splitlines()[1]


def assert_hook_shape(status: int, body: Any, expected: int, where: str) -> None:
    assert status == expected, (where, status, body)
    assert isinstance(body, dict) and set(body) == {"status", "message"}, (where, body)
    assert body["status"] == (100 if expected in (400, 403, 413) else expected), (where, body)
    assert isinstance(body["message"], list) and body["message"], (where, body)
    assert all(isinstance(m, str) and m for m in body["message"]), (where, body)


def test_every_error_of_the_hooks_has_one_shape(site: Any) -> None:
    mailhub, token = site
    search = "/gs-search-people.json"
    cases: list[tuple[str, int, str, str, bytes | None, dict[str, str]]] = [
        ("400 missing user", 400, "POST", search, b"token=%s&search" % token.encode(), FORM),
        ("400 bad JSON", 400, "POST", search, b"{", {"Content-Type": "application/json"}),
        ("400 not UTF-8", 400, "POST", search, b"search&user=\xff", FORM),
        ("403 no token", 403, "POST", search, b"search&user=a%40b.example", FORM),
        ("403 wrong token", 403, "POST", "/gs-group-groups.json", b"token=wrong&get", FORM),
        ("404 unknown hook", 404, "POST", "/gs-nothing.json", b"get", FORM),
        ("404 below a hook", 404, "GET", search + "/more", None, {}),
        ("405 PUT", 405, "PUT", search, b"search", FORM),
        ("405 DELETE", 405, "DELETE", "/gs-group-groups.json", None, {}),
        ("413 body over max_body", 413, "POST", search,
         b"search&user=" + b"a" * (MAX_BODY + 1), FORM),
        # What would be 401 elsewhere: Basic credentials mean nothing to the hooks.
        ("(401) Basic instead of a token", 403, "POST", search, b"search&user=x",
         dict(FORM, Authorization="Basic " + base64.b64encode(b"admin:secret").decode())),
        # What would be 415 elsewhere: an odd content type is read as a form.
        ("(415) XML body", 400, "POST", search + "?search&token=" + token,
         b"<user>a@b.example</user>", {"Content-Type": "application/xml"}),
        ("(415) JSON array", 400, "POST", search, b"[1]",
         {"Content-Type": "application/json"}),
    ]
    for where, expected, method, path, body, headers in cases:
        status, answer = mailhub.request(method, path, body, headers)
        assert_hook_shape(status, answer, expected, where)


def test_a_token_that_keeps_failing_is_refused_in_the_shape_never_429(site: Any) -> None:
    mailhub, token = site
    for attempt in range(4):  # slowed down: 0, 0.25, 0.5 and 1 s
        status, answer = mailhub.request("POST", "/gs-group-groups.json",
                                         b"token=wrong-%d&get" % attempt, FORM)
        assert_hook_shape(status, answer, 403, "(429) attempt %d" % attempt)


def test_the_rest_of_the_site_keeps_its_own_shape(site: Any) -> None:
    mailhub, _ = site
    status, answer = mailhub.request("GET", "/nothing")
    assert (status, answer) == (404, {"error": "no such resource: /nothing"})
    status, answer = mailhub.request("POST", "/mailstore", b"cmd=list&x=" + b"a" * MAX_BODY,
                                     FORM)
    assert status == 413 and set(answer) == {"error"}, answer


def test_the_openapi_document_names_the_shape_of_each_error(site: Any) -> None:
    mailhub, _ = site
    _, document = mailhub.get("/openapi.json")
    schemas = document["components"]["schemas"]
    for path, item in document["paths"].items():
        if not path.startswith("/gs-"):
            continue
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if status == "200":
                    continue
                schema = json.dumps(response["content"]["application/json"]["schema"])
                assert ("GroupServerError" in schema) == (status in ("400", "403", "413")), \
                    (path, method, status, schema)
                assert "HookError" in schema or status in ("400", "403", "413"), schema
    assert schemas["GroupServerError"]["properties"]["status"] == {"type": "integer",
                                                                   "const": 100}


class TestSiteRefusalShape:
    """What the site refuses before any surface sees it (a body too large, a
    request on a connection kept for health checks) is in the hooks' shape on
    ``/gs-*`` paths and in the site's elsewhere (``Root.shape_errors``)."""

    def site(self) -> Any:
        from twisted.internet.task import Clock

        from mailhub.metrics import Metrics
        from mailhub.web.hooks import hook_error_body
        from mailhub.web.site import MailhubSite, Root

        clock = Clock()
        root = Root(Metrics())
        root.shape_errors(b"gs-", hook_error_body)
        return MailhubSite(root, 64, max_connections=3, health_reserve=1, header_timeout=5,
                           metrics=Metrics(), reactor=clock)

    def answer(self, site: Any, data: bytes) -> tuple[bytes, Any]:
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(data)
        # HTTP/1.0 requests: the body is sent as it is, not chunked.
        head, _, body = transport.value().partition(b"\r\n\r\n")
        return head, json.loads(body) if body else None

    def test_a_body_over_the_limit(self) -> None:
        site = self.site()
        big = b"x" * 100
        for path, expected in ((b"/gs-search-people.json", {"status": 100, "message": [
                                   "request body larger than 64 bytes"]}),
                               (b"/mailstore", {"error": "request body larger than 64 bytes"})):
            head, body = self.answer(site, b"POST %s HTTP/1.0\r\nHost: x\r\nContent-Length: "
                                     b"100\r\n\r\n%s" % (path, big))
            assert head.startswith(b"HTTP/1.0 413"), head
            assert body == expected, (path, body)

    def test_a_request_on_the_health_reserve(self) -> None:
        site = self.site()
        busy = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
        self.answer(site, busy)
        self.answer(site, busy)
        head, body = self.answer(site, b"GET /gs-group-groups.json HTTP/1.0\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 503"), head
        assert body == {"status": 503, "message": ["too many connections, try again"]}, body
        assert b"Retry-After: 1" in head or b"retry-after: 1" in head.lower(), head
