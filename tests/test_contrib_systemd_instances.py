"""The socket and templated units for N processes pass ``systemd-analyze verify``.

``contrib/systemd/mailhub.socket`` opens the port once; each
``mailhub@N.service`` inherits it and listens on it with Twisted's
``systemd:`` endpoint (tests/test_processes.py runs two real processes on one
socket). Checked offline, as tests/test_contrib_systemd.py checks mailhub.service.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.require import require_program
from tests.test_contrib_systemd import directives, fake_root

CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
SOCKET = CONTRIB / "mailhub.socket"
TEMPLATE = CONTRIB / "mailhub@.service"


def verify(socket_text: str, template_text: str, root: Path) -> subprocess.CompletedProcess[str]:
    analyze = require_program("systemd-analyze")
    fake_root(root)
    (root / "etc/systemd/system/mailhub.socket").write_text(socket_text)
    (root / "etc/systemd/system/mailhub@.service").write_text(template_text)
    return subprocess.run([analyze, "verify", "--man=no", "--root=%s" % root, "mailhub.socket",
                           "mailhub@1.service", "mailhub@2.service"],
                          capture_output=True, text=True, timeout=60)


def test_the_socket_and_two_instances_verify_without_a_single_warning(tmp_path: Path) -> None:
    done = verify(SOCKET.read_text(), TEMPLATE.read_text(), tmp_path / "root")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "" and done.stdout.strip() == "", done.stderr + done.stdout


def test_verify_does_catch_a_broken_socket_or_template(tmp_path: Path) -> None:
    socket = SOCKET.read_text().replace("Backlog=1024", "Backlogg=1024")
    template = TEMPLATE.read_text().replace("/opt/mailhub/bin/twistd", "/opt/mailhub/bin/twistdd")
    done = verify(socket, template, tmp_path / "root")
    assert "Backlogg" in done.stderr
    assert "twistdd" in done.stderr


def test_every_instance_listens_on_the_shared_socket() -> None:
    unit = directives(TEMPLATE.read_text())
    socket = directives(SOCKET.read_text())
    assert unit["Sockets"] == ["mailhub.socket"]
    assert unit["ExecStart"][0].endswith("--listen systemd:domain=INET:index=0")
    assert socket["Service"] == ["mailhub@1.service"]
    # The rest (secrets, check first, hardening) as in mailhub.service.
    single = directives((CONTRIB / "mailhub.service").read_text())
    for key in ("EnvironmentFile", "ExecStartPre", "User", "NoNewPrivileges", "ProtectSystem",
                "ReadWritePaths", "SystemCallFilter", "CapabilityBoundingSet"):
        assert unit[key] == single[key], key
