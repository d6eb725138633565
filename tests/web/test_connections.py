"""Connection bounds of a real ``twistd mailhub``: header deadline, cap, health reserve.

Real sockets on 127.0.0.1, bounded counts: ``[mailhub] max_connections = 40``
with ``health_reserve = 4`` and ``header_timeout = 2``.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from tests.support.process import Mailhub

CONFIG = "[mailhub]\nmax_connections = 40\nhealth_reserve = 4\nheader_timeout = 2\n"


def _connect(mailhub: Mailhub, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", mailhub.port), timeout=10)
    try:
        s.sendall(data)
    except OSError:
        s.close()
        raise
    return s


def _closed_by_server(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def _open_files(mailhub: Mailhub) -> int:
    assert mailhub.process is not None
    return len(os.listdir("/proc/%d/fd" % mailhub.process.pid))


def _raw_get(mailhub: Mailhub, path: str) -> bytes:
    """The raw answer; ``b""`` when the server closed the connection unanswered
    (a close that races the request's sending shows as a reset there)."""
    try:
        s = _connect(mailhub, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                     % path.encode())
    except (ConnectionResetError, BrokenPipeError):
        return b""
    answer = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    except ConnectionResetError:
        pass
    finally:
        s.close()
    return answer


def _sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_slow_header_clients_are_cut_off_and_health_checks_get_through(tmp_path: Path) -> None:
    with Mailhub(tmp_path, config=CONFIG) as mailhub:
        baseline = _open_files(mailhub)
        # 120 clients that never finish their headers: four times the cap.
        slow = [_connect(mailhub, b"GET /healthz HTTP/1.1\r\nHost: x\r\n") for _ in range(120)]
        time.sleep(0.5)
        probes = [mailhub.get("/healthz")[0] for _ in range(10)]
        assert probes == [200] * 10
        # The process holds at most the cap, whatever the clients open.
        assert _open_files(mailhub) <= baseline + 40 + 2
        # Those still connected are cut off at the header deadline.
        started = time.monotonic()
        assert all(_closed_by_server(s, 6) for s in slow)
        assert time.monotonic() - started < 6
        for s in slow:
            s.close()
        # A client that sends its headers in time is served as before.
        assert mailhub.get("/healthz")[0] == 200
        metrics = mailhub.get("/metrics")[1].decode()
        # 120 against a cap of 40: at least 80 made room for others.
        assert _sample(metrics, 'mailhub_http_connections_dropped_total{reason="evicted"}') >= 80
        assert _sample(metrics, 'mailhub_http_connections_dropped_total{reason="header_timeout"}') > 0


def test_a_full_site_keeps_its_reserve_for_health_checks(tmp_path: Path) -> None:
    with Mailhub(tmp_path, config=CONFIG) as mailhub:
        # Requests whose headers are complete and whose bodies never come.
        busy_request = (b"POST /gs-group-groups.json HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Type: application/x-www-form-urlencoded\r\n"
                        b"Content-Length: 100\r\n\r\n")
        busy = [_connect(mailhub, busy_request) for _ in range(36)]
        time.sleep(0.5)
        try:
            answer = _raw_get(mailhub, "/gs-group-groups.json?get")
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b"Retry-After: 1" in answer or b"retry-after: 1" in answer.lower()
            assert _raw_get(mailhub, "/healthz").startswith(b"HTTP/1.1 200 ")
            busy += [_connect(mailhub, busy_request) for _ in range(4)]
            time.sleep(0.5)
            # Every slot is busy past its headers: a new connection is closed at once.
            assert _raw_get(mailhub, "/healthz") == b""
        finally:
            for s in busy:
                s.close()
        time.sleep(0.5)
        assert mailhub.get("/healthz")[0] == 200
        metrics = mailhub.get("/metrics")[1].decode()
        assert 'mailhub_http_connections_dropped_total{reason="reserve"} 1.0' in metrics
        assert 'mailhub_http_connections_dropped_total{reason="full"} 1.0' in metrics
