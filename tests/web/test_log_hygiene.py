"""Log hygiene: expected events are not critical, untrusted text cannot forge lines.

- a client that hangs up while its request waits is an expected event, not a
  ``critical`` traceback (real socket, real reactor);
- logins, paths and headers holding CR/LF or escape sequences are escaped in
  every formatted log line, and in the access log;
- the embedded Radicale's logging goes to twisted.logger, warnings only, and a
  malformed PROPFIND body writes nothing to stderr.
"""

from __future__ import annotations

import base64
import io
import logging
import sys
from typing import Any

from klein import Klein
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import (
    LogLevel, formatEventAsClassicLogText, globalLogPublisher, ILogObserver,
)
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import provider

from mailhub.logs import access_log_formatter, printable, redact_uri, redact_url
from mailhub.metrics import Metrics
from mailhub.web.common import handle_errors
from mailhub.web.site import MailhubSite, Root


class _Waiting:
    """A surface whose one handler waits until the test says otherwise."""

    app = Klein()

    def __init__(self) -> None:
        self.started: Deferred[None] = Deferred()
        self.ended: Deferred[str] = Deferred()

    @app.route("/wait", methods=["GET"])
    @handle_errors
    async def wait(self, request: Any) -> bytes:
        self.started.callback(None)
        try:
            await Deferred()
        except BaseException as e:
            self.ended.callback(type(e).__name__)
            raise
        return b"never"


class _Events:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

        @provider(ILogObserver)
        def observe(event: dict[str, Any]) -> None:
            self.events.append(event)

        self.observer = observe
        globalLogPublisher.addObserver(observe)

    def stop(self) -> None:
        globalLogPublisher.removeObserver(self.observer)

    def lines(self) -> list[str]:
        return [formatEventAsClassicLogText(e) or "" for e in self.events]


