"""The root resource: dispatch by first segment, mounted paths, JSON 404, metrics."""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from twisted.internet.task import Clock

from mailhub.checks import Status, fixed
from mailhub.metrics import Metrics
from mailhub.web.common import json_routing_errors
from mailhub.web.ops import Operations
from mailhub.web.site import MailhubSite, Root
from tests.support.metrics import matching


class Echo:
    """A surface that answers with the path it saw."""

    app = Klein()
    json_routing_errors(app)

    @app.route("/", methods=["POST"])
    def top(self, request: object) -> bytes:
        return b"top"

    @app.route("/whole/<path:rest>", methods=["GET"])
    def whole(self, request: object, rest: str) -> bytes:
        return ("whole:" + rest).encode()


class RootTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = Metrics()
        ops = Operations(self.metrics, [fixed("database", Status.OK, "sqlite"),
                                        fixed("ldap", Status.FAIL, "no server answered")],
                         lambda: {"openapi": "3.1.0", "paths": {}}, Clock())
        root = Root(self.metrics, {b"healthz": ops.resource(), b"metrics": ops.resource(),
                                   b"whole": Echo().app.resource()})
        root.mount_at("/integration/mailstore", Echo().app.resource())
        self.client = StubTreq(root)

    def request(self, method: str, path: str) -> tuple[int, bytes]:
        response = self.successResultOf(self.client.request(method, "http://h" + path))
        return response.code, self.successResultOf(response.content())

    def test_a_surface_sees_the_whole_path(self) -> None:
        self.assertEqual(self.request("GET", "/whole/a/b"), (200, b"whole:a/b"))

    def test_a_surface_mounted_at_a_path_sees_it_as_its_root(self) -> None:
        self.assertEqual(self.request("POST", "/integration/mailstore"), (200, b"top"))
        self.assertEqual(self.request("POST", "/integration/mailstore/"), (200, b"top"))
        code, body = self.request("POST", "/integration/other")
        self.assertEqual(code, 404)

    def test_unknown_paths_and_methods_are_json(self) -> None:
        code, body = self.request("GET", "/nothing/here")
        self.assertEqual((code, json.loads(body)), (404, {"error": "no such resource: /nothing/here"}))
        code, body = self.request("GET", "/")
        self.assertEqual(code, 404)
        code, body = self.request("DELETE", "/healthz")
        self.assertEqual((code, json.loads(body)["error"]), (405, "method DELETE not allowed here"))

    def test_healthz_reports_each_dependency(self) -> None:
        code, body = self.request("GET", "/healthz")
        state = json.loads(body)
        self.assertEqual(code, 200)
        self.assertEqual(state["status"], "degraded")
        self.assertEqual(state["dependencies"]["ldap"], {"ok": False, "detail": "no server answered"})
        code, _ = self.request("GET", "/healthz?ready")
        self.assertEqual(code, 503)

    def test_requests_are_counted_by_route_with_bounded_labels(self) -> None:
        self.request("GET", "/healthz")
        for n in range(5):
            self.request("GET", "/random-%d" % n)
        self.assertEqual(self.metrics.value(
            "mailhub_http_requests_total", {"route": "/healthz", "method": "GET", "status": "200"}), 1)
        self.assertEqual(self.metrics.value(
            "mailhub_http_requests_total", {"route": "other", "method": "GET", "status": "404"}), 5)
        code, text = self.request("GET", "/metrics")
        self.assertTrue(matching(text, "mailhub_http_request_seconds_bucket"))


