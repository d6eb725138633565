"""The suite's root: hooks and fixtures every test folder shares.

- Under ``CI=true`` any skip fails the run (:mod:`tests.support.ci`, the
  one place that reads ``CI``); tests themselves just skip.
- ``slapd``: the run's one OpenLDAP server (:func:`tests.support.slapd.shared`),
  for the LDAP, MailStore and event-stream tests; trial test cases call
  ``shared()`` themselves. It is stopped when the run ends.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import slapd as _slapd
from tests.support.ci import pytest_make_collect_report, pytest_runtest_makereport

__all__ = ["pytest_make_collect_report", "pytest_runtest_makereport", "pytest_sessionfinish",
           "slapd"]


@pytest.fixture(scope="session")
def slapd() -> _slapd.Slapd:
    """The shared slapd (1,200 users, TLS on ``ldaps_url``); see tests.support.slapd."""
    return _slapd.shared()


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    """Stop the shared slapd, whoever started it."""
    _slapd.stop_shared()
