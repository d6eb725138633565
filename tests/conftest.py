"""The suite's root: hooks and fixtures every test folder shares.

- Under ``CI=true`` any skip fails the run (:mod:`tests.support.ci`, the
  one place that reads ``CI``); tests themselves just skip.
- ``slapd``: the run's one OpenLDAP server (:func:`tests.support.slapd.shared`),
  for the LDAP, MailStore and event-stream tests; trial test cases call
  ``shared()`` themselves. It is stopped when the run ends.
- ``MAILHUB_CONFIG`` is set empty: no test reads the machine's configuration.
- ``mailhub_wheel``: mailhub built as a wheel, once per run, for the tests of
  what an installed mailhub has (the twistd plugin, the Dovecot files).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import slapd as _slapd
from tests.support.ci import pytest_make_collect_report, pytest_runtest_makereport

__all__ = ["mailhub_wheel", "pytest_make_collect_report", "pytest_runtest_makereport",
           "pytest_sessionfinish", "slapd"]

ROOT = Path(__file__).resolve().parent.parent

# Without --config, mailhub (twistd and the CLI) reads $MAILHUB_CONFIG, else
# /etc/mailhub/mailhub.ini: set and empty, it takes the built-in defaults, so
# no test (nor any process a test starts) reads the machine's own configuration.
os.environ["MAILHUB_CONFIG"] = ""


@pytest.fixture(scope="session")
def slapd() -> _slapd.Slapd:
    """The shared slapd (1,200 users, TLS on ``ldaps_url``); see tests.support.slapd."""
    return _slapd.shared()


@pytest.fixture(scope="session")
def mailhub_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip wheel`` builds from this tree (built once per run)."""
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), str(ROOT)], check=True, capture_output=True,
                   timeout=300)
    (wheel,) = wheels.glob("mailhub-*.whl")
    return wheel


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    """Stop the shared slapd, whoever started it."""
    _slapd.stop_shared()
