"""A real Radicale server for integration tests, as a subprocess on a free port.

Authentication: htpasswd with plain passwords; rights: each user owns
``/{user}/...`` (as Radicale's ``owner_only``), and one service user (the
collector's credential) may read and write every user's books, as a site
would configure an external Radicale for mailhub.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.require import free_port

RIGHTS = """\
[service]
user: {service}
collection: .*
permissions: RrWw

[owner-principal]
user: .+
collection: {{user}}
permissions: RW

[owner-books]
user: .+
collection: {{user}}/[^/]+
permissions: rw

[root]
user: .+
collection:
permissions: R
"""


class RadicaleServer:
    """Start, stop and restart one Radicale; ``url`` is its base URL."""

    def __init__(self, users: dict[str, str], service: tuple[str, str] = ("collector", "svc-pw"),
                 port: int | None = None) -> None:
        try:
            import radicale  # noqa: F401
        except ImportError:
            pytest.skip("Radicale is not installed (pip install radicale)")
        self.folder = Path(tempfile.mkdtemp(prefix="mailhub-radicale-"))
        self.port = port or free_port()
        self.service = service
        self.users = dict(users)
        self.users[service[0]] = service[1]
        self.process: subprocess.Popen[bytes] | None = None
        (self.folder / "htpasswd").write_text(
            "".join("%s:%s\n" % pair for pair in self.users.items()))
        (self.folder / "rights").write_text(RIGHTS.format(service=service[0]))
        (self.folder / "config").write_text(
            "[server]\nhosts = 127.0.0.1:%d\n"
            "[auth]\ntype = htpasswd\nhtpasswd_filename = %s\nhtpasswd_encryption = plain\n"
            "delay = 0\n"
            "[rights]\ntype = from_file\nfile = %s\n"
            "[storage]\nfilesystem_folder = %s\n"
            "[web]\ntype = none\n"
            "[logging]\nlevel = warning\n"
            % (self.port, self.folder / "htpasswd", self.folder / "rights",
               self.folder / "collections"))

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d/" % self.port

    def start(self, timeout: float = 15.0) -> None:
        env = dict(os.environ)
        env.pop("TEMP", None)
        self.log = open(self.folder / "radicale.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "radicale", "--config", str(self.folder / "config")],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("Radicale exited: %s" % (self.folder / "radicale.log").read_text())
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("Radicale did not listen on port %d" % self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
            self.log.close()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
