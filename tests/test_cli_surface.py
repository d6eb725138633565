"""What the ``mailhub`` command tells an administrator about itself.

issue 15: ``mailhub --version`` failed (a usage error, exit 1); run without
``--config`` in a random folder the command made ``./mailhub-data`` and listed
nothing, without saying which database it read.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mailhub
from mailhub import cli
from mailhub import config as configuration
from mailhub.config import CONFIG_VARIABLE, locate
from mailhub.logs import startup_summary
from mailhub.tap import Options, load_config

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


# -- which configuration, which database (issue 15) ---------------------------------
#
# Run without --config in a random folder, the command made ./mailhub-data and
# listed nothing, without saying which database it had read.


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdin=io.StringIO(), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A machine with no MAILHUB_CONFIG, its system file at ``tmp_path/etc/mailhub.ini``
    (absent until a test writes it), the working folder an empty ``tmp_path/random``."""
    monkeypatch.delenv(CONFIG_VARIABLE, raising=False)
    (tmp_path / "etc").mkdir()
    monkeypatch.setattr(configuration, "SYSTEM_CONFIG", str(tmp_path / "etc" / "mailhub.ini"))
    here = tmp_path / "random"
    here.mkdir()
    monkeypatch.chdir(here)
    return tmp_path


def site_config(path: Path, data: Path) -> Path:
    path.write_text("[mailhub]\ndata = %s\n" % data)
    return path


def test_the_config_is_found_by_option_then_environment_then_system_file(tmp_path: Path) -> None:
    system = tmp_path / "mailhub.ini"
    env = {CONFIG_VARIABLE: "/srv/env.ini"}
    assert locate("/srv/given.ini", env, str(system)) == ("/srv/given.ini", "--config")
    assert locate(None, env, str(system)) == ("/srv/env.ini", "from MAILHUB_CONFIG")
    assert locate(None, {}, str(system)) == (
        None, "no --config, no MAILHUB_CONFIG, no %s" % system)
    system.write_text("")
    assert locate(None, {}, str(system))[0] == str(system)
    assert locate(None, env, str(system))[0] == "/srv/env.ini"
    # Set and empty: the built-in defaults, whatever the system file says.
    assert locate(None, {CONFIG_VARIABLE: ""}, str(system)) == (
        None, "MAILHUB_CONFIG is set and empty")


@pytest.mark.parametrize("argv, header", [
    (["user", "list"], "ID  NAME  EMAIL  GROUPS  PASSWORD\n"),
    (["group", "list"], "ID  NAME  EMAIL  PRIVACY  MEMBERS\n"),
    (["token", "list"], "NAME  HOOKS  CREATED  ROTATED  PREVIOUS VALID UNTIL\n"),
])
def test_a_listing_in_a_random_folder_makes_nothing_and_names_the_database(
        machine: Path, argv: list[str], header: str) -> None:
    code, out, err = run(*argv)
    database = machine / "random" / "mailhub-data" / "mailhub.sqlite"
    assert (code, out) == (0, header)
    assert err.splitlines() == [
        "mailhub: configuration: built-in defaults (no --config, no MAILHUB_CONFIG, no %s); "
        "database: sqlite:///%s" % (configuration.SYSTEM_CONFIG, database),
        "mailhub: no database at %s yet: nothing was stored with this configuration "
        "(another one: --config FILE or MAILHUB_CONFIG)" % database,
    ]
    assert os.listdir(machine / "random") == []


def test_a_listing_with_config_given_makes_no_data_folder(machine: Path) -> None:
    chosen = site_config(machine / "chosen.ini", machine / "site")
    code, out, err = run("user", "list", "--config", str(chosen))
    assert (code, out) == (0, "ID  NAME  EMAIL  GROUPS  PASSWORD\n")
    assert err == ("mailhub: no database at %s yet: nothing was stored with this configuration "
                   "(another one: --config FILE or MAILHUB_CONFIG)\n" % (machine / "site" / "mailhub.sqlite"))
    assert not (machine / "site").exists()


def test_without_config_the_command_reads_the_system_file(machine: Path) -> None:
    system = site_config(Path(configuration.SYSTEM_CONFIG), machine / "site")
    assert run("--config", str(system), "group", "add", "ops", "--name", "Ops")[0] == 0
    code, out, err = run("group", "list")
    assert code == 0
    assert out.splitlines()[1].split()[0] == "ops"
    assert err == ("mailhub: configuration: %s (no --config or MAILHUB_CONFIG; found at %s); "
                   "database: sqlite:///%s\n" % (system, system, machine / "site" / "mailhub.sqlite"))
    assert os.listdir(machine / "random") == []


def test_mailhub_config_beats_the_system_file(machine: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    site_config(Path(configuration.SYSTEM_CONFIG), machine / "system-site")
    chosen = site_config(machine / "chosen.ini", machine / "chosen-site")
    monkeypatch.setenv(CONFIG_VARIABLE, str(chosen))
    assert run("user", "add", "ann@example.com", "--name", "Ann")[0] == 0
    code, out, err = run("user", "list")
    assert code == 0 and "ann@example.com" in out
    assert "configuration: %s (from MAILHUB_CONFIG)" % chosen in err
    assert (machine / "chosen-site" / "mailhub.sqlite").exists()
    assert not (machine / "system-site").exists()


def test_with_config_given_nothing_more_is_said(machine: Path) -> None:
    chosen = site_config(machine / "chosen.ini", machine / "site")
    assert run("group", "add", "ops", "--name", "Ops", "--config", str(chosen)) \
        == (0, "added group ops\n", "")


def test_a_write_without_config_still_makes_the_default_database_and_says_where(
        machine: Path) -> None:
    code, out, err = run("group", "add", "ops", "--name", "Ops")
    assert code == 0
    database = machine / "random" / "mailhub-data" / "mailhub.sqlite"
    assert err.startswith("mailhub: configuration: built-in defaults (")
    assert err.endswith("database: sqlite:///%s\n" % database)
    assert database.exists()


def test_twistd_reads_the_same_config_as_the_command(machine: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = site_config(machine / "chosen.ini", machine / "site")
    monkeypatch.setenv(CONFIG_VARIABLE, str(chosen))
    options = Options()
    options.parseOptions([])
    config = load_config(options)
    assert (config.path, config.origin) == (str(chosen), "from MAILHUB_CONFIG")
    assert startup_summary(config, "tcp:0")["config"] == "%s (from MAILHUB_CONFIG)" % chosen


def test_a_real_twistd_names_the_file_mailhub_config_chose(tmp_path: Path) -> None:
    from tests.support.process import TWISTD

    bad = tmp_path / "bad.ini"
    bad.write_text("[database]\ncolour = blue\n")
    done = subprocess.run([TWISTD, "-n", "--pidfile=", "mailhub"], cwd=tmp_path,
                          env=dict(os.environ, MAILHUB_CONFIG=str(bad)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "mailhub: configuration error: %s: [database] colour: unknown key "
        "(known: dsn, poll_interval, throttle_sync)" % bad]


def test_check_says_where_the_configuration_came_from(tmp_path: Path) -> None:
    chosen = site_config(tmp_path / "chosen.ini", tmp_path / "site")
    env = dict(os.environ, PYTHONPATH=str(ROOT), MAILHUB_CONFIG=str(chosen))
    done = subprocess.run([sys.executable, "-m", "mailhub", "check"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split(None, 2) for line in done.stdout.splitlines()]
    assert ["config", "OK", "%s (from MAILHUB_CONFIG)" % chosen] in rows
    assert not (tmp_path / "site").exists()
