"""The ``mailhub`` command, run in-process (and once as a real process).

Each test runs :func:`mailhub.cli.main` with captured streams against a
fresh SQLite data folder or a throwaway PostgreSQL database, and reads the
results back through the same store the server uses. ``check`` runs the
reactor, so it runs as ``python -m mailhub`` in a process of its own,
against real servers: RabbitMQ (127.0.0.1:5672), PostgreSQL, slapd and
Radicale (started here on free ports), and against ports nothing listens on.
"""

from __future__ import annotations

import gc
import io
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mailhub import cli
from mailhub.config import load
from mailhub.directory.service import Directory
from mailhub.directory.model import BASE62
from mailhub.directory.sql import MIGRATIONS, SQLStore, dialect_for
from mailhub.directory.users import verify_password
from tests.support.postgres import SERVER, throwaway_database
from tests.support.require import free_port, require_port
from tests.support.deferreds import result

ROOT = Path(__file__).resolve().parent.parent
TOKEN = re.compile("^[%s]{32}$" % BASE62)
PROFILE_ID = re.compile("^[%s]{22}$" % BASE62)


class Ran:
    """What one run of the command did: exit code and both outputs."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code = code
        self.out = out
        self.err = err

    def __repr__(self) -> str:
        return "Ran(%d, out=%r, err=%r)" % (self.code, self.out, self.err)


def mailhub(*argv: str, stdin: str = "") -> Ran:
    """Run ``mailhub ARGV...`` in this process; ``check`` in a process of its own.

    ``check`` runs the reactor (``task.react``), which a process runs once.
    """
    if "check" in argv:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        done = subprocess.run([sys.executable, "-m", "mailhub", *argv], input=stdin,
                              capture_output=True, text=True, timeout=60, env=env)
        return Ran(done.returncode, done.stdout, done.stderr)
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return Ran(code, out.getvalue(), err.getvalue())


def write_config(path: Path, **sections: dict[str, str]) -> str:
    """An INI file from ``section={key: value}``; returns its path."""
    text = ""
    for section, keys in sections.items():
        text += "[%s]\n" % section + "".join("%s = %s\n" % kv for kv in keys.items())
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture
def site(tmp_path: Path) -> str:
    """A config whose data folder (SQLite database) does not exist yet."""
    return write_config(tmp_path / "mailhub.ini", mailhub={"data": str(tmp_path / "data")})


@pytest.fixture
def postgres_site(tmp_path: Path) -> Iterator[str]:
    with throwaway_database() as dsn:
        yield write_config(tmp_path / "mailhub.ini", mailhub={"data": str(tmp_path / "data")},
                           database={"dsn": dsn})


def store_of(config_path: str) -> SQLStore:
    config = load(config_path)
    return SQLStore(dialect_for(config.dsn), config.mailhub.site_id)


def stored_token(config_path: str) -> str | None:
    store = store_of(config_path)
    try:
        return result(store.get_token())  # type: ignore[no-any-return]
    finally:
        store.close_all()


def rows(text: str) -> list[list[str]]:
    """The cells of a printed table (columns are separated by two spaces or more)."""
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines() if line.strip()]


# -- token create -------------------------------------------------------------


def assert_token_output(ran: Ran) -> str:
    assert ran.code == 0, ran
    lines = ran.out.splitlines()
    assert len(lines) == 3, ran
    assert lines[0] == "The authentication token has been changed to the following:"
    assert lines[2] == "Please update the relevant configuration files."
    assert TOKEN.match(lines[1]), lines[1]
    return lines[1]


def test_token_create_on_a_fresh_data_folder_prints_and_stores_the_token(site: str) -> None:
    token = assert_token_output(mailhub("token", "create", "--config", site))
    assert stored_token(site) == token


def test_token_create_again_replaces_the_token(site: str) -> None:
    first = assert_token_output(mailhub("token", "create", "--config", site))
    second = assert_token_output(mailhub("token", "create", "--config", site))
    assert first != second
    assert stored_token(site) == second


def test_token_rotation_is_audited_without_the_token(site: str) -> None:
    token = assert_token_output(mailhub("token", "create", "--config", site))
    store = store_of(site)
    try:
        log = result(store.audit_log(10))
    finally:
        store.close_all()
    assert [row["event"] for row in log] == ["token:rotated"]
    assert token not in repr(log)


def test_running_server_accepts_the_new_token_without_restart(site: str) -> None:
    old = assert_token_output(mailhub("token", "create", "--config", site))
    store = store_of(site)
    directory = Directory(store, Clock())
    try:
        result(Deferred.fromCoroutine(directory.load()))
        assert result(Deferred.fromCoroutine(directory.check_token(old)))
        new = assert_token_output(mailhub("token", "create", "--config", site))
        assert result(Deferred.fromCoroutine(directory.check_token(new)))
        assert not result(Deferred.fromCoroutine(directory.check_token(old)))
    finally:
        store.close_all()


def test_token_create_uses_the_dsn_argument_over_the_config(site: str, tmp_path: Path) -> None:
    other = "sqlite:///%s" % (tmp_path / "other" / "gs.sqlite")
    token = assert_token_output(mailhub("token", "create", other, "--config", site))
    elsewhere = SQLStore(dialect_for(other), "main")
    try:
        assert result(elsewhere.get_token()) == token
    finally:
        elsewhere.close_all()
    assert not (Path(site).parent / "data" / "mailhub.sqlite").exists()


def test_token_create_on_postgresql(postgres_site: str) -> None:
    token = assert_token_output(mailhub("token", "create", "--config", postgres_site))
    assert stored_token(postgres_site) == token


def test_token_create_with_a_postgresql_dsn_argument(tmp_path: Path) -> None:
    with throwaway_database() as dsn:
        ran = mailhub("token", "create", dsn, "--config",
                      write_config(tmp_path / "m.ini", mailhub={"data": str(tmp_path)}))
        token = assert_token_output(ran)
        store = SQLStore(dialect_for(dsn), "main")
        try:
            assert result(store.get_token()) == token
        finally:
            store.close_all()


@pytest.mark.parametrize("dsn", [
    "not a dsn",
    "mysql://root@127.0.0.1/site",
    "sqlite://host/site.sqlite",
    "sqlite:///",
    "postgresql://postgres:s3cret@127.0.0.1:notaport/site",
    "postgresql://[unclosed/site",
])
def test_token_create_with_a_bad_dsn_exits_1(dsn: str, site: str) -> None:
    ran = mailhub("token", "create", dsn, "--config", site)
    assert ran.code == 1, ran
    assert ran.out == ""
    assert "bad DSN" in ran.err
    assert "s3cret" not in ran.err


def test_token_create_when_postgresql_cannot_be_reached_exits_2(site: str) -> None:
    dsn = "postgresql://postgres:s3cret@127.0.0.1:%d/site" % free_port()
    ran = mailhub("token", "create", dsn, "--config", site)
    assert ran.code == 2, ran
    assert ran.out == ""
    assert "cannot connect" in ran.err
    assert "s3cret" not in ran.err


def test_token_create_when_the_sqlite_folder_cannot_be_made_exits_2(
        site: str, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    ran = mailhub("token", "create", "sqlite:///%s/a-file/sub/db.sqlite" % tmp_path,
                  "--config", site)
    assert ran.code == 2, ran
    assert ran.out == ""


def test_token_create_on_a_file_that_is_not_a_database_exits_2(site: str, tmp_path: Path) -> None:
    (tmp_path / "junk.sqlite").write_bytes(b"this is not SQLite" * 100)
    ran = mailhub("token", "create", "sqlite:///%s/junk.sqlite" % tmp_path, "--config", site)
    assert ran.code == 2, ran
    assert ran.out == ""
    assert "cannot be used" in ran.err


def test_token_create_as_a_postgresql_user_without_rights_exits_2(site: str) -> None:
    import psycopg

    role = "mailhub_cli_" + secrets.token_hex(4)
    try:
        with throwaway_database() as dsn:
            with psycopg.connect(dsn, autocommit=True) as admin:
                admin.execute('CREATE ROLE "%s" LOGIN' % role)
                admin.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ResourceWarning)
                ran = mailhub("token", "create", dsn.replace("postgres@", role + "@", 1),
                              "--config", site)
                gc.collect()
            assert ran.code == 2, ran
            assert ran.out == ""
            assert "cannot be used" in ran.err
            # The refused store's connection was closed, not left to the collector.
            assert [str(w.message) for w in caught if w.category is ResourceWarning] == []
    finally:
        with psycopg.connect(SERVER, autocommit=True) as admin:
            admin.execute('DROP ROLE IF EXISTS "%s"' % role)


# -- configuration --------------------------------------------------------------


def test_config_option_goes_before_or_after_the_verb(site: str) -> None:
    assert mailhub("--config", site, "group", "add", "one", "--name", "One").code == 0
    assert mailhub("group", "--config", site, "add", "two", "--name", "Two").code == 0
    assert mailhub("group", "add", "three", "--name", "Three", "--config", site).code == 0
    listed = mailhub("group", "list", "--config", site)
    assert [r[0] for r in rows(listed.out)[1:]] == ["one", "three", "two"]


def test_without_config_the_data_folder_is_mailhub_data_here(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    token = assert_token_output(mailhub("token", "create"))
    assert (tmp_path / "mailhub-data" / "mailhub.sqlite").exists()
    store = SQLStore(dialect_for("sqlite:///%s/mailhub-data/mailhub.sqlite" % tmp_path))
    try:
        assert result(store.get_token()) == token
    finally:
        store.close_all()


def test_a_bad_config_prints_the_error_and_exits_1(tmp_path: Path) -> None:
    bad = write_config(tmp_path / "bad.ini", database={"colour": "blue"})
    ran = mailhub("token", "create", "--config", bad)
    assert ran.code == 1
    assert ran.out == ""
    assert ran.err.startswith("mailhub: %s: [database] colour: unknown key" % bad)
    assert len(ran.err.splitlines()) == 1


def test_a_missing_config_file_exits_1(tmp_path: Path) -> None:
    ran = mailhub("check", "--config", str(tmp_path / "nowhere.ini"))
    assert ran.code == 1
    assert "nowhere.ini: cannot read" in ran.err


def test_unknown_verb_or_missing_argument_exits_1_with_usage(site: str) -> None:
    for argv in (["frobnicate"], ["user"], ["group", "add", "--config", site]):
        ran = mailhub(*argv)
        assert ran.code == 1, (argv, ran)
        assert "usage: mailhub" in ran.err


def test_help_lists_every_verb() -> None:
    ran = mailhub("--help")
    assert ran.code == 0
    for verb in ("token", "group", "user", "check"):
        assert verb in ran.out


# -- groups -------------------------------------------------------------------


def test_group_add_list_remove(site: str) -> None:
    added = mailhub("group", "add", "devs", "--name", "Developers", "--email",
                    "devs@lists.example.com", "--privacy", "private", "--config", site)
    assert added.code == 0, added
    assert mailhub("group", "add", "all", "--name", "Everyone", "--config", site).code == 0
    listed = mailhub("group", "list", "--config", site)
    assert listed.code == 0
    assert rows(listed.out) == [
        ["ID", "NAME", "EMAIL", "PRIVACY", "MEMBERS"],
        ["all", "Everyone", "public", "0"],
        ["devs", "Developers", "devs@lists.example.com", "private", "0"],
    ]
    store = store_of(site)
    try:
        groups = {g.id: g for g in result(store.load_groups())}
    finally:
        store.close_all()
    assert groups["devs"].email == "devs@lists.example.com"
    assert groups["devs"].privacy == "private"
    assert mailhub("group", "remove", "devs", "--config", site).code == 0
    assert [r[0] for r in rows(mailhub("group", "list", "--config", site).out)] == ["ID", "all"]


def test_group_add_refuses_bad_input_naming_every_problem(site: str) -> None:
    ran = mailhub("group", "add", "no spaces", "--name", " ", "--email", "not-an-address",
                  "--privacy", "hidden", "--config", site)
    assert ran.code == 1
    assert "group id 'no spaces'" in ran.err
    assert "name must not be empty" in ran.err
    assert "'not-an-address' is not an email address" in ran.err
    assert "privacy must be one of public, site, private, secret" in ran.err
    assert rows(mailhub("group", "list", "--config", site).out) == [
        ["ID", "NAME", "EMAIL", "PRIVACY", "MEMBERS"]]


def test_group_add_type_is_stored_as_its_short_name(site: str) -> None:
    assert mailhub("group", "add", "news", "--name", "News", "--type", "announcement",
                   "--config", site).code == 0
    assert mailhub("group", "add", "all", "--name", "Everyone", "--config", site).code == 0
    ran = mailhub("group", "add", "bad", "--name", "Bad", "--type", "Announcement group",
                  "--config", site)
    assert ran.code == 1
    assert "type must be one of discussion, announcement, support, closed" in ran.err
    store = store_of(site)
    try:
        groups = {g.id: g.type for g in result(store.load_groups())}
    finally:
        store.close_all()
    assert groups == {"news": "announcement", "all": "discussion"}


def test_group_add_an_existing_id_exits_1(site: str) -> None:
    assert mailhub("group", "add", "devs", "--name", "Developers", "--config", site).code == 0
    ran = mailhub("group", "add", "devs", "--name", "Other", "--config", site)
    assert ran.code == 1
    assert "exists already" in ran.err


def test_group_remove_an_unknown_group_exits_1(site: str) -> None:
    ran = mailhub("group", "remove", "nothing", "--config", site)
    assert ran.code == 1
    assert "no group nothing" in ran.err


def test_group_list_counts_members(site: str) -> None:
    assert mailhub("group", "add", "devs", "--name", "Developers", "--config", site).code == 0
    profile_id = mailhub("user", "add", "ann@example.com", "--name", "Ann",
                         "--config", site).out.strip()
    store = store_of(site)
    try:
        assert result(store.add_member("devs", profile_id))
    finally:
        store.close_all()
    assert rows(mailhub("group", "list", "--config", site).out)[1][-1] == "1"
    assert rows(mailhub("user", "list", "--config", site).out)[1][3] == "devs"


# -- users ----------------------------------------------------------------------


def test_user_add_prints_the_id_of_a_profile_with_a_preferred_verified_address(site: str) -> None:
    ran = mailhub("user", "add", "Ann.Example@Example.com", "--name", "Ann Example",
                  "--config", site)
    assert ran.code == 0, ran
    profile_id = ran.out.strip()
    assert PROFILE_ID.match(profile_id)
    store = store_of(site)
    try:
        profile = result(store.find_profile("ann.example@example.com"))
        assert result(store.get_password_hash(profile_id)) is None
    finally:
        store.close_all()
    assert profile.id == profile_id
    assert profile.name == "Ann Example"
    assert profile.preferred == ["Ann.Example@Example.com"]
    assert profile.unverified == []


def test_user_add_with_a_nickname_stores_it_and_refuses_a_taken_one(site: str) -> None:
    ran = mailhub("user", "add", "carol@example.com", "--name", "Carol", "--nickname",
                  "5f0c1a2b3c4d5e6f70819203", "--config", site)
    assert ran.code == 0, ran
    store = store_of(site)
    try:
        profile = result(store.get_profile(ran.out.strip()))
    finally:
        store.close_all()
    assert profile.nickname == "5f0c1a2b3c4d5e6f70819203"
    again = mailhub("user", "add", "dan@example.com", "--name", "Dan", "--nickname",
                    "5f0c1a2b3c4d5e6f70819203", "--config", site)
    assert again.code == 1, again
    assert "nickname" in again.err


def test_user_add_with_password_stdin_stores_an_argon2id_hash(site: str) -> None:
    ran = mailhub("user", "add", "bob@example.com", "--name", "Bob", "--password-stdin",
                  "--config", site, stdin="correct horse\n")
    assert ran.code == 0, ran
    store = store_of(site)
    try:
        hashed = result(store.get_password_hash(ran.out.strip()))
    finally:
        store.close_all()
    assert hashed.startswith("$argon2id$")
    assert verify_password(hashed, "correct horse")
    assert not verify_password(hashed, "correct horse\n")


def test_user_add_refuses_an_empty_password_and_creates_nothing(site: str) -> None:
    ran = mailhub("user", "add", "bob@example.com", "--name", "Bob", "--password-stdin",
                  "--config", site, stdin="\n")
    assert ran.code == 1
    assert "password must not be empty" in ran.err
    assert rows(mailhub("user", "list", "--config", site).out)[1:] == []


def test_user_add_refuses_a_bad_address_or_empty_name(site: str) -> None:
    for address, name in (("no-at-sign", "X"), ("two@@example.com", "X"),
                          ("a b@example.com", "X"), ("ok@example.com", "  ")):
        ran = mailhub("user", "add", address, "--name", name, "--config", site)
        assert ran.code == 1, (address, ran)
        assert ran.out == ""
    assert rows(mailhub("user", "list", "--config", site).out)[1:] == []


def test_user_add_an_address_that_is_taken_exits_1(site: str) -> None:
    assert mailhub("user", "add", "ann@example.com", "--name", "Ann", "--config", site).code == 0
    ran = mailhub("user", "add", "ANN@example.com", "--name", "Another", "--config", site)
    assert ran.code == 1
    assert "belongs to another profile" in ran.err


def test_user_list_shows_ids_names_addresses_and_passwords(site: str) -> None:
    ann = mailhub("user", "add", "ann@example.com", "--name", "Ann Example",
                  "--config", site).out.strip()
    bob = mailhub("user", "add", "bob@example.com", "--name", "Bob", "--password-stdin",
                  "--config", site, stdin="pw\n").out.strip()
    listed = mailhub("user", "list", "--config", site)
    assert listed.code == 0
    assert rows(listed.out)[0] == ["ID", "NAME", "EMAIL", "GROUPS", "PASSWORD"]
    assert sorted(rows(listed.out)[1:]) == sorted([
        [ann, "Ann Example", "ann@example.com", "-", "no"],
        [bob, "Bob", "bob@example.com", "-", "yes"],
    ])


def test_user_passwd_sets_the_password_from_stdin(site: str) -> None:
    profile_id = mailhub("user", "add", "ann@example.com", "--name", "Ann",
                         "--config", site).out.strip()
    ran = mailhub("user", "passwd", "ANN@example.com", "--config", site, stdin="s3cret pass\n")
    assert ran.code == 0, ran
    assert "s3cret" not in ran.out + ran.err
    store = store_of(site)
    try:
        first = result(store.get_password_hash(profile_id))
        assert verify_password(first, "s3cret pass")
        assert mailhub("user", "passwd", profile_id, "--config", site, stdin="other\n").code == 0
        second = result(store.get_password_hash(profile_id))
    finally:
        store.close_all()
    assert verify_password(second, "other")
    assert not verify_password(second, "s3cret pass")


def test_user_passwd_refuses_an_empty_password(site: str) -> None:
    mailhub("user", "add", "ann@example.com", "--name", "Ann", "--config", site)
    for given in ("", "\n"):
        ran = mailhub("user", "passwd", "ann@example.com", "--config", site, stdin=given)
        assert ran.code == 1
        assert "password must not be empty" in ran.err


def test_user_passwd_for_an_unknown_user_exits_1(site: str) -> None:
    ran = mailhub("user", "passwd", "nobody@example.com", "--config", site, stdin="pw\n")
    assert ran.code == 1
    assert "no user nobody@example.com" in ran.err


def test_user_remove_by_address_or_id(site: str) -> None:
    ann = mailhub("user", "add", "ann@example.com", "--name", "Ann", "--config", site).out.strip()
    bob = mailhub("user", "add", "bob@example.com", "--name", "Bob", "--config", site).out.strip()
    assert mailhub("user", "remove", "Ann@Example.com", "--config", site).code == 0
    assert mailhub("user", "remove", bob, "--config", site).code == 0
    assert rows(mailhub("user", "list", "--config", site).out)[1:] == []
    store = store_of(site)
    try:
        assert result(store.get_profile(ann)) is None
        assert result(store.find_profile("bob@example.com")) is None
    finally:
        store.close_all()


def test_user_remove_an_unknown_user_exits_1(site: str) -> None:
    for who in ("nobody@example.com", "qK7SgjsTHcLNrJ2ClevcJ0"):
        ran = mailhub("user", "remove", who, "--config", site)
        assert ran.code == 1
        assert "no user %s" % who in ran.err


def test_users_and_groups_on_postgresql(postgres_site: str) -> None:
    assert mailhub("group", "add", "devs", "--name", "Developers", "--config",
                   postgres_site).code == 0
    profile_id = mailhub("user", "add", "ann@example.com", "--name", "Ann",
                         "--config", postgres_site).out.strip()
    assert PROFILE_ID.match(profile_id)
    assert mailhub("user", "passwd", "ann@example.com", "--config", postgres_site,
                   stdin="pw\n").code == 0
    assert rows(mailhub("user", "list", "--config", postgres_site).out)[1] == [
        profile_id, "Ann", "ann@example.com", "-", "yes"]
    assert rows(mailhub("group", "list", "--config", postgres_site).out)[1][0] == "devs"
    assert mailhub("user", "remove", profile_id, "--config", postgres_site).code == 0
    assert mailhub("group", "remove", "devs", "--config", postgres_site).code == 0


def test_admin_verbs_exit_2_when_the_database_cannot_be_reached(tmp_path: Path) -> None:
    config = write_config(tmp_path / "m.ini",
                          database={"dsn": "postgresql://postgres@127.0.0.1:%d/x" % free_port()})
    for argv in (["group", "list"], ["user", "add", "a@example.com", "--name", "A"]):
        ran = mailhub(*argv, "--config", config)
        assert ran.code == 2, (argv, ran)
        assert "cannot connect" in ran.err


# -- check --------------------------------------------------------------------


def check_rows(ran: Ran) -> dict[str, list[tuple[str, str]]]:
    """The check table as {what: [(status, detail), ...]}."""
    table = rows(ran.out)
    assert table[0] == ["CHECK", "STATUS", "DETAIL"]
    found: dict[str, list[tuple[str, str]]] = {}
    for row in table[1:]:
        found.setdefault(row[0], []).append((row[1], row[2] if len(row) > 2 else ""))
    return found


def test_check_on_the_defaults_is_all_ok(site: str) -> None:
    ran = mailhub("check", "--config", site)
    assert ran.code == 0, ran
    found = check_rows(ran)
    assert found["config"] == [("OK", os.path.abspath(site))]
    assert found["database"][0][0] == "OK"
    assert "not created yet" in found["database"][0][1]
    assert found["amqp"][0][0] == "-"
    assert found["carddav"][0][0] == "OK"
    assert found["ldap"][0][0] == "-"
    assert found["listen"] == [("OK", "tcp:8080:interface=127.0.0.1")]
    # check changes nothing: no database file was made.
    assert not (Path(site).parent / "data").exists()


def test_check_reports_the_schema_version_of_an_existing_database(site: str) -> None:
    mailhub("token", "create", "--config", site)
    found = check_rows(mailhub("check", "--config", site))
    assert found["database"][0][0] == "OK"
    newest = len(MIGRATIONS)
    assert "schema version %d of %d" % (newest, newest) in found["database"][0][1]


def test_check_with_postgresql_and_rabbitmq_reachable_exits_0(postgres_site: str,
                                                             tmp_path: Path) -> None:
    require_port("127.0.0.1", 5672, "RabbitMQ")
    dsn = load(postgres_site).database.dsn
    config = write_config(tmp_path / "prod.ini", mailhub={"data": str(tmp_path / "data")},
                          database={"dsn": dsn},
                          amqp={"url": "amqp://guest:guest@127.0.0.1:5672/%2F"})
    ran = mailhub("check", "--config", config)
    assert ran.code == 0, ran
    found = check_rows(ran)
    assert found["database"][0][0] == "OK"
    assert found["amqp"] == [("OK", "127.0.0.1:5672, virtual host /, logged in as guest")]
    assert found["amqp spec"][0][0] == "OK"


def test_check_with_unreachable_database_and_broker_exits_1(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "m.ini",
        database={"dsn": "postgresql://postgres:s3cret@127.0.0.1:%d/x" % free_port()},
        amqp={"url": "amqp://guest:guest@127.0.0.1:%d/" % free_port()})
    ran = mailhub("check", "--config", config)
    assert ran.code == 1, ran
    found = check_rows(ran)
    assert found["database"][0][0] == "FAIL"
    assert "cannot connect" in found["database"][0][1]
    assert "s3cret" not in ran.out
    assert found["amqp"][0][0] == "FAIL"
    assert found["carddav"][0][0] == "OK"


def test_check_reports_a_refused_amqp_login_and_unknown_vhost(tmp_path: Path) -> None:
    require_port("127.0.0.1", 5672, "RabbitMQ")
    config = write_config(tmp_path / "m.ini", mailhub={"data": str(tmp_path)},
                          amqp={"url": "amqp://guest:wrong@127.0.0.1:5672/"})
    ran = mailhub("check", "--config", config)
    assert ran.code == 1
    assert "ACCESS_REFUSED" in check_rows(ran)["amqp"][0][1]
    config = write_config(tmp_path / "m.ini", mailhub={"data": str(tmp_path)},
                          amqp={"url": "amqp://guest:guest@127.0.0.1:5672/no-such-vhost"})
    ran = mailhub("check", "--config", config)
    assert ran.code == 1
    assert "refused the virtual host no-such-vhost" in check_rows(ran)["amqp"][0][1]


def test_check_names_the_broker_it_cannot_reach(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "m.ini", mailhub={"data": str(tmp_path)},
                          amqp={"url": "amqp://guest:s3cret@127.0.0.1:%d/" % port})
    ran = mailhub("check", "--config", config)
    assert ran.code == 1
    [(status, detail)] = check_rows(ran)["amqp"]
    assert status == "FAIL"
    assert detail.startswith("127.0.0.1:%d: cannot connect: " % port), detail
    assert "s3cret" not in ran.out


def test_check_reports_a_missing_amqp_spec_file(tmp_path: Path) -> None:
    require_port("127.0.0.1", 5672, "RabbitMQ")
    config = write_config(tmp_path / "m.ini", mailhub={"data": str(tmp_path)},
                          amqp={"url": "amqp://guest:guest@127.0.0.1:5672/",
                                "spec": str(tmp_path / "missing.xml")})
    ran = mailhub("check", "--config", config)
    assert ran.code == 1
    found = check_rows(ran)
    assert found["amqp"][0][0] == "OK"
    assert found["amqp spec"][0][0] == "FAIL"


def test_check_reports_a_bad_listen_endpoint(tmp_path: Path) -> None:
    config = write_config(tmp_path / "m.ini",
                          mailhub={"data": str(tmp_path), "listen": "tcp:notaport"})
    ran = mailhub("check", "--config", config)
    assert ran.code == 1
    assert check_rows(ran)["listen"][0][0] == "FAIL"


@pytest.fixture
def radicale(tmp_path: Path) -> Iterator[str]:
    """A real Radicale on a free port with user ``svc``, password ``dav-secret``."""
    program = ROOT / ".venv" / "bin" / "radicale"
    if not program.exists():
        pytest.skip("Radicale is not installed in the venv")
    users = tmp_path / "htpasswd"
    users.write_text("svc:dav-secret\n")
    port = free_port()
    log = open(tmp_path / "radicale.log", "wb")
    process = subprocess.Popen(
        [str(program), "--server-hosts", "127.0.0.1:%d" % port,
         "--storage-filesystem-folder", str(tmp_path / "collections"),
         "--auth-type", "htpasswd", "--auth-htpasswd-filename", str(users),
         "--auth-htpasswd-encryption", "plain", "--auth-delay", "0"],
        stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("Radicale did not start: %s"
                                       % (tmp_path / "radicale.log").read_text())
                time.sleep(0.05)
        yield "http://127.0.0.1:%d/" % port
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def test_check_external_carddav_with_good_and_bad_credentials(radicale: str,
                                                             tmp_path: Path) -> None:
    good = write_config(tmp_path / "good.ini", mailhub={"data": str(tmp_path)},
                        carddav={"url": radicale, "username": "svc", "password": "dav-secret"})
    ran = mailhub("check", "--config", good)
    assert ran.code == 0, ran
    assert check_rows(ran)["carddav"] == [("OK", "%s answered PROPFIND with 207" % radicale)]
    bad = write_config(tmp_path / "bad.ini", mailhub={"data": str(tmp_path)},
                       carddav={"url": radicale, "username": "svc", "password": "wrong"})
    ran = mailhub("check", "--config", bad)
    assert ran.code == 1
    assert check_rows(ran)["carddav"] == [("FAIL", "%s refused svc (401)" % radicale)]
    assert "wrong" not in ran.out


def test_check_unreachable_carddav_fails(tmp_path: Path) -> None:
    config = write_config(tmp_path / "m.ini", mailhub={"data": str(tmp_path)},
                          carddav={"url": "http://127.0.0.1:%d/dav/" % free_port()})
    ran = mailhub("check", "--config", config)
    assert ran.code == 1
    assert "cannot connect" in check_rows(ran)["carddav"][0][1]


def test_check_ldap_binds_to_each_server(tmp_path: Path) -> None:
    from tests.support.slapd import BASE_DN, READER_DN, READER_PASSWORD, Slapd

    with Slapd(tmp_path / "slapd", users=0) as ldap:
        dead = "ldap://127.0.0.1:%d" % free_port()
        good = write_config(tmp_path / "good.ini", mailhub={"data": str(tmp_path)},
                            ldap={"url": ldap.url, "bind_dn": READER_DN,
                                  "bind_password": READER_PASSWORD, "base_dn": BASE_DN})
        ran = mailhub("check", "--config", good)
        assert ran.code == 0, ran
        assert check_rows(ran)["ldap"] == [
            ("OK", "%s: bound as %s, base DN %s found" % (ldap.url, READER_DN, BASE_DN))]
        failover = write_config(tmp_path / "two.ini", mailhub={"data": str(tmp_path)},
                                ldap={"url": "%s %s" % (ldap.url, dead), "bind_dn": READER_DN,
                                      "bind_password": READER_PASSWORD, "base_dn": BASE_DN})
        ran = mailhub("check", "--config", failover)
        assert ran.code == 1
        assert [status for status, _ in check_rows(ran)["ldap"]] == ["OK", "FAIL"]
        wrong = write_config(tmp_path / "wrong.ini", mailhub={"data": str(tmp_path)},
                             ldap={"url": ldap.url, "bind_dn": READER_DN,
                                   "bind_password": "not-it", "base_dn": BASE_DN})
        ran = mailhub("check", "--config", wrong)
        assert ran.code == 1
        assert "invalidCredentials" in check_rows(ran)["ldap"][0][1]
        assert "not-it" not in ran.out


# -- the real command -------------------------------------------------------------


def test_python_m_mailhub_runs_the_command(site: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "mailhub", "token", "create", "--config", site],
                          capture_output=True, text=True, timeout=60, env=env, cwd=str(ROOT))
    assert done.returncode == 0, done.stderr
    assert TOKEN.match(done.stdout.splitlines()[1])
    assert stored_token(site) == done.stdout.splitlines()[1]
    done = subprocess.run([sys.executable, "-m", "mailhub.cli", "token", "create", "mysql://x",
                           "--config", site], capture_output=True, text=True, timeout=60,
                          env=env, cwd=str(ROOT))
    assert done.returncode == 1
    assert "bad DSN" in done.stderr


def test_installed_console_script_when_present(site: str) -> None:
    script = Path(sys.executable).parent / "mailhub"
    if not script.exists():
        pytest.skip("the mailhub console script is not installed (pip install -e .)")
    done = subprocess.run([str(script), "token", "create", "--config", site],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == cli.TOKEN_CHANGED
