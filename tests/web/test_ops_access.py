"""Who may read ``/metrics`` and ``/openapi.json`` (issue 15, "What is open").

They answered anyone who reached the port. ``[mailhub] ops_user`` and
``ops_password`` make them ask for Basic credentials; ``[mailhub] ops_listen``
serves them on an address of their own (and no longer on the main one).
``/healthz`` stays open, on both, for load balancers.
"""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailhub.auth import Auth
from mailhub.checks import Status, fixed
from mailhub.config import parse
from mailhub.errors import ConfigError
from mailhub.metrics import Metrics
from mailhub.web.ops import Open, Operations, ops_credentials
from tests.support.process import Mailhub
from tests.support.require import free_port

DOCUMENT = {"openapi": "3.1.0", "paths": {}}


def basic(user: str, password: str) -> dict[bytes, list[bytes]]:
    token = base64.b64encode(("%s:%s" % (user, password)).encode("utf-8"))
    return {b"authorization": [b"Basic " + token]}


class CredentialsTests(SynchronousTestCase):
    """Operations behind ``[mailhub] ops_user`` / ``ops_password``, through StubTreq."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics()
        config = parse("[mailhub]\nops_user = prometheus\nops_password = env:OPS\n",
                       environ={"OPS": "sc-r3t"})
        self.auth = Auth(self.clock, self.metrics)
        ops = Operations(self.metrics, [fixed("database", Status.OK, "sqlite")],
                         lambda: DOCUMENT, self.clock,
                         credentials=ops_credentials(config.mailhub, self.auth))
        self.http = StubTreq(ops.resource())

    def get(self, path: str, headers: dict[bytes, list[bytes]] | None = None) -> tuple[int, bytes, object]:
        d = self.http.get("http://mailhub.example" + path, headers=headers)
        self.clock.advance(60)  # a refusal may be slowed down by the throttle
        response = self.successResultOf(d)
        self.clock.advance(60)
        body = self.successResultOf(response.content())
        return response.code, body, response.headers

    def test_metrics_and_openapi_refuse_a_request_without_credentials(self) -> None:
        for path in ("/metrics", "/openapi.json"):
            code, body, headers = self.get(path)
            self.assertEqual(code, 401, path)
            self.assertEqual(json.loads(body), {"error": "authentication required"})
            self.assertEqual(headers.getRawHeaders(b"www-authenticate"),  # type: ignore[attr-defined]
                             [b'Basic realm="mailhub operations", charset="UTF-8"'])

    def test_a_wrong_password_is_refused_and_counted(self) -> None:
        code, _, _ = self.get("/metrics", basic("prometheus", "guess"))
        self.assertEqual(code, 401)
        self.assertEqual(self.metrics.value("mailhub_auth_failures_total",
                                            {"surface": "ops", "reason": "wrong"}), 1)

    def test_the_right_credentials_read_metrics_and_openapi(self) -> None:
        code, body, headers = self.get("/metrics", basic("prometheus", "sc-r3t"))
        self.assertEqual(code, 200)
        self.assertIn(b"mailhub_auth_failures_total", body)
        self.assertEqual(headers.getRawHeaders(b"content-type"),  # type: ignore[attr-defined]
                         [b"text/plain; version=0.0.4; charset=utf-8"])
        code, body, _ = self.get("/openapi.json", basic("prometheus", "sc-r3t"))
        self.assertEqual((code, json.loads(body)), (200, DOCUMENT))

    def test_healthz_needs_no_credentials(self) -> None:
        code, body, _ = self.get("/healthz")
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body)["dependencies"]["database"]["ok"], True)

    def test_without_ops_user_anyone_may_read(self) -> None:
        self.assertIsInstance(ops_credentials(parse("").mailhub, self.auth), Open)

    def test_the_description_says_what_the_refusal_is(self) -> None:
        from jsonschema import validate

        from mailhub.web.openapi import site_document

        guarded = site_document(ops_credentials=True)
        code, body, _ = self.get("/metrics")
        for path in ("/metrics", "/openapi.json"):
            operation = guarded["paths"][path]["get"]
            self.assertEqual(operation["security"], [{"opsBasic": []}])
            refusal = operation["responses"]["401"]
            self.assertIn("WWW-Authenticate", refusal["headers"])
            schema = refusal["content"]["application/json"]["schema"]
            validate(json.loads(body), dict(schema, components=guarded["components"]))
        self.assertIn("opsBasic", guarded["components"]["securitySchemes"])
        open_ = site_document()["paths"]["/metrics"]["get"]
        self.assertEqual((open_["security"], sorted(open_["responses"])), ([], ["200"]))


def test_ops_user_and_password_go_together_and_the_password_is_secret() -> None:
    with pytest.raises(ConfigError) as caught:
        parse("[mailhub]\nops_user = prometheus\n", "/etc/mailhub/mailhub.ini", environ={})
    assert "[mailhub] ops_password: must be set too" in str(caught.value)
    config = parse("[mailhub]\nops_user = p\nops_password = env:X\n", environ={"X": "hidden-pw"})
    assert config.mailhub.ops_password == "hidden-pw"
    assert "hidden-pw" not in repr(config)


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_a_real_server_serves_metrics_and_openapi_only_on_the_ops_address(
        tmp_path: Path) -> None:
    ops_port = free_port()
    config = ("[mailhub]\ndata = %s\nops_listen = tcp:%d:interface=127.0.0.1\n"
              % (tmp_path / "data", ops_port))
    with Mailhub(tmp_path, config) as server:
        ops = "http://127.0.0.1:%d" % ops_port
        for path in ("/metrics", "/openapi.json"):
            code, body = fetch(server.url + path)
            assert code == 404, (path, body)
            assert "error" in json.loads(body)
            assert fetch(ops + path)[0] == 200, path
        assert b"mailhub_http_requests_total" in fetch(ops + "/metrics")[1]
        for where in (server.url, ops):
            code, body = fetch(where + "/healthz")
            assert code == 200
            assert json.loads(body)["dependencies"]["ops listen"]["ok"] is True
        # The site's own surfaces are not on the operations address.
        assert fetch(ops + "/gs-group-groups.json")[0] == 404


def test_a_real_server_asks_for_the_ops_credentials(tmp_path: Path) -> None:
    config = ("[mailhub]\ndata = %s\nops_user = prometheus\nops_password = env:OPS_PW\n"
              % (tmp_path / "data"))
    with Mailhub(tmp_path, config, env={"OPS_PW": "sc-r3t"}) as server:
        assert fetch(server.url + "/metrics")[0] == 401
        assert fetch(server.url + "/openapi.json")[0] == 401
        token = base64.b64encode(b"prometheus:sc-r3t").decode("ascii")
        code, body = fetch(server.url + "/metrics", {"Authorization": "Basic " + token})
        assert code == 200 and b"mailhub_auth_failures_total" in body
        assert fetch(server.url + "/healthz")[0] == 200
    assert "sc-r3t" not in (tmp_path / "twistd.log").read_text()


def test_a_bad_ops_listen_stops_start_up_with_one_line(tmp_path: Path) -> None:
    import subprocess

    from tests.support.process import TWISTD

    ini = tmp_path / "mailhub.ini"
    ini.write_text("[mailhub]\ndata = %s\nops_listen = tcp:notaport\n" % (tmp_path / "data"))
    done = subprocess.run([TWISTD, "-n", "--pidfile=", "mailhub", "--config", str(ini)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("mailhub: configuration error: %s: [mailhub] ops_listen: bad value"
                               % ini)


def test_the_shipped_scrape_config_is_valid_with_and_without_credentials(tmp_path: Path) -> None:
    import shutil
    import subprocess

    from tests.support.require import require_program

    prometheus = Path(__file__).resolve().parents[2] / "contrib" / "prometheus"
    for name in ("prometheus.yml", "mailhub-rules.yml"):
        shutil.copy(prometheus / name, tmp_path / name)
    password = tmp_path / "mailhub-ops-password"
    password.write_text("sc-r3t\n")
    shipped = (prometheus / "prometheus.yml").read_text()
    enabled = (shipped.replace("    # basic_auth:", "    basic_auth:")
               .replace("    #   username:", "      username:")
               .replace("    #   password_file: /etc/prometheus/mailhub-ops-password",
                        "      password_file: %s" % password))
    assert enabled.count("basic_auth:") == 1 and str(password) in enabled
    (tmp_path / "with-credentials.yml").write_text(enabled)
    for config in ("prometheus.yml", "with-credentials.yml"):
        done = subprocess.run([require_program("promtool"), "check", "config", config],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
