"""The suite's root: hooks and fixtures every test folder shares.

- Under ``CI=true`` any skip fails the run (:mod:`tests.support.ci`, the
  one place that reads ``CI``); tests themselves just skip.
"""

from __future__ import annotations

from tests.support.ci import pytest_make_collect_report, pytest_runtest_makereport

__all__ = ["pytest_make_collect_report", "pytest_runtest_makereport"]
