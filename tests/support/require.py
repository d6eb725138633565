"""Skip a test when a real server or program it needs is missing.

On a developer's machine a missing server skips the test with the reason; with
``CI=true`` (as ``.ci/run`` runs) the root conftest's hook
(:mod:`tests.support.ci`) turns that skip into a failure, so CI never passes
on integration tests that did not run.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest


def require_program(path: str) -> str:
    """The path of a program (absolute, or found on PATH), or skip the test."""
    found = path if os.path.isabs(path) and os.access(path, os.X_OK) else shutil.which(path)
    if not found:
        pytest.skip("%s is not installed (tests/run installs it)" % path)
    assert found is not None
    return found


def require_port(host: str, port: int, what: str) -> None:
    """Skip the test unless something listens at host:port."""
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        pytest.skip("%s is not reachable at %s:%d" % (what, host, port))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
