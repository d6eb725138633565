"""A real Dovecot for tests: dovecot-lda and doveadm, no daemon at all.

Dovecot's tools run without a master or auth process when started as an
unprivileged user without ``-d`` and with ``USER`` set. As root this module
creates that user (``mailhubtest``, with ``useradd``) if it is missing and runs
the tools through ``runuser``; as any other user it runs them as itself.
Every file lives in one temporary folder owned by that user.

The commands are blocking; tests that serve HTTP on the reactor call them
through a thread (:meth:`Dovecot.run_in_thread`), so the reactor keeps
answering Dovecot while it waits.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Sequence

import attrs
import pytest

from mailhub.push.dovecot_config import lua_script_path
from tests.support.require import require_program

LDA = "/usr/lib/dovecot/dovecot-lda"
DOVEADM = "/usr/bin/doveadm"
MAIL_USER = "mailhubtest"
#: The script as the package installs it (contrib/dovecot/ links to it).
LUA_SCRIPT = lua_script_path()


@attrs.frozen
class Result:
    """What one Dovecot command did."""

    code: int
    stdout: str
    stderr: str
    seconds: float


def _ensure_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(MAIL_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    done = subprocess.run([useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent",
                           "--shell", "/usr/sbin/nologin", MAIL_USER],
                          capture_output=True, text=True)
    if done.returncode not in (0, 9):  # 9: created meanwhile by another test run
        pytest.skip("cannot create the mail user %s: %s" % (MAIL_USER, done.stderr.strip()))
    return pwd.getpwnam(MAIL_USER)


def message(subject: str = "Hello", sender: str = "Sender <sender@example.org>",
            to: str = "mailhubtest@example.org", body: str = "Hi there.\n",
            message_id: str = "<1@example.org>") -> bytes:
    """A small RFC 5322 message."""
    return ("From: %s\r\nTo: %s\r\nSubject: %s\r\nMessage-ID: %s\r\n"
            "Date: Mon, 1 Jan 2024 10:00:00 +0100\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n\r\n%s"
            % (sender, to, subject, message_id, body.replace("\n", "\r\n"))).encode("utf-8")


class Dovecot:
    """One Dovecot configuration in a temporary folder, and its commands.

    ``driver`` is the ``push_notification_driver`` value (``ox:url=...`` or
    ``lua:file=...``); ``plugin`` adds ``plugin {}`` settings; ``lua`` loads
    the Lua plugins. With ``snippet`` instead (a conf.d file's text, such as
    ``mailhub dovecot-config`` prints) the configuration is the base settings
    and that text, verbatim.
    """

    def __init__(self, driver: str | None = None, plugin: dict[str, str] | None = None,
                 lua: bool = False, snippet: str | None = None) -> None:
        require_program(LDA)
        require_program(DOVEADM)
        self.as_root = os.geteuid() == 0
        if self.as_root:
            if not shutil.which("runuser"):
                pytest.skip("runuser is not installed (util-linux)")
            self.account = _ensure_user()
        else:
            self.account = pwd.getpwuid(os.geteuid())
        self.user = self.account.pw_name
        self.dir = Path(tempfile.mkdtemp(prefix="mailhub-dovecot-"))
        for sub in ("run", "mail", "attr", "home"):
            (self.dir / sub).mkdir()
        self.conf = self.dir / "dovecot.conf"
        self.log_path = self.dir / "dovecot.log"
        plugins = "$mail_plugins notify push_notification"
        if lua:
            plugins += " mail_lua push_notification_lua"
        settings = {"push_notification_driver": driver, **(plugin or {})}
        lines = [
            "base_dir = %s/run" % self.dir,
            "log_path = %s" % self.log_path,
            "info_log_path = %s" % self.log_path,
            "ssl = no",
            "protocols =",
            "postmaster_address = postmaster@example.org",
            "mail_location = maildir:%s/mail/%%u" % self.dir,
            "mail_attribute_dict = file:%s/attr/%%u" % self.dir,
        ]
        if snippet is None:
            lines += ["mail_plugins = %s" % plugins, "plugin {"]
            lines += ["  %s = %s" % item for item in settings.items()] + ["}", ""]
        else:
            lines += [snippet, ""]
        self.conf.write_text("\n".join(lines))
        if self.as_root:
            for path in [self.dir, *self.dir.rglob("*")]:
                os.chown(path, self.account.pw_uid, self.account.pw_gid)
            os.chmod(self.dir, 0o700)

    def command(self, argv: Sequence[str], stdin: bytes = b"", timeout: float = 30) -> Result:
        """Run one Dovecot tool as the mail user (blocking)."""
        env = ["env", "-i", "USER=%s" % self.user, "HOME=%s/home" % self.dir,
               "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
        full = (["runuser", "-u", self.user, "--"] if self.as_root else []) + env + list(argv)
        started = time.monotonic()
        done = subprocess.run(full, input=stdin, capture_output=True, timeout=timeout)
        return Result(done.returncode, done.stdout.decode("utf-8", "replace"),
                      done.stderr.decode("utf-8", "replace"), time.monotonic() - started)

    def deliver(self, raw: bytes, sender: str = "sender@example.org") -> Result:
        """dovecot-lda into the user's INBOX: a MessageNew event."""
        return self.command([LDA, "-c", str(self.conf), "-f", sender], raw)

    def doveadm(self, *args: str, stdin: bytes = b"") -> Result:
        return self.command([DOVEADM, "-c", str(self.conf), *args], stdin)

    def save(self, mailbox: str, raw: bytes) -> Result:
        """doveadm save into a mailbox: a MessageAppend event."""
        return self.doveadm("save", "-m", mailbox, stdin=raw)

    def enable_ox(self, value: str | None = None) -> Result:
        """Set the INBOX METADATA the OX driver needs before it sends anything."""
        return self.doveadm("mailbox", "metadata", "set", "-s", "",
                            "/private/vendor/vendor.dovecot/http-notify",
                            "user=%s" % (value or self.user))

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
