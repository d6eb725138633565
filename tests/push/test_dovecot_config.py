"""``mailhub dovecot-config``: the Dovecot configuration it prints, for each
driver and version, and what it does with the [push] credentials.

The printed 2.3 configurations are run verbatim on the real Dovecot in
test_dovecot_e2e.py; the script itself in test_lua_script.py.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from mailhub import cli
from mailhub.config import Config, MailhubSection, PushSection
from mailhub.errors import ConfigError
from mailhub.push.dovecot_config import (
    PLACEHOLDER, data_path, listen_url, lua_script_path, receiver_base, render, value,
)

PUSH = PushSection(username="dovecot", password="push-s3cret")
CONFIG = Config(path="/etc/mailhub/mailhub.ini", push=PUSH)


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["dovecot-config", *argv], stdin=io.StringIO(), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def settings(text: str) -> dict[str, str]:
    """The ``key = value`` lines of a printed configuration (comments left out)."""
    pairs = (line.strip().split(" = ", 1) for line in text.splitlines()
             if " = " in line and not line.lstrip().startswith("#"))
    return {key: val for key, val in pairs}


@pytest.mark.parametrize("listen, url", [
    ("tcp:8080:interface=127.0.0.1", "http://127.0.0.1:8080"),
    ("tcp:8080", "http://127.0.0.1:8080"),
    ("tcp:port=9000:interface=0.0.0.0", "http://127.0.0.1:9000"),
    ("tcp:8080:interface=192.0.2.7", "http://192.0.2.7:8080"),
    ("tcp6:8080:interface=\\:\\:", "http://[::1]:8080"),
    ("tcp6:8080:interface=2001\\:db8\\:\\:1", "http://[2001:db8::1]:8080"),
    ("ssl:8443:privateKey=key.pem:interface=127.0.0.1", "https://127.0.0.1:8443"),
    ("8080", "http://127.0.0.1:8080"),
    ("unix:/run/mailhub.sock", None),
    ("systemd:domain=INET:index=0", None),
])
def test_listen_endpoint_gives_the_url_dovecot_reaches(listen: str, url: str | None) -> None:
    assert listen_url(listen) == url


def test_without_a_tcp_listen_the_site_url_is_used() -> None:
    config = Config(mailhub=MailhubSection(listen="unix:/run/mailhub.sock",
                                           site_url="https://hub.example.org/"), push=PUSH)
    assert receiver_base(config)[0] == "https://hub.example.org"
    assert receiver_base(config, "http://10.0.0.5:8080/")[0] == "http://10.0.0.5:8080"
    with pytest.raises(ConfigError, match="without credentials"):
        receiver_base(config, "http://u:p@10.0.0.5:8080")


def test_lua_for_23_names_the_installed_script_url_and_user_not_the_password() -> None:
    text = render(CONFIG, "lua", "2.3")
    found = settings(text)
    assert found["push_notification_driver"] == "lua:file=%s" % lua_script_path()
    assert lua_script_path().is_file()
    assert lua_script_path().name == "mailhub-push.lua"
    assert found["mailhub_push_url"] == "http://127.0.0.1:8080/push/v1/notify"
    assert found["mailhub_push_username"] == "dovecot"
    assert found["mailhub_push_password"] == PLACEHOLDER
    assert found["mail_plugins"] == ("$mail_plugins notify push_notification mail_lua "
                                     "push_notification_lua")
    assert "push-s3cret" not in text
    assert "--with-password" in text  # the comment says how to get it


def test_lua_for_24_is_a_named_filter_with_lua_settings() -> None:
    text = render(CONFIG, "lua", "2.4", with_password=True)
    assert "plugin {" not in text and "push_notification_driver" not in text
    assert "push_notification lua {\n  lua_file = %s\n  lua_settings {\n" % lua_script_path() \
        in text
    found = settings(text)
    assert (found["mailhub_push_url"], found["mailhub_push_username"],
            found["mailhub_push_password"]) == ("http://127.0.0.1:8080/push/v1/notify",
                                                "dovecot", "push-s3cret")
    assert "mail_plugins {\n  notify = yes\n  push_notification = yes\n  mail_lua = yes\n" \
           "  push_notification_lua = yes\n}" in text


def test_ox_for_23_and_24_put_the_credentials_in_the_url() -> None:
    ox23 = settings(render(CONFIG, "ox", "2.3", with_password=True))
    assert ox23["push_notification_driver"] == (
        "ox:url=http://dovecot:push-s3cret@127.0.0.1:8080/preliminary/http-notify/v1/notify")
    text = render(CONFIG, "ox", "2.4")
    assert "push_notification ox {\n  push_notification_ox_url = http://dovecot:%s@127.0.0.1:8080" \
           "/preliminary/http-notify/v1/notify\n}" % PLACEHOLDER in text
    assert "doveadm mailbox metadata set -u USER -s \"\" " \
           "/private/vendor/vendor.dovecot/http-notify user=USER" in text
    assert "push-s3cret" not in text


def test_ox_refuses_credentials_dovecot_cannot_carry_in_a_url() -> None:
    config = Config(push=PushSection(username="dovecot", password="p@ss word"))
    with pytest.raises(ConfigError, match="does not percent-decode"):
        render(config, "ox", "2.3", with_password=True)
    render(config, "ox", "2.3")  # the placeholder is fine
    assert settings(render(config, "lua", "2.3", with_password=True))[
        "mailhub_push_password"] == '"p@ss word"'


@pytest.mark.parametrize("raw, written", [
    ("plain-Value_1.0", "plain-Value_1.0"),
    ("50%off", '"50%%off"'),
    ('say "hi" \\o/', '"say \\"hi\\" \\\\o/"'),
    ("<secret-file", '"<secret-file"'),
    ("$mail_plugins", '"$mail_plugins"'),
])
def test_values_are_written_as_dovecot_reads_them_back(raw: str, written: str) -> None:
    assert value(raw) == written


def test_without_push_credentials_nothing_is_printed_unless_loopback_is_allowed() -> None:
    with pytest.raises(ConfigError, match="refuses every push request"):
        render(Config(), "lua", "2.3")
    text = render(Config(push=PushSection(allow_loopback=True)), "lua", "2.3")
    assert "mailhub_push_username" not in text and PLACEHOLDER not in text
    ox = settings(render(Config(push=PushSection(allow_loopback=True)), "ox", "2.3"))
    assert ox["push_notification_driver"] == (
        "ox:url=http://127.0.0.1:8080/preliminary/http-notify/v1/notify")


def test_the_command_reads_the_config_and_prints_the_secret_only_when_asked(
        tmp_path: Path) -> None:
    secret = tmp_path / "push.secret"
    secret.write_text("from-a-file\n")
    ini = tmp_path / "mailhub.ini"
    ini.write_text("[mailhub]\nlisten = tcp:8099:interface=127.0.0.1\n"
                   "[push]\nusername = dovecot\npassword = file:%s\n" % secret)
    code, out, err = run("--config", str(ini), "--dovecot", "2.4")
    assert (code, err) == (0, "")
    assert "from-a-file" not in out
    assert settings(out)["mailhub_push_url"] == "http://127.0.0.1:8099/push/v1/notify"
    code, out, err = run("--config", str(ini), "--driver", "ox", "--with-password")
    assert (code, err) == (0, "")
    assert settings(out)["push_notification_driver"] == (
        "ox:url=http://dovecot:from-a-file@127.0.0.1:8099/preliminary/http-notify/v1/notify")


def test_the_command_explains_a_refusal_and_exits_1(tmp_path: Path) -> None:
    ini = tmp_path / "mailhub.ini"
    ini.write_text("[mailhub]\nsite_url = http://localhost:8080\n")
    code, out, err = run("--config", str(ini))
    assert (code, out) == (1, "")
    assert err.startswith("mailhub: [push] username and password are not set")
    code, out, err = run("--driver", "imap")
    assert code == 1 and "invalid choice: 'imap'" in err


def test_help_lists_the_verb() -> None:
    out = io.StringIO()
    cli.main(["--help"], stdout=out, stderr=io.StringIO())
    assert "dovecot-config" in out.getvalue()


def test_a_copied_script_is_named_by_lua_file(tmp_path: Path) -> None:
    ini = tmp_path / "mailhub.ini"
    ini.write_text("[push]\nusername = dovecot\npassword = push-s3cret\n")
    copied = "/usr/local/share/mailhub/mailhub-push.lua"
    code, out, err = run("--config", str(ini), "--lua-file", copied)
    assert (code, err) == (0, "")
    assert settings(out)["push_notification_driver"] == "lua:file=" + copied
    code, out, err = run("--config", str(ini), "--lua-file", "mailhub-push.lua")
    assert code == 1 and "absolute path" in err


def test_a_script_path_with_a_space_is_quoted_for_24_and_refused_for_23() -> None:
    script = Path("/srv/mail hub/mailhub-push.lua")
    assert settings(render(CONFIG, "lua", "2.4", script=script))["lua_file"] == \
        '"/srv/mail hub/mailhub-push.lua"'
    with pytest.raises(ConfigError, match="--lua-file"):
        render(CONFIG, "lua", "2.3", script=script)


@pytest.mark.parametrize("example, version", [("10-mailhub-push.conf", "2.3"),
                                              ("10-mailhub-push-2.4.conf", "2.4")])
def test_the_shipped_examples_set_what_the_command_prints(example: str, version: str) -> None:
    text = data_path(example).read_text()
    printed = render(Config(push=PUSH), "lua", version,
                     script=Path("/PATH/TO/mailhub/data/dovecot/mailhub-push.lua"))
    assert settings(text) == settings(printed)
    assert "push_notification_ox_url" in text or "ox:url=" in text  # the other driver
