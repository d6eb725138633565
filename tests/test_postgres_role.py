"""The PostgreSQL role doc/operations.rst creates is all mailhub needs.

issue 15: the manual's step 2 (role and database) is run here as written,
with unique names, on the real PostgreSQL at 127.0.0.1:5432; then the
``mailhub`` command migrates the schema and a real ``twistd mailhub`` answers
a hook through that role only, its DSN given as ``env:`` and its password
through ``PGPASSWORD``. (The test server trusts local connections, so the
password itself is not what is proved; the privileges are.)
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support.postgres import SERVER, _admin
from tests.support.process import Mailhub

OPERATIONS = Path(__file__).resolve().parent.parent / "doc" / "operations.rst"
MAILHUB = str(Path(sys.executable).with_name("mailhub"))


def documented_sql() -> list[str]:
    """The statements of the manual's ``psql <<'SQL' ... SQL`` block."""
    lines = OPERATIONS.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().endswith("<<'SQL'"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == "SQL")
    return [line.strip() for line in lines[start + 1:end] if line.strip()]


@pytest.fixture
def role() -> Iterator[tuple[str, str]]:
    """(name, password) of a role and database made by the manual's statements."""
    admin: Any = _admin()
    name = "mailhub_role_" + secrets.token_hex(5)
    password = secrets.token_hex(8)
    try:
        for statement in documented_sql():
            admin.execute(re.sub(r"\bmailhub\b", name, statement).replace("change-me", password))
        yield name, password
    finally:
        admin.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)
        admin.execute('DROP ROLE IF EXISTS "%s"' % name)
        admin.close()


def test_the_manual_creates_an_unprivileged_role_owning_its_database(role: tuple[str, str]) -> None:
    assert documented_sql() == [
        "CREATE ROLE mailhub LOGIN PASSWORD 'change-me';",
        "CREATE DATABASE mailhub OWNER mailhub;",
        "REVOKE ALL ON DATABASE mailhub FROM PUBLIC;",
    ]
    name, _ = role
    admin: Any = _admin()
    try:
        flags = admin.execute("SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, "
                              "rolbypassrls, rolcanlogin FROM pg_roles WHERE rolname = %s",
                              (name,)).fetchone()
        memberships = admin.execute("SELECT count(*) FROM pg_auth_members m JOIN pg_roles r "
                                    "ON r.oid = m.member WHERE r.rolname = %s", (name,)).fetchone()
    finally:
        admin.close()
    assert flags == (False, False, False, False, False, True)
    assert memberships == (0,)


def test_migrations_the_command_and_a_hook_work_through_that_role(
        role: tuple[str, str], tmp_path: Path) -> None:
    name, password = role
    host = SERVER.split("@", 1)[1].rsplit("/", 1)[0]
    env = dict(os.environ, MAILHUB_TEST_DSN="postgresql://%s@%s/%s" % (name, host, name),
               PGPASSWORD=password)
    config = "[mailhub]\ndata = %s\n[database]\ndsn = env:MAILHUB_TEST_DSN\n" % (tmp_path / "data")
    (tmp_path / "mailhub.ini").write_text(config)

    def command(*argv: str) -> str:
        done = subprocess.run([MAILHUB, *argv, "--config", str(tmp_path / "mailhub.ini")],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    token = command("token", "create").splitlines()[1].split()[-1]
    command("group", "add", "example", "--name", "Example group")
    import psycopg

    with psycopg.connect(SERVER.rsplit("/", 1)[0] + "/" + name) as admin_in_db:
        owners = admin_in_db.execute("SELECT DISTINCT tableowner FROM pg_tables "
                                     "WHERE schemaname = 'public'").fetchall()
    assert owners == [(name,)]
    with Mailhub(tmp_path, config=config, env=env) as mailhub:
        status, body = mailhub.post_form("/gs-group-groups.json", "token=%s&get" % token)
    assert status == 200, body
    assert [group["id"] for group in body] == ["example"]


def test_without_owning_its_database_the_role_cannot_migrate(tmp_path: Path) -> None:
    """Ownership is the privilege that matters: CONNECT alone is refused, clearly."""
    admin: Any = _admin()
    if admin.info.server_version < 150000:
        admin.close()
        pytest.skip("before PostgreSQL 15 every role may create tables in public")
    name = "mailhub_role_" + secrets.token_hex(5)
    try:
        admin.execute('CREATE ROLE "%s" LOGIN' % name)
        admin.execute('CREATE DATABASE "%s"' % name)  # owned by the administrator
        (tmp_path / "mailhub.ini").write_text("[database]\ndsn = postgresql://%s@%s/%s\n" % (
            name, SERVER.split("@", 1)[1].rsplit("/", 1)[0], name))
        done = subprocess.run([MAILHUB, "token", "create", "--config", str(tmp_path / "mailhub.ini")],
                              capture_output=True, text=True, timeout=120)
    finally:
        admin.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)
        admin.execute('DROP ROLE IF EXISTS "%s"' % name)
        admin.close()
    assert done.returncode == 2
    assert "permission denied for schema public" in done.stderr
