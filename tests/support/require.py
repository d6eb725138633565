"""Skip, or in CI fail, when a real server the test needs is missing.

On a developer's machine a missing server skips the test with the reason; with
``CI=true`` (as ``.ci/run`` runs) it is a failure, so CI never passes on
integration tests that did not run.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(reason: str) -> None:
    """Fail in CI, skip elsewhere, saying what is missing."""
    if in_ci():
        pytest.fail("required server missing in CI: " + reason, pytrace=False)
    pytest.skip(reason)


def require_program(path: str) -> str:
    """The path of a program (absolute, or found on PATH), or missing()."""
    found = path if os.path.isabs(path) and os.access(path, os.X_OK) else shutil.which(path)
    if not found:
        missing("%s is not installed (tests/run installs it)" % path)
    assert found is not None
    return found


def require_port(host: str, port: int, what: str) -> None:
    """missing() unless something listens at host:port."""
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        missing("%s is not reachable at %s:%d" % (what, host, port))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
