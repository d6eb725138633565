"""Under ``CI=true`` a skipped test is a failed test (a pytest plugin).

A developer without slapd or RabbitMQ may run the suite and see the
integration tests skipped with the reason. In CI (``.ci/run`` sets
``CI=true``) a skip would let a run pass on tests that never ran, so this
plugin turns every skip, whatever raised it (``pytest.skip``, a skip mark,
``unittest``'s ``skipTest``, a module skipped at collection), into a failure
that still says why. Tests just skip; none checks ``CI`` itself.

The root ``tests/conftest.py`` loads it; ``-p tests.support.ci`` loads it
into any other pytest run.
"""

from __future__ import annotations

import os
from typing import Any, Generator

import pytest


def in_ci() -> bool:
    """Whether the run is a CI run (``CI`` is 1, true or yes)."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _reason(report: Any) -> str:
    """The text of a skip report's reason."""
    longrepr = report.longrepr
    reason = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(
        longrepr)
    return reason.removeprefix("Skipped: ")


def _fail(report: Any) -> None:
    """Turn the skipped ``report`` into a failure that says what was skipped."""
    report.outcome = "failed"
    report.longrepr = "skipped under CI=true, which fails the run: %s" % _reason(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Generator[None, Any, None]:
    """A test's skip (in setup, call or teardown) becomes a failure under CI."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci() and not hasattr(report, "wasxfail"):
        _fail(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    """A module skipped while it is collected (``importorskip``...) fails under CI."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci():
        _fail(report)
