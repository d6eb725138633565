"""What the ``mailhub`` command tells an administrator about itself.

issue 15: ``mailhub --version`` failed (a usage error, exit 1).
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import subprocess
import sys
from pathlib import Path

import mailhub
from mailhub import cli

ROOT = Path(__file__).resolve().parent.parent


def test_version_prints_the_package_version_and_exits_0() -> None:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["--version"], stdin=io.StringIO(), stdout=out, stderr=err)
    assert (code, out.getvalue(), err.getvalue()) == (0, "mailhub %s\n" % mailhub.__version__, "")


def test_the_version_is_written_once_the_installed_metadata_agrees() -> None:
    # pyproject.toml reads it from mailhub.__version__ (dynamic), so the two cannot drift.
    assert importlib.metadata.version("mailhub") == mailhub.__version__
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()


def test_version_from_the_real_command(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "mailhub", "--version"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env=env)
    assert (done.returncode, done.stdout, done.stderr) == (0, "mailhub %s\n" % mailhub.__version__, "")
    assert os.listdir(tmp_path) == []  # nothing made: no data folder, no database
