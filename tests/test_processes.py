"""Several ``twistd mailhub`` processes on one machine serve one port.

The two ways doc/operations.rst ("Scaling out") documents, each with two real
processes on one configuration (one SQLite database, one data folder):

- ``reuseport=yes`` in the listen string: each process binds the port with
  SO_REUSEPORT;
- systemd socket activation: one socket, opened by ``systemd-socket-activate``
  (what ``mailhub.socket`` does under systemd), handed to both processes,
  which listen on it with Twisted's ``systemd:`` endpoint.

Each test sends requests, each on a new connection, to the one port, and
finds requests in both processes' access logs: both serve.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.support.process import TWISTD, Mailhub
from tests.support.require import free_port, require_program


def shared_config(data: Path) -> str:
    return "[mailhub]\ndata = %s\n[collector]\nenabled = false\n" % data


def wait_ready(log: Path, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while "mailhub is ready" not in (log.read_text() if log.exists() else ""):
        assert process.poll() is None, "mailhub exited:\n" + log.read_text()
        assert time.monotonic() < deadline, "mailhub never got ready:\n" + log.read_text()
        time.sleep(0.1)


def probe(port: int, count: int = 64) -> None:
    """``count`` requests, each on a new connection, marked in the access log."""
    for n in range(count):
        request = urllib.request.Request("http://127.0.0.1:%d/healthz" % port,
                                         headers={"User-Agent": "probe-%d" % n})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200


def served(log: Path) -> int:
    return log.read_text().count('"probe-')


def test_two_processes_with_reuseport_serve_one_port(tmp_path: Path) -> None:
    port = free_port()
    listen = "tcp:%d:interface=127.0.0.1:reuseport=yes" % port
    config = shared_config(tmp_path / "data")
    folders = [tmp_path / "a", tmp_path / "b"]
    instances = []
    try:
        for folder in folders:
            folder.mkdir()
            mailhub = Mailhub(folder, config=config, port=port, extra=["--listen", listen])
            instances.append(mailhub.start(timeout=60))
            assert mailhub.process is not None
            wait_ready(mailhub.log, mailhub.process)
        probe(port)
        counts = [served(m.log) for m in instances]
        assert sum(counts) == 64 and all(counts), counts
    finally:
        for mailhub in instances:
            # twistd ends itself with the SIGTERM it was stopped by.
            assert mailhub.stop() in (0, -15), mailhub.log.read_text()


def test_two_processes_share_one_socket_from_systemd_socket_activation(tmp_path: Path) -> None:
    activate = require_program("systemd-socket-activate")
    port = free_port()
    (tmp_path / "mailhub.ini").write_text(shared_config(tmp_path / "data"))
    # As systemd starts mailhub@1 and mailhub@2 with one socket: each process
    # gets the socket as descriptor 3, and LISTEN_PID names that process.
    script = ('for n in 1 2; do sh -c \'export LISTEN_PID=$$; exec "$@"\' mailhub '
              '%s --nodaemon --pidfile= --logfile="$PWD/instance$n.log" mailhub '
              '--config "$PWD/mailhub.ini" --listen systemd:domain=INET:index=0 & done; wait'
              % TWISTD)
    with open(tmp_path / "activate.log", "wb") as out:
        process = subprocess.Popen([activate, "--listen=127.0.0.1:%d" % port,
                                    "--fdname=mailhub.socket", "sh", "-c", script],
                                   cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, PYTHONFAULTHANDLER="1"),
                                   start_new_session=True)
    logs = [tmp_path / "instance1.log", tmp_path / "instance2.log"]
    try:
        # systemd-socket-activate listens, then starts its command on the
        # first connection.
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                break
            except OSError:
                assert process.poll() is None, (tmp_path / "activate.log").read_text()
                assert time.monotonic() < deadline, "systemd-socket-activate never listened"
                time.sleep(0.1)
        for log in logs:
            wait_ready(log, process)
        probe(port)
        counts = [served(log) for log in logs]
        assert sum(counts) == 64 and all(counts), counts
    finally:
        os.killpg(process.pid, 15)
        process.wait(30)
