"""Run the real ``twistd mailhub`` as a child process and wait for it to serve.

Used by the integration tests that drive mailhub over HTTP exactly as a user
runs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.require import free_port

TWISTD = str(Path(sys.executable).with_name("twistd"))


class Mailhub:
    """``twistd -n mailhub`` in ``folder``; ``url`` is where it listens."""

    def __init__(self, folder: Path, config: str | None = None, port: int | None = None,
                 extra: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.log = folder / "twistd.log"
        args = [TWISTD, "-n", "--pidfile=", "mailhub",
                "--listen", "tcp:%d:interface=127.0.0.1" % self.port]
        if config is not None:
            path = folder / "mailhub.ini"
            path.write_text(config)
            args += ["--config", str(path)]
        self.args = args + (extra or [])
        # A crash in native code (SIGSEGV, SIGABRT) dumps every thread's
        # Python stack into the log, so a failing test says where.
        self.env = dict(os.environ, PYTHONFAULTHANDLER="1", **(env or {}))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> "Mailhub":
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.args, cwd=self.folder, stdout=log,
                                            stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError("mailhub exited with %s:\n%s"
                                     % (self.process.returncode, self.log.read_text()))
            try:
                status, health = self.get("/healthz")
                # twistd listens before mailhub's start-up work is done.
                started = health["dependencies"].get("startup", {"ok": True})["ok"]
                if status == 200 and started:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError("mailhub did not answer in %ss:\n%s" % (timeout, self.log.read_text()))

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """(status, parsed JSON body or raw bytes)."""
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)

    def post_form(self, path: str, form: str) -> tuple[int, Any]:
        return self.request("POST", path, form.encode("utf-8"),
                            {"Content-Type": "application/x-www-form-urlencoded"})

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def __enter__(self) -> "Mailhub":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()
