"""Deprecations: ours fail the tests, txamqp's are known and kept quiet (issue 15).

txamqp calls ``defer.returnValue``, which Twisted deprecated in 24.7: a run
with warnings on showed about 9,400 DeprecationWarnings, all of them
txamqp's. pyproject.toml's ``filterwarnings`` ignores those, shows other
libraries' once, and turns any DeprecationWarning raised from mailhub's own
modules into an error, so new deprecations in our code cannot pile up unseen.
Twisted is bounded above at the newest version verified with txamqp
(doc/installation.rst, "Upgrades and dependencies").
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from txamqp.client import TwistedDelegate
from txamqp.protocol import AMQClient

from mailhub.config import DEFAULT_SPEC
from mailhub.pubsub.connection import load_spec
from tests.support.deferreds import result

ROOT = Path(__file__).resolve().parent.parent


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def a_txamqp_call() -> None:
    """Something txamqp does on every connection: open a channel (defer.returnValue)."""
    if not os.path.isfile(DEFAULT_SPEC):
        pytest.skip("Debian's amqp-specs is not installed (%s)" % DEFAULT_SPEC)
    client = AMQClient(TwistedDelegate(), "/", load_spec(DEFAULT_SPEC), clock=Clock())
    assert result(client.channel(1)) is client.channels[1]


#: Where warnings are attributed: a module's name, or (when trial's TestCase
#: re-emits what it collected) its file's path without ``.py``.
OURS = ["mailhub", "mailhub.pubsub.connection", "mailhub.web.ops",
        str(ROOT / "mailhub" / "pubsub" / "connection"), "/srv/mailhub/mailhub/tap"]
NOT_OURS = ["mailhubextra", "klein.app", "twisted.web.server", "tests.web.test_site",
            str(ROOT / "tests" / "web" / "test_site"), "/srv/mailhub/tests/web/test_site",
            "/srv/mailhub/.venv/lib/python3.11/site-packages/klein/app",
            "/usr/lib/python3/dist-packages/twisted/web/server"]
TXAMQP = ["txamqp.protocol", "/srv/mailhub/.venv/lib/python3.11/site-packages/txamqp/protocol"]


@pytest.mark.parametrize("module", OURS)
def test_a_deprecation_raised_from_mailhub_code_fails_the_test(module: str) -> None:
    # The warnings machinery names the module of the frame that the warning
    # is attributed to (the caller of the deprecated API): here, mailhub's.
    with pytest.raises(DeprecationWarning):
        warnings.warn_explicit("deprecated API", DeprecationWarning, "x.py", 1, module=module)
    with pytest.raises(PendingDeprecationWarning):
        warnings.warn_explicit("soon", PendingDeprecationWarning, "x.py", 1, module=module)


@pytest.mark.parametrize("module", NOT_OURS)
def test_a_deprecation_of_another_library_is_not_an_error(module: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("deprecated API", DeprecationWarning, "x.py", 1, module=module)
    assert len(caught) == 1  # shown ("default"), not raised


@pytest.mark.parametrize("module", TXAMQP)
def test_txamqp_deprecations_are_ignored(module: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("returnValue", DeprecationWarning, "x.py", 1, module=module)
        a_txamqp_call()
    assert caught == []


def test_txamqp_still_uses_the_deprecated_return_value() -> None:
    """What the ignore filter is for. When this fails, txamqp stopped calling
    defer.returnValue: drop the ignore filter (and this test)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a_txamqp_call()
    found = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert found, "txamqp no longer warns: remove the txamqp filter of pyproject.toml"
    assert all("returnValue" in str(w.message) for w in found)
    assert all("/txamqp/" in w.filename for w in found)


TRIAL_TESTS = """
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailhub.config import AMQPSection, Config
from mailhub.metrics import Metrics
from mailhub.pubsub.wiring import make_pubsub
from tests.test_warnings_policy import a_txamqp_call


class Policy(SynchronousTestCase):
    def test_txamqp_in_a_trial_test(self):
        a_txamqp_call()

    def test_mailhub_code_using_an_api_in_a_deprecated_way(self):
        # HostnameEndpoint deprecates a reactor without a name resolver.
        make_pubsub(Config(amqp=AMQPSection(url="amqp://127.0.0.1")), Clock(), Metrics())
"""


def test_the_policy_holds_in_a_real_pytest_run_of_trial_tests(tmp_path: Path) -> None:
    (tmp_path / "test_policy_probe.py").write_text(TRIAL_TESTS)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir",
         str(ROOT), "-p", "no:cacheprovider", "-q", "-rA", str(tmp_path / "test_policy_probe.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    report = done.stdout + done.stderr
    assert "PASSED" in report and "test_txamqp_in_a_trial_test" in report, report
    failed = [line for line in report.splitlines() if line.startswith(("FAILED", "ERROR"))]
    assert len(failed) == 1 and "test_mailhub_code_using_an_api_in_a_deprecated_way" in failed[0], report
    assert "DeprecationWarning" in report and "IReactorPluggableNameResolver" in report, report
    assert "returnValue" not in report, report


def test_the_filters_are_the_projects_in_the_order_that_makes_them_work() -> None:
    filters = pyproject()["tool"]["pytest"]["ini_options"]["filterwarnings"]
    # Later entries win: txamqp's ignore comes last, mailhub's errors after the defaults.
    assert filters[-1].startswith("ignore::DeprecationWarning:txamqp")
    assert filters.index("default::DeprecationWarning") < min(
        i for i, f in enumerate(filters) if f.startswith("error::DeprecationWarning:mailhub"))
    assert "ignore::DeprecationWarning" not in filters  # no blanket ignore any more


def test_twisted_has_an_upper_bound() -> None:
    twisted = [d for d in pyproject()["project"]["dependencies"] if d.startswith("Twisted")]
    assert len(twisted) == 1 and ",<" in twisted[0], twisted
