"""The root resource: dispatch by first segment, mounted paths, JSON 404, metrics."""

from __future__ import annotations

import json

from klein import Klein
from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from mailhub.metrics import Metrics
from mailhub.web.common import json_routing_errors
from mailhub.web.ops import Operations
from mailhub.web.site import Root
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
        ops = Operations(self.metrics, {"database": lambda: (True, "sqlite"),
                                        "ldap": lambda: (False, "no server answered")},
                         lambda: {"openapi": "3.1.0", "paths": {}})
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
