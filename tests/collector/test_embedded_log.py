"""The embedded Radicale writes only through mailhub's log (issue 15).

Radicale logs with Python's ``logging``; left alone, its start-up line (and
any warning) went to stderr as a raw line beside twistd's log. mailhub routes
the ``radicale`` logger into twisted.logger (:func:`mailhub.logs.route_radicale_logging`),
escaping what a client could have chosen, as every other log line is.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from twisted.logger import LogLevel, globalLogPublisher

from mailhub.logs import route_radicale_logging
from tests.support.process import TWISTD
from tests.support.require import free_port

#: How twistd -n starts every line it writes.
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[")


def test_a_radicale_record_becomes_one_escaped_twisted_event(
        capfd: pytest.CaptureFixture[str]) -> None:
    route_radicale_logging()
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        logging.getLogger("radicale").warning("Bad PROPFIND on %r:\nforged line\x1b[2J", "/x/")
        logging.getLogger("radicale").info("every request at INFO: not logged")
    finally:
        globalLogPublisher.removeObserver(events.append)
    ours = [e for e in events if e.get("log_namespace") == "radicale"]
    assert len(ours) == 1
    assert ours[0]["log_level"] == LogLevel.warn
    assert ours[0]["message"] == "Bad PROPFIND on '/x/':\\nforged line\\x1b[2J"
    assert capfd.readouterr() == ("", "")


def fetch(url: str, method: str = "GET", body: bytes | None = None,
          headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code


def test_a_real_embedded_start_writes_no_raw_line_to_stderr(tmp_path: Path) -> None:
    config = tmp_path / "mailhub.ini"
    config.write_text("[mailhub]\ndata = %s\n" % (tmp_path / "data"))
    mailhub_cli = [sys.executable, "-m", "mailhub"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    subprocess.run([*mailhub_cli, "user", "add", "ann@example.com", "--name", "Ann",
                    "--password-stdin", "--config", str(config)], input="pw-of-ann\n",
                   env=env, check=True, capture_output=True, text=True, timeout=60)
    port = free_port()
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        process = subprocess.Popen([TWISTD, "-n", "--pidfile=", "mailhub", "--config", str(config),
                                    "--listen", "tcp:%d:interface=127.0.0.1" % port],
                                   cwd=tmp_path, stdout=stdout, stderr=stderr, env=env)
    base = "http://127.0.0.1:%d" % port
    try:
        deadline = time.monotonic() + 30
        while b"mailhub is ready" not in out.read_bytes():
            assert process.poll() is None, out.read_text() + err.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        # Radicale at work: an authenticated request, and a malformed one it warns about.
        auth = {"Authorization": "Basic " + base64.b64encode(b"ann@example.com:pw-of-ann").decode()}
        assert fetch(base + "/dav/ann@example.com/", "PROPFIND", b"", dict(auth, Depth="0")) == 207
        assert fetch(base + "/dav/ann@example.com/", "PROPFIND", b"<not xml\n",
                     dict(auth, Depth="0")) == 400
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    assert err.read_text() == ""
    lines = out.read_text().splitlines()
    assert lines and all(LOG_LINE.match(line) for line in lines), "\n".join(
        line for line in lines if not LOG_LINE.match(line))
    # Radicale's own lines are there, as mailhub's log lines.
    assert any("[radicale#warn] radicale: " in line for line in lines), "\n".join(lines)
    assert "pw-of-ann" not in out.read_text()
