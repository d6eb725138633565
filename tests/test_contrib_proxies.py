"""The reverse-proxy examples of contrib/ pass their servers' own checks, and Prometheus' scrape example.

issue 15: doc/operations.rst includes contrib/nginx/mailhub.conf and
contrib/haproxy/haproxy.cfg verbatim; ``nginx -t`` and ``haproxy -c`` (Debian's
nginx-light and haproxy, installed by tests/run) check them here, with a
throwaway certificate in place of the one they name. The settings the issue
asks for (SSE buffering off, the push receiver's body limit) are asserted.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from mailhub.config import PushSection, MailhubSection
from tests.support.require import require_program

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
NGINX = CONTRIB / "nginx" / "mailhub.conf"
HAPROXY = CONTRIB / "haproxy" / "haproxy.cfg"
PROMETHEUS = CONTRIB / "prometheus" / "prometheus.yml"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and its key, made with openssl."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([require_program("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-subj", "/CN=groups.example.com", "-days", "2",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def location(config: str, name: str) -> str:
    """The body of ``location NAME { ... }`` in an nginx configuration."""
    found = re.search(r"location %s \{(.*?)\}" % re.escape(name), config, re.S)
    assert found, name
    return found.group(1)


def test_nginx_accepts_the_example(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    nginx = require_program("/usr/sbin/nginx")
    cert, key = certificate
    site = tmp_path / "mailhub.conf"
    site.write_text(NGINX.read_text()
                    .replace("/etc/ssl/certs/ssl-cert-snakeoil.pem", str(cert))
                    .replace("/etc/ssl/private/ssl-cert-snakeoil.key", str(key)))
    main = tmp_path / "nginx.conf"
    main.write_text("pid %s/nginx.pid;\nevents {}\nhttp {\n  access_log off;\n  include %s;\n}\n"
                    % (tmp_path, site))
    done = subprocess.run([nginx, "-t", "-q", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"),
                           "-c", str(main)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_nginx_streams_events_and_limits_push_bodies_as_mailhub_does() -> None:
    config = NGINX.read_text()
    events = location(config, "= /api/v1/events")
    assert "proxy_buffering off;" in events
    timeout = re.search(r"proxy_read_timeout (\d+)h;", events)
    assert timeout and int(timeout.group(1)) * 3600 > PushSection().keepalive
    assert PushSection().max_body == 64 * 1024
    for push in ("/push/", "/preliminary/http-notify/"):
        assert "client_max_body_size 64k;" in location(config, push)
    assert MailhubSection().max_body == 1024 * 1024
    assert re.search(r"^    client_max_body_size 1m;$", config, re.M)
    for operations in ("= /metrics", "= /openapi.json"):
        assert "deny all;" in location(config, operations)


def test_haproxy_accepts_the_example(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    haproxy = require_program("/usr/sbin/haproxy")
    cert, key = certificate
    pem = tmp_path / "site.pem"
    pem.write_text(cert.read_text() + key.read_text())
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY.read_text()
                      .replace("/etc/haproxy/certs/groups.example.com.pem", str(pem)))
    done = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ALERT" not in done.stdout + done.stderr and "WARNING" not in done.stdout + done.stderr, \
        done.stdout + done.stderr


def test_haproxy_limits_push_bodies_as_mailhub_does() -> None:
    config = HAPROXY.read_text()
    assert "if push { req.hdr_val(content-length) gt %d }" % PushSection().max_body in config
    assert "{ req.hdr_val(content-length) gt %d }" % MailhubSection().max_body in config
    assert "timeout server 60s" in config and PushSection().keepalive < 60


def test_the_prometheus_example_loads_the_rules() -> None:
    done = subprocess.run([require_program("promtool"), "check", "config", PROMETHEUS.name],
                          cwd=PROMETHEUS.parent, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "mailhub-rules.yml" in done.stdout and "SUCCESS" in done.stdout


def test_the_proxies_stay_within_mailhubs_connection_limits() -> None:
    """Slow clients wait in the proxy; mailhub's reserve for /healthz stays free."""
    section = MailhubSection()
    room = section.max_connections - section.health_reserve
    nginx = NGINX.read_text()
    assert int(re.search(r"max_conns=(\d+)", nginx).group(1)) < room  # type: ignore[union-attr]
    header = re.search(r"client_header_timeout (\d+)s;", nginx)
    assert header and int(header.group(1)) < section.header_timeout
    assert "limit_conn mailhub_per_address" in nginx
    haproxy = HAPROXY.read_text()
    assert all(int(n) < room for n in re.findall(r"maxconn (\d+)", haproxy))
    request = re.search(r"timeout http-request (\d+)s", haproxy)
    assert request and int(request.group(1)) < section.header_timeout
