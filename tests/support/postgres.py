"""Throwaway PostgreSQL databases on the server at 127.0.0.1:5432.

``with throwaway_database() as dsn:`` creates an empty database with a unique
name and drops it afterwards. Without a reachable server the test is skipped
(a failure under ``CI=true``: :mod:`tests.support.ci`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import Iterator

import pytest

SERVER = os.environ.get("MAILHUB_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin():  # type: ignore[no-untyped-def]
    import psycopg

    try:
        return psycopg.connect(SERVER, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        pytest.skip("PostgreSQL is not reachable at %s: %s"
                    % (SERVER, str(e).strip().splitlines()[0]))


@contextlib.contextmanager
def throwaway_database() -> Iterator[str]:
    """A DSN of a new, empty database, dropped on exit."""
    name = "mailhub_test_" + secrets.token_hex(6)
    admin = _admin()
    try:
        admin.execute('CREATE DATABASE "%s"' % name)
        yield SERVER.rsplit("/", 1)[0] + "/" + name
    finally:
        admin.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)
        admin.close()
