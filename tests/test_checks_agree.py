"""``mailhub check`` and the running server's ``/healthz`` report the same failure.

Both run the checks of :mod:`mailhub.checks` on the server's own parts, so
what the command says about the broker is what ``twistd mailhub`` met: here
a real RabbitMQ (127.0.0.1:5672) that refuses one of the server's
declarations (a queue that mailhub declares was declared first with other
arguments), or its login. Each test has a virtual host of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support.amqp_peer import VirtualHost, _pika
from tests.support.process import Mailhub
from tests.support.rabbitmq import HOST, PORT, unique

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def vhost() -> Iterator[VirtualHost]:
    made = VirtualHost().create()
    try:
        yield made
    finally:
        made.delete()


def run_check(config: Path) -> tuple[int, dict[str, list[tuple[str, str]]]]:
    """``python -m mailhub check --config FILE``: exit code and {row: [(status, detail)]}."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "mailhub", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, env=env)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines and lines[0].split() == ["CHECK", "STATUS", "DETAIL"], done
    # Columns are padded with spaces: what, status, then the detail (with spaces).
    widths = [lines[0].index("STATUS"), lines[0].index("DETAIL")]
    found: dict[str, list[tuple[str, str]]] = {}
    for line in lines[1:]:
        what = line[:widths[0]].strip()
        found.setdefault(what, []).append(
            (line[widths[0]:widths[1]].strip(), line[widths[1]:].strip()))
    return done.returncode, found


def healthz_amqp(mailhub: Mailhub, wanted: str, timeout: float = 20.0) -> dict[str, Any]:
    """/healthz's ``amqp`` entry, once its detail names ``wanted``."""
    deadline = time.monotonic() + timeout
    while True:
        status, health = mailhub.get("/healthz")
        state: dict[str, Any] = health["dependencies"]["amqp"]
        if wanted in state["detail"] or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def test_a_refused_declaration_is_named_alike_by_check_and_healthz(
        tmp_path: Path, vhost: VirtualHost) -> None:
    queue = unique("collector")
    # Someone declared mailhub's collector queue first, with other arguments:
    # the broker refuses mailhub's declaration (406 PRECONDITION_FAILED), so
    # the collector is down (the rest of the connection works).
    pika = _pika()
    connection = pika.BlockingConnection(pika.ConnectionParameters(
        host=HOST, port=PORT, virtual_host=vhost.name,
        credentials=pika.PlainCredentials("guest", "guest")))
    try:
        connection.channel().queue_declare(queue, durable=True,
                                           arguments={"x-max-length": 5})
    finally:
        connection.close()
    config = ("[amqp]\nurl = %s\n[collector]\nqueue = %s\ndead_letter = %s:dead\n"
              % (vhost.url, queue, queue))
    with Mailhub(tmp_path, config=config) as mailhub:
        served = healthz_amqp(mailhub, "PRECONDITION_FAILED")
        code, rows = run_check(tmp_path / "mailhub.ini")
    assert served["ok"] is False, served
    assert ("the broker refused queue %r: 406 PRECONDITION_FAILED" % queue
            in served["detail"]), served
    assert code == 1
    assert rows["amqp"] == [("FAIL", served["detail"])]


def test_a_refused_login_is_named_alike_by_check_and_healthz(
        tmp_path: Path, vhost: VirtualHost) -> None:
    url = vhost.url.replace("guest:guest@", "guest:wrong@")
    with Mailhub(tmp_path, config="[amqp]\nurl = %s\n" % url) as mailhub:
        served = healthz_amqp(mailhub, "ACCESS_REFUSED")
        code, rows = run_check(tmp_path / "mailhub.ini")
    assert served["ok"] is False, served
    assert served["detail"].startswith("%s:%d refused the login of guest: 403 ACCESS_REFUSED"
                                       % (HOST, PORT))
    assert code == 1
    assert rows["amqp"] == [("FAIL", served["detail"])]
    assert "wrong" not in served["detail"]