class HangUpTests(TestCase):

    async def _hang_up_while_waiting(self) -> tuple[str, list[dict[str, Any]]]:
        surface = _Waiting()
        root = Root(Metrics(), {b"wait": surface.app.resource()})
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            MailhubSite(root, 1024))
        self.addCleanup(port.stopListening)
        events = _Events()
        self.addCleanup(events.stop)
        client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol())
        client.transport.write(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        await surface.started
        client.transport.loseConnection()
        ended = await surface.ended
        return ended, events.events

    async def test_a_client_that_hangs_up_while_waiting_is_not_critical(self) -> None:
        ended, events = await self._hang_up_while_waiting()
        self.assertEqual(ended, "CancelledError")
        serious = [e for e in events if e.get("log_level") in (LogLevel.critical, LogLevel.error)]
        self.assertEqual(serious, [])


FORGED = "ann\r\n2026-01-01T00:00:00+0000 [-] forged line\x1b[2J"


class EscapingTests(SynchronousTestCase):

    def test_printable_escapes_control_characters_and_backslashes(self) -> None:
        self.assertEqual(printable(FORGED),
                         "ann\\r\\n2026-01-01T00:00:00+0000 [-] forged line\\x1b[2J")
        self.assertEqual(printable(b"a\\n\xff\x00"), "a\\\\n\\\\xff\\x00")
        self.assertEqual(printable("line\u2028sep"), "line\\u2028sep")

    def test_the_access_log_escapes_what_the_client_sent(self) -> None:
        request = DummyRequest([b""])
        request.uri = b"/a%0d%0a?x=\r\n"
        request.method = b"GET"
        request.clientproto = b"HTTP/1.1"
        request.code = 200
        request.sentLength = 0
        request.requestHeaders.setRawHeaders(b"user-agent", [FORGED.encode()])
        line = access_log_formatter("[01/Jan/2026:00:00:00 +0000]", request)
        self.assertNotIn("\r", line)
        self.assertNotIn("\n", line)
        self.assertIn('"GET /a%0d%0a?x=\\r\\n HTTP/1.1"', line)
        self.assertIn("forged line\\x1b[2J", line)

    def test_secret_parameters_are_redacted(self) -> None:
        self.assertEqual(redact_uri(b"/mailstore?cmd=auth&user=ann&pass=s3&password=s4"),
                         "/mailstore?cmd=auth&user=ann&pass=***&password=***")
        self.assertEqual(redact_uri("/x?TOKEN=a&to%6Ben=b&tokens=c"),
                         "/x?TOKEN=***&to%6Ben=***&tokens=c")
        self.assertEqual(redact_uri("/x"), "/x")
        self.assertEqual(redact_url("postgresql://u:pw@db/hub?password=x&sslmode=require"),
                         "postgresql://u:***@db/hub?password=***&sslmode=require")
        self.assertEqual(redact_url("sqlite:///var/lib/mailhub/hub.sqlite"),
                         "sqlite:///var/lib/mailhub/hub.sqlite")

    def test_logins_with_line_breaks_are_escaped_in_the_event_stream_log(self) -> None:
        from mailhub.web.events import EventStream
        from mailhub.config import Config
        from mailhub.pubsub import Hub
        from tests.collector.fakes import FakeUsers

        events = _Events()
        self.addCleanup(events.stop)
        stream = EventStream(Config(), Hub(), Metrics(), FakeUsers([], {}), reactor)
        client = StubTreq(stream.resource())
        credentials = base64.b64encode((FORGED + ":pw").encode()).decode()
        response = self.successResultOf(client.get(
            "http://h/api/v1/events", headers={"Authorization": "Basic " + credentials}))
        self.assertEqual(response.code, 401)
        lines = [line for line in events.lines() if "ann" in line]
        self.assertTrue(lines, events.lines())
        for line in lines:
            self.assertEqual(line.count("\n"), 1, line)  # one line, its own newline
            self.assertNotIn("\r", line)
            self.assertNotIn("\x1b", line)


class RadicaleLoggingTests(SynchronousTestCase):

    def test_a_malformed_propfind_body_is_one_warning_and_nothing_on_stderr(self) -> None:
        import tempfile
        from pathlib import Path

        from mailhub.collector.embedded import radicale_app

        folder = Path(tempfile.mkdtemp())
        app = radicale_app(folder / "dav")
        events = _Events()
        self.addCleanup(events.stop)
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        environ = {
            "REQUEST_METHOD": "PROPFIND", "SCRIPT_NAME": "/dav", "PATH_INFO": "/ann/",
            "QUERY_STRING": "", "SERVER_NAME": "h", "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1", "REMOTE_USER": "ann",
            "CONTENT_LENGTH": "9", "CONTENT_TYPE": "application/xml", "HTTP_DEPTH": "0",
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(b"<not xml\r"), "wsgi.errors": io.StringIO(),
            "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        }
        status: list[str] = []
        b"".join(app(environ, lambda s, h, e=None: status.append(s)))
        self.assertEqual(status[0][:3], "400")
        self.assertEqual(stderr.getvalue(), "")
        radicale = [e for e in events.events if e.get("log_namespace") == "radicale"]
        self.assertTrue(radicale)
        self.assertTrue(all(e["log_level"] >= LogLevel.warn for e in radicale))
        for line in events.lines():
            self.assertNotIn("Traceback", line)
            self.assertEqual(line.count("\n"), 1, line)
        self.assertEqual(logging.getLogger("radicale").level, logging.WARNING)


def test_no_client_can_start_a_line_of_its_own_in_the_log(tmp_path: Any) -> None:
    """Logins with CR/LF on every login surface of a real twistd mailhub."""
    import re
    import urllib.parse

    from tests.support.process import Mailhub

    config = ("[mailstore]\nusername = mailstore\npassword = ms-pw\n"
              "[push]\nusername = dovecot\npassword = push-pw\n")

    def basic(login: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(
            ("%s:%s" % (login, password)).encode()).decode()}

    with Mailhub(tmp_path, config=config) as mailhub:
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        # A form field holding a control character is bad input, refused at
        # the edge before any login is tried (so before any log line names it).
        status, answer = mailhub.request(
            "POST", "/mailstore", ("cmd=auth&user=%s&pass=x" % urllib.parse.quote(
                FORGED)).encode(), dict(form, **basic("mailstore", "ms-pw")))
        assert status == 400 and "control character" in answer["error"], answer
        mailhub.request("PROPFIND", "/dav/", b"", basic(FORGED, "x"))
        mailhub.request("GET", "/api/v1/events", None, basic(FORGED, "x"))
        mailhub.request("POST", "/push/v1/notify", b"{}", dict(basic(FORGED, "x"), **{
            "Content-Type": "application/json"}))
        mailhub.request("POST", "/push/v1/notify", ('{"user": "%s"}' % FORGED.replace(
            "\r", "\\r").replace("\n", "\\n").replace("\x1b", "\\u001b")).encode(),
            dict(basic("dovecot", "push-pw"), **{"Content-Type": "application/json"}))
        mailhub.request("GET", "/%0d%0aforged%20line%1b", None, {"User-Agent": "ua\x1b[2J"})
    # Bytes, split at LF only: read_text() would turn a CR into a line break.
    log = mailhub.log.read_bytes().decode("utf-8", "replace")
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[")
    attempts = [line for line in log.split("\n") if "forged" in line or "ann" in line]
    assert len(attempts) >= 3, log  # dav, events, the path: logged, escaped
    for line in attempts:
        assert stamp.match(line), line
    assert "\x1b" not in log and "\r" not in log
