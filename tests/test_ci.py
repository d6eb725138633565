"""Under ``CI=true`` every kind of skip fails the run; elsewhere it skips.

Runs pytest in a subprocess on a small test file with the same hook the
suite's root conftest installs (:mod:`tests.support.ci`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SKIPPING = '''
import unittest

import pytest

from tests.support.require import require_port, free_port


def test_pytest_skip():
    pytest.skip("slapd is not installed")


@pytest.mark.skipif(True, reason="a skipif mark")
def test_skipif():
    pass


def test_missing_server():
    require_port("127.0.0.1", free_port(), "RabbitMQ")


class Trial(unittest.TestCase):
    def test_skip_test(self):
        self.skipTest("unittest's own skip")


def test_runs():
    pass
'''

SKIPPED_MODULE = '''
import pytest

pytest.importorskip("no_such_module_mailhub_needs")


def test_never_collected():
    pass
'''

CONFTEST = "from tests.support.ci import pytest_make_collect_report, pytest_runtest_makereport\n"


def run(tmp_path: Path, ci: str | None, test: str = SKIPPING) -> subprocess.CompletedProcess[str]:
    """pytest on the ``test`` file, with ``CI`` set to ``ci`` (or unset)."""
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_it.py").write_text(test)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(ROOT)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
         "-p", "no:randomly", "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))


def test_skips_are_skips_outside_ci(tmp_path: Path) -> None:
    done = run(tmp_path, None)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed, 4 skipped" in done.stdout, done.stdout
    done = run(tmp_path, None, SKIPPED_MODULE)
    # 5: pytest collected no test (the module skipped), which is no failure.
    assert done.returncode == 5, done.stdout + done.stderr
    assert "1 skipped" in done.stdout, done.stdout


@pytest.mark.parametrize("value", ["true", "1"])
def test_every_skip_fails_under_ci(tmp_path: Path, value: str) -> None:
    done = run(tmp_path, value)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "skipped" not in done.stdout.splitlines()[-1], done.stdout
    # A skip in setup (a skipif mark) fails as an error, the others as failures.
    assert "3 failed, 1 passed, 1 error" in done.stdout.splitlines()[-1], done.stdout
    for reason in ("slapd is not installed", "a skipif mark", "RabbitMQ is not reachable",
                   "unittest's own skip"):
        assert "skipped under CI=true, which fails the run: " + reason in done.stdout, (
            reason, done.stdout)


def test_a_module_skipped_at_collection_fails_under_ci(tmp_path: Path) -> None:
    done = run(tmp_path, "true", SKIPPED_MODULE)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "skipped" not in done.stdout.splitlines()[-1], done.stdout
    assert "skipped under CI=true" in done.stdout, done.stdout
    assert "no_such_module_mailhub_needs" in done.stdout, done.stdout


def test_the_root_conftest_installs_the_hook() -> None:
    from tests import conftest
    from tests.support import ci

    assert conftest.pytest_runtest_makereport is ci.pytest_runtest_makereport
    assert conftest.pytest_make_collect_report is ci.pytest_make_collect_report


def test_no_test_decides_by_itself_whether_it_runs_in_ci() -> None:
    # The hook is the one place that reads CI: a test that read it could skip
    # (and so pass) in CI, or fail outside it, on its own rules.
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path.name in ("ci.py", "test_ci.py"):
            continue
        text = path.read_text(encoding="utf-8")
        if 'environ.get("CI"' in text or 'environ["CI"]' in text or 'getenv("CI"' in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
