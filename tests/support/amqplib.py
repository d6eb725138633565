"""node's amqplib (npm), as OpenPaaS ESN uses it, for tests that play OpenPaaS.

``tests/run`` installs it (``npm install``) into a cache folder outside the
work tree and passes the folder in ``MAILHUB_TEST_NODE_MODULES``; run
directly, :func:`require_amqplib` installs it there itself the first time.
Without node or npm the test is skipped (a failure under ``CI=true``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.require import require_program

#: amqplib's 0.x line: the API and defaults OpenPaaS ESN was written against.
AMQPLIB = "amqplib@0.10"
#: The scripts the tests run under node.
SCRIPTS = Path(__file__).parent / "node"


def node_modules() -> Path:
    """Where amqplib is (or will be) installed."""
    given = os.environ.get("MAILHUB_TEST_NODE_MODULES")
    if given:
        return Path(given)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mailhub-tests" / "node" / "node_modules"


def require_amqplib() -> tuple[str, dict[str, str]]:
    """(node's path, an environment in which ``require('amqplib')`` works)."""
    node = require_program("node")
    modules = node_modules()
    if not (modules / "amqplib" / "package.json").is_file():
        npm = require_program("npm")
        modules.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--no-save",
                               "--prefix", str(modules.parent), AMQPLIB],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0 or not (modules / "amqplib").is_dir():
            pytest.skip("npm install %s failed: %s" % (AMQPLIB, done.stderr.strip()[-500:]))
    env = dict(os.environ, NODE_PATH=str(modules))
    return node, env