class DiscoveryTests(SynchronousTestCase):
    """RFC 6764: /.well-known/carddav and PROPFIND / lead to the embedded store."""

    def client(self, dav: bool) -> StubTreq:
        root = Root(Metrics(), {b"whole": Echo().app.resource()})
        if dav:
            root.serve_dav_discovery(b"/dav/")
        return StubTreq(root)

    def answer(self, client: StubTreq, method: str, path: str) -> tuple[int, list[bytes] | None]:
        response = self.successResultOf(client.request(method, "http://h" + path,
                                                       allow_redirects=False))
        self.successResultOf(response.content())
        return response.code, response.headers.getRawHeaders(b"location")

    def test_well_known_carddav_and_propfind_on_the_root_redirect_to_the_store(self) -> None:
        client = self.client(dav=True)
        for method in ("GET", "PROPFIND"):
            self.assertEqual(self.answer(client, method, "/.well-known/carddav"),
                             (301, [b"/dav/"]))
        self.assertEqual(self.answer(client, "PROPFIND", "/"), (301, [b"/dav/"]))
        self.assertEqual(self.answer(client, "GET", "/")[0], 404)
        self.assertEqual(self.answer(client, "GET", "/.well-known/caldav")[0], 404)

    def test_without_the_embedded_store_there_is_nothing_to_discover(self) -> None:
        client = self.client(dav=False)
        self.assertEqual(self.answer(client, "GET", "/.well-known/carddav")[0], 404)
        self.assertEqual(self.answer(client, "PROPFIND", "/")[0], 404)


class ConnectionBoundsTests(SynchronousTestCase):
    """MailhubSite's header deadline, cap and reserve, on a Clock."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.metrics = Metrics()
        ops = Operations(self.metrics, [], lambda: {"openapi": "3.1.0", "paths": {}},
                         self.clock)
        root = Root(self.metrics, {b"healthz": ops.resource(), b"whole": Echo().app.resource()})
        self.site = MailhubSite(root, 1024, max_connections=3, health_reserve=1,
                                header_timeout=5, metrics=self.metrics, reactor=self.clock)

    def connect(self, data: bytes = b"") -> tuple[Any, StringTransport]:
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321))
        transport = StringTransport()
        channel.makeConnection(transport)
        if data:
            channel.dataReceived(data)
        return channel, transport

    def dropped(self, reason: str) -> float:
        return self.metrics.value("mailhub_http_connections_dropped_total", {"reason": reason})

    def test_headers_not_sent_in_time_end_the_connection(self) -> None:
        _, slow = self.connect(b"GET /whole/a HTTP/1.1\r\nHost: x\r\n")
        _, prompt = self.connect(b"GET /whole/a HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", prompt.value())
        self.clock.advance(4.9)
        self.assertFalse(slow.disconnected)
        self.assertFalse(prompt.disconnected)
        self.clock.advance(0.2)
        self.assertTrue(slow.disconnected)
        # A kept-alive connection has as long to start its next request.
        self.assertTrue(prompt.disconnected)
        self.assertEqual(self.dropped("header_timeout"), 2)

    def test_at_the_cap_the_longest_waiting_connection_makes_room(self) -> None:
        _, first = self.connect(b"GET /whole/a HTTP/1.1\r\n")
        self.clock.advance(1)
        _, second = self.connect(b"GET /whole/a HTTP/1.1\r\n")
        self.connect(b"GET /whole/a HTTP/1.1\r\n")
        self.connect()
        self.assertTrue(first.disconnected)
        self.assertFalse(second.disconnected)
        self.assertEqual(self.dropped("evicted"), 1)

    def test_the_reserve_serves_health_checks_only_and_a_full_site_refuses(self) -> None:
        from twisted.internet import ssl
        from twisted.protocols.tls import TLSMemoryBIOFactory

        busy = b"POST /whole/a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
        self.connect(busy)
        self.connect(busy)
        _, other = self.connect(b"GET /whole/a HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"503 Service Unavailable", other.value())
        self.assertIn(b"too many connections", other.value())
        _, health = self.connect(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", health.value())
        self.connect(busy)  # the reserve is taken too: every connection is busy
        refused, transport = self.connect()
        self.assertTrue(transport.disconnected)
        self.assertEqual(len(self.site.connections), 3)
        self.assertEqual((self.dropped("reserve"), self.dropped("full")), (1, 1))
        # Behind TLS's wrapping factory a refused connection is a protocol too.
        tls = TLSMemoryBIOFactory(ssl.CertificateOptions(), False, self.site)
        self.assertIsNotNone(tls.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321)))
