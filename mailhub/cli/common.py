"""What every verb of the ``mailhub`` command shares: exit codes, the
inline store, input checks and the table printer."""

from __future__ import annotations

import contextlib
import getpass
import os
import sqlite3
import sys
from typing import Any, Iterator, Sequence, TextIO
from urllib.parse import urlsplit

import attrs

from mailhub.config import CONFIG_VARIABLE, Config, redact
from mailhub.decoding import address_problem
from mailhub.directory.sql import (
    Dialect, SQLiteDialect, SQLStore, dialect_for, result_of, run_inline,
)
from mailhub.errors import ConfigError, Unavailable

#: Exit codes, as GroupServer's ``gs_auth_token_create`` uses them.
OK, BAD, UNREACHABLE = 0, 1, 2


class Exit(Exception):
    """Stop the command with ``code`` after saying ``message`` on stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@attrs.frozen
class IO:
    """Where the command reads and writes: the process's streams, or a test's."""

    stdin: TextIO
    stdout: TextIO
    stderr: TextIO


def checked_dialect(dsn: str) -> Dialect:
    """The backend of a DSN, or Exit(1) when the DSN is not a usable DSN.

    Beyond :func:`~mailhub.directory.sql.dialect_for` (scheme and sqlite
    form), a PostgreSQL DSN must parse as a libpq connection URI with a
    numeric port, so that "cannot connect" (2) only ever means the server.
    """
    try:
        dialect = dialect_for(dsn)
    except (ConfigError, ValueError):
        raise Exit(BAD, "bad DSN %s: expected sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
                   % redact(dsn))
    if dialect.name == "postgresql":
        import psycopg.conninfo

        try:
            urlsplit(dsn).port
            psycopg.conninfo.conninfo_to_dict(dsn)
        except (ValueError, psycopg.ProgrammingError) as e:
            raise Exit(BAD, "bad DSN %s: %s" % (redact(dsn), str(e).strip().splitlines()[0]))
    return dialect


def open_store(dsn: str, site_id: str, *, create: bool = True,
               note: TextIO | None = None) -> SQLStore:
    """A migrated store on ``dsn``, run inline; Exit(1) bad DSN, Exit(2) unreachable.

    ``create=False`` is for the verbs that only read (``list``, ``show``): a
    SQLite file that does not exist is not made (nor its folder); the verb
    reads an empty in-memory store instead, and ``note`` is told that no
    database exists at that path, so an empty listing cannot pass for one
    read from a database the administrator did not mean.
    """
    dialect = checked_dialect(dsn)
    if not create and isinstance(dialect, SQLiteDialect) and dialect.path != ":memory:" \
            and not os.path.exists(dialect.path):
        if note is not None:
            note.write("mailhub: no database at %s yet: nothing was stored with this "
                       "configuration (another one: --config FILE or %s)\n"
                       % (os.path.abspath(dialect.path), CONFIG_VARIABLE))
        dialect = SQLiteDialect(":memory:")
    store = SQLStore(dialect, site_id, runner=run_inline)
    try:
        result_of(store.migrate())
    except Unavailable as e:
        store.close_all()
        raise Exit(UNREACHABLE, "cannot connect to the database %s: %s" % (redact(dsn), e))
    except OSError as e:  # the sqlite folder cannot be made
        store.close_all()
        raise Exit(UNREACHABLE, "cannot open the database %s: %s" % (redact(dsn), e.strerror or e))
    except BaseException:
        # E.g. a role without rights (reported by the caller): the connection
        # must not be left open for the garbage collector.
        store.close_all()
        raise
    return store


@contextlib.contextmanager
def stored(config: Config, *, create: bool = True,
           note: TextIO | None = None) -> Iterator[SQLStore]:
    """``with stored(config) as store``: the migrated store, its connection closed afterwards.

    ``create=False`` (and ``note``) for verbs that only read: see :func:`open_store`.
    """
    store = open_store(config.dsn, config.mailhub.site_id, create=create, note=note)
    try:
        yield store
    finally:
        store.close_all()


def note_configuration(config: Config, args: Any, out: TextIO) -> None:
    """Say on ``out`` which configuration and database a verb uses, when the
    administrator did not name them (no ``--config``, no DSN argument)."""
    if config.origin == "--config" or getattr(args, "dsn", None):
        return
    out.write("mailhub: configuration: %s; database: %s\n" % (config.source, redact(config.dsn)))


def read_password(stdin: TextIO, stderr: TextIO) -> str:
    """One password from stdin: a line (without its newline), or, on a terminal, typed twice."""
    if stdin.isatty():
        first = getpass.getpass("Password: ", stream=stderr)
        if getpass.getpass("Again: ", stream=stderr) != first:
            raise Exit(BAD, "the passwords do not match")
        password = first
    else:
        password = stdin.readline().rstrip("\r\n")
    if not password:
        raise Exit(BAD, "the password must not be empty (give it on stdin)")
    return password


def email_address(value: str) -> str:
    """A single plain address (``local@domain``), or Exit(1) saying why not."""
    address = value.strip()
    problem = address_problem(address)
    if problem is not None:
        raise Exit(BAD, "%r %s" % (value, problem))
    return address


def table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Print rows as columns padded to their widest cell (the first row is the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        out.write("  ".join(cells).rstrip() + "\n")


def database_errors() -> tuple[type[BaseException], ...]:
    """The DB-API error classes of the drivers loaded so far."""
    errors: list[type[BaseException]] = [sqlite3.Error]
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None:
        errors.append(psycopg.Error)
    return tuple(errors)
