"""The INI file: defaults, every section, and one clear line for each mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailhub.config import Config, load, parse
from mailhub.errors import ConfigError


def test_no_file_gives_the_embedded_defaults() -> None:
    config = load(None)
    assert config.mailhub.listen == "tcp:8080:interface=127.0.0.1"
    assert config.mailhub.data == "./mailhub-data"
    assert config.dsn.startswith("sqlite:///") and config.dsn.endswith("mailhub-data/mailhub.sqlite")
    assert config.amqp.url == ""
    assert config.embedded_carddav
    assert config.mailstore.path == "/mailstore"


def test_every_section_is_read() -> None:
    config = parse("""
[mailhub]
listen = tcp:9000
site_url = https://groups.example.com
[database]
dsn = postgresql://mailhub@db/mailhub
[amqp]
url = amqp://guest:guest@127.0.0.1:5672/
prefetch = 32
[carddav]
url = https://dav.example.com/
addressbook = https://dav.example.com/addressbooks/{user}/collected/
[ldap]
url = ldap://one.example.com ldaps://two.example.com
base_dn = dc=example,dc=com
start_tls = yes
[mailstore]
path = /ms
[push]
username = dovecot
password = secret
[collector]
sent_folders = Sent, Sent Items
""")
    assert config.mailhub.listen == "tcp:9000"
    assert config.dsn == "postgresql://mailhub@db/mailhub"
    assert config.amqp.prefetch == 32
    assert not config.embedded_carddav
    assert config.ldap.start_tls is True
    assert config.mailstore.path == "/ms"
    assert config.collector.sent_folders == ("Sent", "Sent Items")


@pytest.mark.parametrize("text, names", [
    ("[nonsense]\nx = 1\n", "[nonsense]: unknown section"),
    ("[mailhub]\nlisten_on = tcp:1\n", "[mailhub] listen_on: unknown key"),
    ("[amqp]\nprefetch = many\n", "[amqp] prefetch: bad value"),
    ("[amqp]\nprefetch = 0\n", "[amqp] prefetch: bad value"),
    ("[collector]\nmirror_size = -1\n", "[collector] mirror_size: bad value"),
    ("[ldap]\nstart_tls = maybe\n", "[ldap] start_tls: bad value"),
    ("[database]\ndsn = mysql://x\n", "[database] dsn: bad value"),
    ("[amqp]\nurl = http://broker\n", "[amqp] url: bad value"),
    ("[ldap]\nurl = ldap://a http://b\n", "[ldap] url: bad value"),
    ("[mailstore]\npath = mailstore\n", "[mailstore] path: bad value"),
    ("[push]\npassword = env:MAILHUB_TEST_UNSET_VARIABLE\n", "[push] password: bad value"),
    ("not an ini file", "cannot parse"),
    ("[mailstore]\nusername = ms\n", "[mailstore] password: must be set too"),
    ("[push]\npassword = secret\n", "[push] username: must be set too"),
    ("[ldap]\nca_file = /nonexistent/ca.pem\n", "[ldap] ca_file: bad value: no such file"),
    ("[hooks]\nstatus_codes = zope\n", "[hooks] status_codes: bad value: expected http or "
     "groupserver, not 'zope'"),
])
def test_mistakes_name_file_section_and_key(text: str, names: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text, "/etc/mailhub/mailhub.ini", environ={})
    message = str(caught.value)
    assert message.startswith("/etc/mailhub/mailhub.ini: ")
    assert names in message
    assert "\n" not in message


def test_hooks_status_codes_default_to_http_and_may_be_groupserver() -> None:
    assert parse("").hooks.status_codes == "http"
    assert parse("[hooks]\nstatus_codes = groupserver\n").hooks.status_codes == "groupserver"


def test_secrets_come_from_the_environment_or_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "ldap-password"
    secret.write_text("s3cret\n")
    config = parse("[push]\nusername = dovecot\npassword = env:PUSH_PASSWORD\n[ldap]\nbind_password = file:%s\n" % secret,
                   environ={"PUSH_PASSWORD": "from-env"})
    assert config.push.password == "from-env"
    assert config.ldap.bind_password == "s3cret"
    assert "s3cret" not in repr(config) and "from-env" not in repr(config)


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(str(tmp_path / "missing.ini"))
    assert str(tmp_path / "missing.ini") in str(caught.value)


def test_a_mirror_size_of_zero_keeps_no_copies() -> None:
    assert parse("[collector]\nmirror_size = 0\n").collector.mirror_size == 0
    assert parse("").collector.mirror_size == 50000


def test_config_is_frozen() -> None:
    with pytest.raises(Exception):
        Config().mailhub.listen = "tcp:1"  # type: ignore[misc]


def test_retention_is_off_and_ranking_on_by_default() -> None:
    collector = parse("").collector
    assert (collector.max_contacts, collector.expire_days, collector.rank) == (0, 0, True)
    assert collector.retention_interval == 86400.0
    set_ = parse("[collector]\nmax_contacts = 500\nexpire_days = 0\nrank = no\n"
                 "retention_interval = 3600\n").collector
    assert (set_.max_contacts, set_.expire_days, set_.rank, set_.retention_interval) == (
        500, 0, False, 3600.0)


@pytest.mark.parametrize("line", ["expire_days = -1", "max_contacts = many",
                                  "retention_interval = 0"])
def test_bad_retention_settings_stop_start_up(line: str) -> None:
    with pytest.raises(ConfigError, match=r"\[collector\] %s: bad value" % line.split()[0]):
        parse("[collector]\n%s\n" % line)
