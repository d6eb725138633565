"""doc/operations.rst's walkthrough names what exists and its Dovecot step works.

The steps need root on an empty Debian machine, so they are not run here as
a whole; what can be checked without one is: every ``contrib/`` file the
page names exists, every ``mailhub`` verb and option it runs exists, and the
Dovecot step, run as written (but for the paths) against a copy of Debian's
own Dovecot configuration, gives a configuration ``doveconf`` accepts, with
the push plugins reaching LMTP and IMAP. (The PostgreSQL step runs in
tests/test_postgres_role.py, the unit in tests/test_contrib_systemd.py, the
proxies and monitoring in tests/test_contrib_*.py.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.require import require_program

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "doc" / "operations.rst"
CONTRIB = ROOT / "contrib"
MAILHUB = str(Path(sys.executable).with_name("mailhub"))


def walkthrough() -> str:
    text = PAGE.read_text()
    return text[text.index("\nStep by step\n"):text.index("\nRunning under systemd\n---")]


def example_environment() -> dict[str, str]:
    return dict(line.split("=", 1)
                for line in (CONTRIB / "systemd/mailhub.env.example").read_text().splitlines()
                if line and not line.startswith("#"))


def test_every_contrib_file_the_page_names_exists() -> None:
    named = set(re.findall(r"contrib/[\w./-]+\w", PAGE.read_text()))
    assert len(named) >= 6, named
    for path in sorted(named):
        assert (ROOT / path).exists(), path


def test_every_mailhub_command_of_the_walkthrough_is_one_the_cli_takes() -> None:
    commands = []
    for line in walkthrough().splitlines():
        found = re.match(r"^\s+(?:\(umask \d+ && )?mailhub (.*?)\)?(?: >.*)?$", line)
        if found:
            words = found.group(1).split()
            verb = [w for w in words[:2] if not w.startswith("-")]
            commands.append((" ".join(verb), " ".join(words[len(verb):])))
    verbs = {verb.split()[0] for verb, _ in commands}
    assert {"check", "token", "dovecot-config"} <= verbs, commands
    for verb, rest in commands:
        options = re.findall(r"(--[\w-]+)", rest)
        done = subprocess.run([MAILHUB, *verb.split(), "--help"], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, (verb, done.stderr)
        for option in options:
            assert option in done.stdout, (verb, option)


def test_the_dovecot_step_gives_a_configuration_dovecot_accepts(tmp_path: Path) -> None:
    doveconf = require_program("doveconf")
    if not Path("/etc/dovecot/dovecot.conf").exists():
        pytest.skip("Debian's dovecot-core configuration is not installed")
    step = walkthrough()
    line = next(l.strip() for l in step.splitlines()
                if l.strip().startswith("(umask") and "mailhub dovecot-config" in l)
    command = re.search(r"mailhub (dovecot-config .*?) >", line).group(1)  # type: ignore[union-attr]
    target = re.search(r"> (\S+)\)", line).group(1)  # type: ignore[union-attr]
    assert target == "/etc/dovecot/conf.d/10-mailhub-push.conf"
    etc = tmp_path / "dovecot"
    shutil.copytree("/etc/dovecot", etc, symlinks=True)
    for protocol in ("lmtp", "imap"):  # as dovecot-lmtpd and dovecot-imapd install them
        conf = etc / "conf.d" / ("20-%s.conf" % protocol)
        if not conf.exists():
            conf.write_text("protocol %s {\n  mail_plugins = $mail_plugins\n}\n" % protocol)
    args = command.replace("/etc/mailhub/mailhub.ini",
                           str(CONTRIB / "mailhub.ini.example")).split()
    done = subprocess.run([MAILHUB, *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **example_environment()))
    assert done.returncode == 0, done.stderr
    (etc / "conf.d" / Path(target).name).write_text(done.stdout)
    shown = subprocess.run([doveconf, "-c", str(etc / "dovecot.conf"), "-n"],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "push_notification_driver = lua:file=" in shown.stdout
    for protocol in ("lmtp", "imap"):
        block = re.search(r"^protocol %s \{(.*?)^\}" % protocol, shown.stdout, re.M | re.S)
        assert block is not None, shown.stdout
        assert "push_notification_lua" in block.group(1), (protocol, block.group(1))


def test_the_sections_other_parts_of_the_manual_extend_are_there() -> None:
    text = PAGE.read_text()
    # Sections may come from included parts (Scaling out: doc/scaling.rst.part).
    for part in re.findall(r"^\.\. include:: (\S+)$", text, re.M):
        text += "\n" + (PAGE.parent / part).read_text()
    titles = re.findall(r"^(.+)\n-+\n", text, re.M)
    for title in ("Step by step", "Running under systemd", "PostgreSQL", "Behind nginx",
                  "Behind HAProxy", "Monitoring", "Backups", "Upgrades", "Scaling out"):
        assert title in titles, titles
