"""The shipped systemd unit passes ``systemd-analyze verify`` and finds its secrets.

issue 15: the unit had no EnvironmentFile, so the example configuration failed
with ``MAILHUB_MAILSTORE_PASSWORD is not set``; it now reads
``/etc/mailhub/mailhub.env`` and runs ``mailhub check`` before starting.

``systemd-analyze verify`` works offline, without a running systemd (as in a
container): it is given a root folder holding the system's own units, the unit
under test and the programs it starts, so it checks the unit's syntax, its
directives and that its commands exist.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from mailhub.config import load
from tests.support.require import require_program

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
UNIT = CONTRIB / "systemd" / "mailhub.service"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def fake_root(root: Path) -> None:
    """Make ``root`` a root for ``systemd-analyze --root``: the system's units,
    stand-ins for mailhub's programs, an empty /etc/systemd/system (once)."""
    if root.exists():
        return
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "opt/mailhub/bin").mkdir(parents=True)
    for program in ("twistd", "mailhub"):
        path = root / "opt/mailhub/bin" / program
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)


def verify(unit_text: str, root: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` of ``unit_text`` installed in a fake root."""
    analyze = require_program("systemd-analyze")
    fake_root(root)
    (root / "etc/systemd/system/mailhub.service").write_text(unit_text)
    return subprocess.run([analyze, "verify", "--man=no", "--root=%s" % root, "mailhub.service"],
                          capture_output=True, text=True, timeout=60)


def test_the_hardening_rates_ok_in_systemd_analyze_security(tmp_path: Path) -> None:
    """Exposure at most 2.0 of 10 (systemd calls up to 4.9 "OK"), measured offline."""
    root = tmp_path / "root"
    verify(UNIT.read_text(), root)
    done = subprocess.run([require_program("systemd-analyze"), "security", "--offline=yes",
                           "--threshold=20", "--root=%s" % root, "mailhub.service"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    assert "Overall exposure level for mailhub.service" in done.stdout


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_the_unit_verifies_without_a_single_warning(tmp_path: Path) -> None:
    done = verify(UNIT.read_text(), tmp_path / "root")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "" and done.stdout.strip() == "", done.stderr + done.stdout


def test_verify_does_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above is not vacuous: a typo'd directive or a missing program is reported."""
    broken = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSystem=strictly") \
        .replace("/opt/mailhub/bin/mailhub check", "/opt/mailhub/bin/mailhubb check")
    done = verify(broken, tmp_path / "root")
    assert "ProtectSystem" in done.stderr or "protect system" in done.stderr
    assert "mailhubb" in done.stderr


def test_the_unit_reads_secrets_from_an_environment_file_and_checks_first() -> None:
    unit = directives(UNIT.read_text())
    assert unit["EnvironmentFile"] == ["/etc/mailhub/mailhub.env"]
    assert unit["ExecStartPre"] == ["/opt/mailhub/bin/mailhub check --config /etc/mailhub/mailhub.ini"]
    assert unit["ExecStart"] == [
        "/opt/mailhub/bin/twistd --nodaemon --pidfile= mailhub --config /etc/mailhub/mailhub.ini"]
    assert unit["User"] == ["mailhub"]
    assert unit["NoNewPrivileges"] == ["yes"] and unit["ProtectSystem"] == ["strict"]
    assert unit["ReadWritePaths"] == ["/var/lib/mailhub"]


def test_the_example_configuration_loads_with_the_example_environment_file() -> None:
    """Every env:NAME of mailhub.ini.example is set by mailhub.env.example."""
    environment = dict(
        line.split("=", 1) for line in (CONTRIB / "systemd/mailhub.env.example").read_text().splitlines()
        if line and not line.startswith("#"))
    config = load(str(CONTRIB / "mailhub.ini.example"), environ=environment)
    assert config.mailstore.password == environment["MAILHUB_MAILSTORE_PASSWORD"]
    assert config.push.password == environment["MAILHUB_PUSH_PASSWORD"]
    assert "PGPASSWORD" in environment


def test_no_secret_of_the_example_configuration_sits_in_the_ini_file() -> None:
    """The broker's password, like the others, comes from mailhub.env (issue 15)."""
    text = (CONTRIB / "mailhub.ini.example").read_text()
    assert "change-me" not in text
    environment = dict(
        line.split("=", 1) for line in (CONTRIB / "systemd/mailhub.env.example").read_text().splitlines()
        if line and not line.startswith("#"))
    config = load(str(CONTRIB / "mailhub.ini.example"), environ=environment)
    assert config.amqp.url == environment["MAILHUB_AMQP_URL"]
