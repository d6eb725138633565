"""Configuration traps an administrator falls into, each refused with one clear line.

issue 15: ``sqlite:///relative.sqlite`` wrote ``/relative.sqlite`` at the root; a
DSN into a missing folder silently created it; LDAP without ``base_dn`` passed
``mailhub check``. And ``[database] dsn`` takes ``env:``/``file:`` like the
other secrets.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailhub.config import parse, sqlite_path
from mailhub.directory.sql import SQLiteDialect, dialect_for
from mailhub.errors import ConfigError


def refusal(text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(text, "/etc/mailhub/mailhub.ini", environ=environ or {})
    message = str(caught.value)
    assert message.startswith("/etc/mailhub/mailhub.ini: ")
    assert "\n" not in message
    return message


def test_three_slashes_are_relative_to_the_working_folder_four_absolute() -> None:
    assert sqlite_path("sqlite:///relative.sqlite") == "relative.sqlite"
    assert sqlite_path("sqlite:///data/mailhub.sqlite") == "data/mailhub.sqlite"
    assert sqlite_path("sqlite:////var/lib/mailhub/mailhub.sqlite") == "/var/lib/mailhub/mailhub.sqlite"
    assert sqlite_path("sqlite:///:memory:") == ":memory:"


def test_a_relative_sqlite_dsn_writes_in_the_working_folder_not_at_the_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = parse("[database]\ndsn = sqlite:///relative.sqlite\n")
    dialect = dialect_for(config.dsn)
    assert isinstance(dialect, SQLiteDialect)
    dialect.connect().close()
    assert (tmp_path / "relative.sqlite").exists()
    assert dialect.path == "relative.sqlite"


def test_the_default_dsn_is_absolute_under_the_data_folder(tmp_path: Path) -> None:
    config = parse("[mailhub]\ndata = %s\n" % tmp_path)
    dialect = dialect_for(config.dsn)
    assert isinstance(dialect, SQLiteDialect)
    assert dialect.path == str(tmp_path / "mailhub.sqlite")


def test_a_dsn_into_a_missing_folder_is_refused_naming_the_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    message = refusal("[database]\ndsn = sqlite:///%s/nowhere/mailhub.sqlite\n" % tmp_path)
    assert "[database] dsn: bad value: the folder %s/nowhere does not exist" % tmp_path in message
    assert not (tmp_path / "nowhere").exists()
    # The usual slip: an absolute path written with three slashes.
    message = refusal("[database]\ndsn = sqlite:///var/lib/mailhub/mailhub.sqlite\n")
    assert "[database] dsn: bad value: the folder var/lib/mailhub (relative to %s) does not exist" \
        % tmp_path in message
    assert "sqlite:////PATH absolute" in message
    assert not (tmp_path / "var").exists()


def test_a_sqlite_dsn_with_a_host_or_no_file_is_refused() -> None:
    assert "[database] dsn: bad value: sqlite DSNs are" in refusal("[database]\ndsn = sqlite://host/x\n")
    assert "[database] dsn: bad value: the sqlite DSN names no file" in refusal("[database]\ndsn = sqlite:///\n")


def test_the_dsn_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    dsn = "postgresql://mailhub:s3cret@db.example.com/mailhub"
    config = parse("[database]\ndsn = env:MAILHUB_DSN\n", environ={"MAILHUB_DSN": dsn})
    assert config.dsn == dsn
    assert "s3cret" not in repr(config)
    secret = tmp_path / "dsn"
    secret.write_text(dsn + "\n")
    assert parse("[database]\ndsn = file:%s\n" % secret).dsn == dsn


def test_a_missing_dsn_secret_is_named_and_a_bad_one_not_printed() -> None:
    assert "[database] dsn: bad value: environment variable MAILHUB_DSN is not set" \
        in refusal("[database]\ndsn = env:MAILHUB_DSN\n")
    message = refusal("[database]\ndsn = env:MAILHUB_DSN\n",
                      {"MAILHUB_DSN": "mysql://root:s3cret@db/site"})
    assert "[database] dsn: bad value" in message
    assert "s3cret" not in message


def test_a_secret_dsn_is_not_in_the_config_repr() -> None:
    config = parse("[database]\ndsn = env:D\n", environ={"D": "postgresql://u:pw-here@h/d"})
    assert "pw-here" not in repr(config)


def test_ldap_without_a_base_dn_is_refused() -> None:
    message = refusal("[ldap]\nurl = ldap://ldap.example.com\n")
    assert "[ldap] base_dn: must be set when url is set" in message
    assert parse("[ldap]\nurl = ldap://ldap.example.com\nbase_dn = dc=example,dc=com\n").ldap.base_dn \
        == "dc=example,dc=com"
    assert parse("[ldap]\nbase_dn = dc=example,dc=com\n").ldap.url == ""


def test_the_working_folder_is_untouched_by_parsing(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    parse("[database]\ndsn = sqlite:///relative.sqlite\n")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("section, says", [
    ("[database]\ndsn = sqlite:///var/lib/mailhub/mailhub.sqlite\n",
     "[database] dsn: bad value: the folder var/lib/mailhub (relative to "),
    ("[ldap]\nurl = ldap://127.0.0.1:1\n", "[ldap] base_dn: must be set when url is set"),
])
def test_twistd_stops_with_one_line_and_creates_nothing(tmp_path: Path, section: str,
                                                         says: str) -> None:
    import subprocess

    from tests.support.process import TWISTD

    config = tmp_path / "mailhub.ini"
    config.write_text("[mailhub]\ndata = %s\n%s" % (tmp_path / "data", section))
    done = subprocess.run([TWISTD, "-n", "--pidfile=", "mailhub", "--config", str(config)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("mailhub: configuration error: %s: " % config)
    assert says in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["mailhub.ini"]
