"""The directory store on SQLite (the default) and PostgreSQL (production).

One implementation of :class:`IDirectoryStore` over DB-API: the two backends
differ only in how they connect, their placeholders and a few DDL words. The
blocking driver calls run in a thread pool owned by :class:`StoreService`
(each worker thread keeps its own connection); the unit tests run the same
code inline on an in-memory SQLite database (:mod:`mailhub.directory.memory`).

Every write appends to the ``changes`` log in the same transaction; on
PostgreSQL writers take a transaction-scoped advisory lock first, so change
numbers are committed in order and a poller that has seen number N has seen
every change before it.
"""

from __future__ import annotations

import datetime
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar
from urllib.parse import urlsplit

import attrs

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailhub.directory.interfaces import IDirectoryStore
from mailhub.directory.model import Email, Group, Profile, normalise_email
from mailhub.directory.table import Loader, ProfileTable
from mailhub.directory.tokens import SITE, TokenRecord
from mailhub.config import redact, sqlite_path
from mailhub.errors import ConfigError, Unavailable, ValidationError

T = TypeVar("T")

#: Advisory lock key that serialises writers of the change log (PostgreSQL).
CHANGE_LOCK = 7_305_100

#: Rows turned into Python objects per call when a query's answer is read.
FETCH_BATCH = 2000

#: The channel on which PostgreSQL writers announce a change (LISTEN/NOTIFY).
CHANNEL = "mailhub_changes"

#: A migration's statement that starts with this runs on PostgreSQL only.
ONLY_POSTGRESQL = "postgresql only: "

# Each migration is a list of statements; ``{serial}``, ``{bool}`` and
# ``{real}`` are filled in per dialect. Append, never edit, once released.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE sites (
            id TEXT PRIMARY KEY,
            token TEXT,
            token_changed TEXT
        )""",
        """CREATE TABLE profiles (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            nickname TEXT UNIQUE,
            password_hash TEXT,
            created TEXT NOT NULL
        )""",
        """CREATE TABLE emails (
            address_key TEXT PRIMARY KEY,
            address TEXT NOT NULL,
            profile_id TEXT NOT NULL REFERENCES profiles(id) ON DELETE CASCADE,
            verified {bool} NOT NULL,
            preferred {bool} NOT NULL,
            position INTEGER NOT NULL
        )""",
        "CREATE INDEX emails_profile ON emails (profile_id)",
        """CREATE TABLE groups_ (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            email TEXT NOT NULL,
            type TEXT NOT NULL,
            privacy TEXT NOT NULL
        )""",
        """CREATE TABLE memberships (
            group_id TEXT NOT NULL REFERENCES groups_(id) ON DELETE CASCADE,
            profile_id TEXT NOT NULL REFERENCES profiles(id) ON DELETE CASCADE,
            PRIMARY KEY (group_id, profile_id)
        )""",
        "CREATE INDEX memberships_profile ON memberships (profile_id)",
        """CREATE TABLE audit (
            id {serial} PRIMARY KEY,
            at TEXT NOT NULL,
            event TEXT NOT NULL,
            client TEXT NOT NULL,
            detail TEXT NOT NULL
        )""",
        """CREATE TABLE changes (
            seq {serial} PRIMARY KEY,
            kind TEXT NOT NULL,
            key TEXT NOT NULL,
            at TEXT NOT NULL
        )""",
    ],
    [
        # Version 2: an overlap for the site token, and named, scoped tokens.
        "ALTER TABLE sites ADD COLUMN previous_token TEXT",
        "ALTER TABLE sites ADD COLUMN previous_until {real}",
        """CREATE TABLE tokens (
            site TEXT NOT NULL,
            name TEXT NOT NULL,
            token TEXT NOT NULL,
            scopes TEXT NOT NULL,
            created TEXT NOT NULL,
            rotated TEXT NOT NULL,
            previous_token TEXT,
            previous_until {real},
            PRIMARY KEY (site, name)
        )""",
    ],
    [
        # Version 3 (collector-forget): per-user collector state shared by
        # every instance: the switch (collect, and whether the collected book
        # was seen, so its deletion reads as an opt-out), the addresses the
        # user deleted (tombstones; by = 'user') or mailhub removed itself
        # (by = 'mailhub': not a user's deletion), and the block list.
        """CREATE TABLE collector_users (
            login TEXT PRIMARY KEY,
            collect {bool} NOT NULL,
            book_seen {bool} NOT NULL,
            reason TEXT NOT NULL,
            changed TEXT NOT NULL
        )""",
        """CREATE TABLE collector_tombstones (
            login TEXT NOT NULL,
            address_key TEXT NOT NULL,
            at {real} NOT NULL,
            by_whom TEXT NOT NULL,
            PRIMARY KEY (login, address_key)
        )""",
        """CREATE TABLE collector_blocks (
            login TEXT NOT NULL,
            entry TEXT NOT NULL,
            PRIMARY KEY (login, entry)
        )""",
    ],
    [
        # Version 4 (scale-out): the failure throttle shared by the instances.
        # Each row is one instance's batch for one (login, client): a reset
        # (a success after failures) and/or failures. Rows older than the
        # throttle's memory are pruned (mailhub.shared_throttle).
        """CREATE TABLE throttle_events (
            seq {serial} PRIMARY KEY,
            instance TEXT NOT NULL,
            at {real} NOT NULL,
            login TEXT NOT NULL,
            client TEXT NOT NULL,
            failures INTEGER NOT NULL,
            succeeded {bool} NOT NULL
        )""",
        "CREATE INDEX throttle_events_at ON throttle_events (at)",
    ],
    [
        # Version 5: the member lists read from the database while the
        # in-memory directory loads, page after page in byte order (the
        # directory's order). SQLite compares bytes already, with the index
        # above; PostgreSQL needs an index in the "C" collation for it.
        ONLY_POSTGRESQL + 'CREATE INDEX memberships_profile_bytes ON memberships '
        '(profile_id COLLATE "C")',
    ],
]


@attrs.frozen
class CollectorRow:
    """One user's collector state as the database holds it.

    ``tombstones``: address key -> (seconds since the epoch, ``user`` or
    ``mailhub``); ``blocks``: the block list's entries.
    """

    collect: bool = True
    book_seen: bool = False
    reason: str = ""
    tombstones: dict[str, tuple[float, str]] = attrs.Factory(dict)
    blocks: list[str] = attrs.Factory(list)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class Dialect:
    """What differs between the backends."""

    name = "sqlite"
    serial = "INTEGER"
    boolean = "INTEGER"
    real = "REAL"
    #: Added to a text column to compare and order it by its bytes (UTF-8:
    #: by code point), as the in-memory directory does.
    in_bytes = ""
    unavailable: tuple[type[BaseException], ...] = (sqlite3.OperationalError,)
    integrity: tuple[type[BaseException], ...] = (sqlite3.IntegrityError,)

    def sql(self, statement: str) -> str:
        return statement

    def connect(self) -> Any:
        raise NotImplementedError

    def begin_write(self, cursor: Any) -> None:
        """Serialise writers (SQLite has one writer anyway)."""


class SQLiteDialect(Dialect):
    def __init__(self, path: str) -> None:
        self.path = path

    def connect(self) -> Any:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA foreign_keys = ON")
        if self.path != ":memory:":
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def begin_write(self, cursor: Any) -> None:
        cursor.execute("BEGIN IMMEDIATE")


class PostgreSQLDialect(Dialect):
    name = "postgresql"
    serial = "BIGSERIAL"
    boolean = "BOOLEAN"
    real = "DOUBLE PRECISION"
    in_bytes = ' COLLATE "C"'

    def __init__(self, dsn: str) -> None:
        import psycopg

        self.dsn = dsn
        self._psycopg = psycopg
        self.unavailable = (psycopg.OperationalError, psycopg.InterfaceError)
        self.integrity = (psycopg.IntegrityError,)

    def sql(self, statement: str) -> str:
        return statement.replace("?", "%s")

    def connect(self) -> Any:
        return self._psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)

    def begin_write(self, cursor: Any) -> None:
        cursor.execute("BEGIN")
        cursor.execute("SELECT pg_advisory_xact_lock(%s)" % CHANGE_LOCK)


def dialect_for(dsn: str) -> Dialect:
    """The backend a DSN names; ConfigError for anything else."""
    try:
        parts = urlsplit(dsn)
    except ValueError as e:
        raise ConfigError("%s: not a DSN: %s" % (redact(dsn), e))
    if parts.scheme == "sqlite":
        try:
            return SQLiteDialect(sqlite_path(dsn))
        except ValueError as e:
            raise ConfigError("%s: %s" % (redact(dsn), e))
    if parts.scheme in ("postgresql", "postgres"):
        return PostgreSQLDialect(dsn)
    raise ConfigError("%s: expected sqlite:///PATH or postgresql://..." % redact(dsn))


Runner = Callable[[Callable[[], T]], "Deferred[T]"]


def run_inline(work: Callable[[], T]) -> "Deferred[T]":
    """Run ``work`` at once on this thread: for tests and the CLI."""
    return maybeDeferred(work)


def result_of(d: "Deferred[T]") -> T:
    """The result of a Deferred that has already fired (a store that runs
    inline: the CLI, the directory's build process).

    A failure is raised again as its exception, so callers use plain
    try/except.
    """
    box: list[Any] = []
    d.addBoth(box.append)
    if not box:
        raise RuntimeError("the store answered asynchronously; it runs inline here")
    result = box[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result  # type: ignore[no-any-return]


class _Transaction:
    """A cursor inside one transaction, with the dialect's placeholders."""

    def __init__(self, dialect: Dialect, cursor: Any) -> None:
        self.dialect = dialect
        self.cursor = cursor

    def execute(self, statement: str, params: Sequence[Any] = ()) -> Any:
        self.cursor.execute(self.dialect.sql(statement), tuple(params))
        return self.cursor

    def all(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        # In batches: psycopg's C extension turns a whole result into rows
        # in one call that holds the GIL, and a million rows would hold the
        # reactor thread for as long; between batches it can run.
        cursor = self.execute(statement, params)
        rows: list[tuple[Any, ...]] = []
        while batch := cursor.fetchmany(FETCH_BATCH):
            rows.extend(batch)
        return rows

    def one(self, statement: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        row = self.execute(statement, params).fetchone()
        return tuple(row) if row is not None else None

    def rows(self, statement: str, params: Sequence[Any] = ()) -> Iterator[tuple[Any, ...]]:
        """The rows of a query on a cursor of its own (several may be read
        side by side in the transaction), turned into Python rows a batch at
        a time: nothing holds the whole answer."""
        cursor = self.cursor.connection.cursor()
        try:
            cursor.execute(self.dialect.sql(statement), tuple(params))
            while batch := cursor.fetchmany(FETCH_BATCH):
                yield from batch
        finally:
            cursor.close()

    def changed(self, kind: str, key: str) -> None:
        """Log a change; on PostgreSQL also tell every listening instance.

        The notification is delivered when the transaction commits (never
        before, never for a rollback); PostgreSQL folds repeats of the same
        empty notification in one transaction into one.
        """
        self.execute("INSERT INTO changes (kind, key, at) VALUES (?, ?, ?)", (kind, key, now()))
        if self.dialect.name == "postgresql":
            self.execute("NOTIFY %s" % CHANNEL)


@implementer(IDirectoryStore)
class SQLStore:
    """The directory in a SQL database; every method returns a Deferred."""

    log = Logger()

    def __init__(self, dialect: Dialect, site_id: str = "main",
                 runner: Runner[Any] = run_inline) -> None:
        self.dialect = dialect
        self.site_id = site_id
        self._run = runner
        self._local = threading.local()
        self._connections: list[Any] = []
        self._lock = threading.Lock()

    # -- plumbing -----------------------------------------------------------

    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = self.dialect.connect()
            except self.dialect.unavailable as e:
                raise Unavailable("database unreachable: %s" % _first_line(e))
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _forget_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._lock:
                if conn in self._connections:
                    self._connections.remove(conn)
            try:
                conn.close()
            except Exception:
                pass

    def _transact(self, work: Callable[[_Transaction], T], write: bool = False) -> T:
        """Run ``work`` in one transaction, in the calling (worker) thread."""
        conn = self._connection()
        cursor = conn.cursor()
        tx = _Transaction(self.dialect, cursor)
        try:
            if write:
                self.dialect.begin_write(cursor)
            else:
                cursor.execute("BEGIN")
            result = work(tx)
            cursor.execute("COMMIT")
            return result
        except self.dialect.unavailable as e:
            self._rollback(cursor)
            if self.dialect.name == "postgresql":
                self._forget_connection()
            raise Unavailable("database unavailable: %s" % _first_line(e))
        except BaseException:
            self._rollback(cursor)
            raise
        finally:
            try:
                cursor.close()
            except Exception:
                pass

    def _rollback(self, cursor: Any) -> None:
        try:
            cursor.execute("ROLLBACK")
        except Exception:
            pass

    def _read(self, work: Callable[[_Transaction], T]) -> "Deferred[T]":
        return self._run(lambda: self._transact(work))

    def _write(self, work: Callable[[_Transaction], T]) -> "Deferred[T]":
        return self._run(lambda: self._transact(work, write=True))

    def close_all(self) -> None:
        """Close every connection the worker threads opened."""
        with self._lock:
            conns, self._connections = self._connections, []
        for conn in conns:
            try:
                conn.close()
            except Exception:
                pass
        self._local = threading.local()

    # -- schema -------------------------------------------------------------

    def migrate(self) -> "Deferred[int]":
        """Bring the schema to the newest version; the version number reached."""
        return self._run(self._migrate)

    def _migrate(self) -> int:
        def work(tx: _Transaction) -> int:
            tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = tx.one("SELECT version FROM schema_version")
            version = row[0] if row else 0
            if row is None:
                tx.execute("INSERT INTO schema_version (version) VALUES (0)")
            for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in statements:
                    if statement.startswith(ONLY_POSTGRESQL):
                        if self.dialect.name != "postgresql":
                            continue
                        statement = statement[len(ONLY_POSTGRESQL):]
                    tx.execute(statement.format(serial=self.dialect.serial,
                                                bool=self.dialect.boolean,
                                                real=self.dialect.real))
                tx.execute("UPDATE schema_version SET version = ?", (number,))
                self.log.info("database schema migrated to version {version}", version=number)
            tx.execute("INSERT INTO sites (id) VALUES (?) ON CONFLICT (id) DO NOTHING",
                       (self.site_id,))
            return len(MIGRATIONS)

        return self._transact(work, write=True)

    def ping(self) -> "Deferred[bool]":
        return self._read(lambda tx: tx.one("SELECT 1") is not None)

    def schema_version(self) -> "Deferred[int]":
        """The schema version the database holds (0 before the first
        migration), changing nothing: for the health checks."""
        def work(tx: _Transaction) -> int:
            if self.dialect.name == "postgresql":
                found = tx.one("SELECT to_regclass('schema_version') IS NOT NULL")
            else:
                found = tx.one("SELECT count(*) > 0 FROM sqlite_master "
                               "WHERE type = 'table' AND name = 'schema_version'")
            if not (found and found[0]):
                return 0
            row = tx.one("SELECT version FROM schema_version")
            return int(row[0]) if row else 0

        return self._read(work)

    # -- token and audit ----------------------------------------------------

    def get_token(self) -> "Deferred[str | None]":
        def work(tx: _Transaction) -> str | None:
            row = tx.one("SELECT token FROM sites WHERE id = ?", (self.site_id,))
            return row[0] if row else None
        return self._read(work)

    def set_token(self, token: str | None,
                  previous_until: float | None = None) -> "Deferred[None]":
        """Replace the site token; with ``previous_until`` (seconds since the
        epoch) the one it replaces stays valid until then."""
        def work(tx: _Transaction) -> None:
            old = tx.one("SELECT token FROM sites WHERE id = ?", (self.site_id,))
            previous = old[0] if old and previous_until is not None else None
            until = previous_until if previous is not None else None
            tx.execute("INSERT INTO sites (id, token, token_changed, previous_token, "
                       "previous_until) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT (id) DO UPDATE SET token = excluded.token, "
                       "token_changed = excluded.token_changed, "
                       "previous_token = excluded.previous_token, "
                       "previous_until = excluded.previous_until",
                       (self.site_id, token, now(), previous, until))
            tx.changed("token", self.site_id)
        return self._write(work)

    def load_tokens(self) -> "Deferred[list[TokenRecord]]":
        """The site token (first, even when unset) and every named token."""
        def work(tx: _Transaction) -> list[TokenRecord]:
            row = tx.one("SELECT token, token_changed, previous_token, previous_until "
                         "FROM sites WHERE id = ?", (self.site_id,))
            site = TokenRecord(SITE, None)
            if row is not None:
                site = TokenRecord(SITE, row[0], None, "", row[1] or "", row[2],
                                   None if row[3] is None else float(row[3]))
            named = [TokenRecord(r[0], r[1], frozenset(r[2].split()), r[3], r[4], r[5],
                                 None if r[6] is None else float(r[6]))
                     for r in tx.all("SELECT name, token, scopes, created, rotated, "
                                     "previous_token, previous_until FROM tokens "
                                     "WHERE site = ? ORDER BY name", (self.site_id,))]
            return [site] + named
        return self._read(work)

    def set_named_token(self, name: str, token: str, scopes: frozenset[str] | None = None,
                        previous_until: float | None = None) -> "Deferred[bool]":
        """Create the named token ``name`` or rotate it; True if it is new.

        A new token needs ``scopes``; a rotation keeps its scopes unless
        given. With ``previous_until`` the secret it replaces stays valid
        until then (seconds since the epoch).
        """
        def work(tx: _Transaction) -> bool:
            old = tx.one("SELECT token, scopes FROM tokens WHERE site = ? AND name = ?",
                         (self.site_id, name))
            stamp = now()
            if old is None:
                if not scopes:
                    raise ValidationError("a new named token needs at least one hook")
                tx.execute("INSERT INTO tokens (site, name, token, scopes, created, rotated) "
                           "VALUES (?, ?, ?, ?, ?, ?)",
                           (self.site_id, name, token, " ".join(sorted(scopes)), stamp, stamp))
            else:
                kept = " ".join(sorted(scopes)) if scopes else old[1]
                previous = old[0] if previous_until is not None else None
                until = previous_until if previous is not None else None
                tx.execute("UPDATE tokens SET token = ?, scopes = ?, rotated = ?, "
                           "previous_token = ?, previous_until = ? WHERE site = ? AND name = ?",
                           (token, kept, stamp, previous, until, self.site_id, name))
            tx.changed("token", "%s/%s" % (self.site_id, name))
            return old is None
        return self._write(work)

    def revoke_token(self, name: str) -> "Deferred[bool]":
        """Delete the named token ``name`` (its previous secret too); True if it existed."""
        def work(tx: _Transaction) -> bool:
            gone = tx.execute("DELETE FROM tokens WHERE site = ? AND name = ?",
                              (self.site_id, name)).rowcount > 0
            if gone:
                tx.changed("token", "%s/%s" % (self.site_id, name))
            return gone
        return self._write(work)

    def audit(self, event: str, client: str, detail: str = "") -> "Deferred[None]":
        def work(tx: _Transaction) -> None:
            tx.execute("INSERT INTO audit (at, event, client, detail) VALUES (?, ?, ?, ?)",
                       (now(), event, client, detail))
        return self._write(work)

    def audit_log(self, limit: int = 100) -> "Deferred[list[dict[str, str]]]":
        def work(tx: _Transaction) -> list[dict[str, str]]:
            rows = tx.all("SELECT at, event, client, detail FROM audit "
                          "ORDER BY id DESC LIMIT ?", (limit,))
            return [dict(zip(("at", "event", "client", "detail"), r)) for r in rows]
        return self._read(work)

    # -- profiles -----------------------------------------------------------

    def _profiles(self, tx: _Transaction, where: str = "", params: Sequence[Any] = ()) -> list[Profile]:
        rows = tx.all("SELECT id, name, nickname, password_hash IS NOT NULL FROM profiles "
                      + where + " ORDER BY id", params)
        if not rows:
            return []
        ids = [r[0] for r in rows]
        emails: dict[str, list[Email]] = {i: [] for i in ids}
        groups: dict[str, list[str]] = {i: [] for i in ids}
        if where:
            marks = ",".join("?" * len(ids))
            email_rows = tx.all("SELECT profile_id, address, verified, preferred FROM emails "
                                "WHERE profile_id IN (%s) ORDER BY profile_id, position" % marks, ids)
            group_rows = tx.all("SELECT profile_id, group_id FROM memberships "
                                "WHERE profile_id IN (%s) ORDER BY group_id" % marks, ids)
        else:
            email_rows = tx.all("SELECT profile_id, address, verified, preferred FROM emails "
                                "ORDER BY profile_id, position")
            group_rows = tx.all("SELECT profile_id, group_id FROM memberships ORDER BY group_id")
        for pid, address, verified, preferred in email_rows:
            emails[pid].append(Email(address, bool(verified), bool(preferred)))
        for pid, gid in group_rows:
            groups[pid].append(gid)
        return [Profile(id=r[0], name=r[1], nickname=r[2], emails=tuple(emails[r[0]]),
                        groups=tuple(groups[r[0]]), has_password=bool(r[3])) for r in rows]

    def load_profiles(self) -> "Deferred[list[Profile]]":
        return self._read(self._all_profiles)

    def load_table(self) -> "Deferred[ProfileTable]":
        return self._read(self._load_table)

    def _load_table(self, tx: _Transaction) -> ProfileTable:
        """Every profile, straight from the rows into the compact table.

        Each table is read in the order it is stored in (asking SQLite for
        the profiles by id walks the index, a random read per row: 1.9 s
        of 8 for a million) and joined here by profile id; no Profile object
        is made. The addresses come with their state as the record's digit,
        made by the database.
        """
        emails: dict[str, list[tuple[int, str]]] = {}
        for pid, flagged, position in tx.rows(
                "SELECT profile_id, CASE WHEN verified THEN (CASE WHEN preferred THEN '3' "
                "ELSE '1' END) ELSE (CASE WHEN preferred THEN '2' ELSE '0' END) END "
                "|| address, position FROM emails"):
            held = emails.get(pid)
            if held is None:
                emails[pid] = [(position, flagged)]
            else:
                held.append((position, flagged))
        groups: dict[str, list[str]] = {}
        for pid, gid in tx.rows("SELECT profile_id, group_id FROM memberships"):
            known = groups.get(pid)
            if known is None:
                groups[pid] = [gid]
            else:
                known.append(gid)
        loader = Loader()
        nothing: list[Any] = []
        for pid, name, nickname, has_password in tx.rows(
                "SELECT id, name, nickname, password_hash IS NOT NULL FROM profiles"):
            mine = emails.pop(pid, nothing)
            if len(mine) > 1:
                mine.sort()
            member_of = groups.pop(pid, nothing)
            if len(member_of) > 1:
                member_of.sort()
            loader.add(pid, name, nickname, bool(has_password),
                       [flagged for _, flagged in mine], member_of)
        return loader.table()

    def _all_profiles(self, tx: _Transaction) -> list[Profile]:
        """Every profile, as :meth:`_profiles` makes them, from three answers
        in the same order (the profile's id) read side by side.

        No list of a million rows or dict of a million lists is made on the
        way: freeing such a container at the end is one call that holds the
        GIL, and the reactor waited half a second for it (bench/stall).
        Every address and membership has its profile (foreign keys), so each
        answer's rows for a profile follow one another as the profiles do;
        ids are compared for equality only, so the database's collation
        decides the order alone.
        """
        emails = tx.rows("SELECT profile_id, address, verified, preferred FROM emails "
                         "ORDER BY profile_id, position")
        groups = tx.rows("SELECT profile_id, group_id FROM memberships "
                         "ORDER BY profile_id, group_id")
        email = next(emails, None)
        group = next(groups, None)
        found: list[Profile] = []
        for pid, name, nickname, has_password in tx.rows(
                "SELECT id, name, nickname, password_hash IS NOT NULL FROM profiles ORDER BY id"):
            addresses = []
            while email is not None and email[0] == pid:
                addresses.append(Email(email[1], bool(email[2]), bool(email[3])))
                email = next(emails, None)
            member_of = []
            while group is not None and group[0] == pid:
                member_of.append(group[1])
                group = next(groups, None)
            found.append(Profile(id=pid, name=name, nickname=nickname, emails=tuple(addresses),
                                 groups=tuple(member_of), has_password=bool(has_password)))
        return found

    def _member_ids(self, tx: _Transaction, after: str, limit: int) -> list[str]:
        column = "profile_id" + self.dialect.in_bytes
        return [r[0] for r in tx.all(
            "SELECT DISTINCT %s FROM memberships WHERE %s > ? ORDER BY 1 LIMIT ?"
            % (column, column), (after, limit))]

    def member_ids(self, after: str, limit: int) -> "Deferred[list[str]]":
        return self._read(lambda tx: self._member_ids(tx, after, limit))

    def members(self, after: str, limit: int) -> "Deferred[list[Profile]]":
        def work(tx: _Transaction) -> list[Profile]:
            ids = self._member_ids(tx, after, limit)
            if not ids:
                return []
            found = {p.id: p for p in self._profiles(
                tx, "WHERE id IN (%s)" % ",".join("?" * len(ids)), ids)}
            # A profile removed between the two reads is left out.
            return [found[i] for i in ids if i in found]
        return self._read(work)

    def mark(self, seq: int) -> "Deferred[tuple[str, str | None, int]]":
        def work(tx: _Transaction) -> tuple[str, str | None, int]:
            logged = tx.one("SELECT at FROM changes WHERE seq = ?", (seq,))
            counted = tx.one("SELECT count(*) FROM profiles")
            where = getattr(self.dialect, "path", None) or redact(
                getattr(self.dialect, "dsn", ""))
            identity = "%s %s site=%s" % (self.dialect.name, where, self.site_id)
            return (identity, str(logged[0]) if logged else None,
                    int(counted[0]) if counted else 0)
        return self._read(work)

    def get_profile(self, profile_id: str) -> "Deferred[Profile | None]":
        def work(tx: _Transaction) -> Profile | None:
            found = self._profiles(tx, "WHERE id = ?", (profile_id,))
            return found[0] if found else None
        return self._read(work)

    def find_profile(self, address: str) -> "Deferred[Profile | None]":
        def work(tx: _Transaction) -> Profile | None:
            found = self._profiles(
                tx, "WHERE id = (SELECT profile_id FROM emails WHERE address_key = ?)",
                (normalise_email(address),))
            return found[0] if found else None
        return self._read(work)

    def create_profile(self, profile: Profile) -> "Deferred[Profile]":
        def work(tx: _Transaction) -> Profile:
            if tx.one("SELECT 1 FROM profiles WHERE id = ?", (profile.id,)):
                raise ValidationError("profile %s exists already" % profile.id)
            if profile.nickname and tx.one("SELECT 1 FROM profiles WHERE nickname = ?",
                                           (profile.nickname,)):
                raise ValidationError("nickname %s is taken" % profile.nickname)
            tx.execute("INSERT INTO profiles (id, name, nickname, created) VALUES (?, ?, ?, ?)",
                       (profile.id, profile.name, profile.nickname, now()))
            for position, email in enumerate(profile.emails):
                self._insert_email(tx, profile.id, email, position)
            tx.changed("profile", profile.id)
            return profile
        return self._write(work)

    def _insert_email(self, tx: _Transaction, profile_id: str, email: Email, position: int) -> None:
        key = normalise_email(email.address)
        owner = tx.one("SELECT profile_id FROM emails WHERE address_key = ?", (key,))
        if owner is not None and owner[0] != profile_id:
            raise ValidationError("the address %s belongs to another profile" % email.address)
        if email.preferred:
            tx.execute("UPDATE emails SET preferred = ? WHERE profile_id = ?", (False, profile_id))
        tx.execute("INSERT INTO emails (address_key, address, profile_id, verified, preferred, position) "
                   "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (address_key) DO UPDATE SET "
                   "address = excluded.address, verified = excluded.verified, "
                   "preferred = excluded.preferred",
                   (key, email.address, profile_id, email.verified, email.preferred, position))

    def update_profile(self, profile_id: str, name: str, nickname: str | None) -> "Deferred[None]":
        def work(tx: _Transaction) -> None:
            tx.execute("UPDATE profiles SET name = ?, nickname = ? WHERE id = ?",
                       (name, nickname, profile_id))
            tx.changed("profile", profile_id)
        return self._write(work)

    def set_email(self, profile_id: str, email: Email) -> "Deferred[None]":
        def work(tx: _Transaction) -> None:
            if not tx.one("SELECT 1 FROM profiles WHERE id = ?", (profile_id,)):
                raise ValidationError("no profile %s" % profile_id)
            row = tx.one("SELECT COALESCE(MAX(position), -1) + 1 FROM emails WHERE profile_id = ?",
                         (profile_id,))
            self._insert_email(tx, profile_id, email, row[0] if row else 0)
            tx.changed("profile", profile_id)
        return self._write(work)

    def remove_profile(self, profile_id: str) -> "Deferred[bool]":
        def work(tx: _Transaction) -> bool:
            existed = tx.one("SELECT 1 FROM profiles WHERE id = ?", (profile_id,)) is not None
            tx.execute("DELETE FROM memberships WHERE profile_id = ?", (profile_id,))
            tx.execute("DELETE FROM emails WHERE profile_id = ?", (profile_id,))
            tx.execute("DELETE FROM profiles WHERE id = ?", (profile_id,))
            if existed:
                tx.changed("profile", profile_id)
            return existed
        return self._write(work)

    def set_password_hash(self, profile_id: str, password_hash: str | None) -> "Deferred[None]":
        def work(tx: _Transaction) -> None:
            if not tx.one("SELECT 1 FROM profiles WHERE id = ?", (profile_id,)):
                raise ValidationError("no profile %s" % profile_id)
            tx.execute("UPDATE profiles SET password_hash = ? WHERE id = ?",
                       (password_hash, profile_id))
            tx.changed("profile", profile_id)
        return self._write(work)

    def get_password_hash(self, profile_id: str) -> "Deferred[str | None]":
        def work(tx: _Transaction) -> str | None:
            row = tx.one("SELECT password_hash FROM profiles WHERE id = ?", (profile_id,))
            return row[0] if row else None
        return self._read(work)

    # -- groups and memberships ----------------------------------------------

    def load_groups(self) -> "Deferred[list[Group]]":
        def work(tx: _Transaction) -> list[Group]:
            return [Group(*row) for row in tx.all(
                "SELECT id, name, email, type, privacy FROM groups_ ORDER BY id")]
        return self._read(work)

    def create_group(self, group: Group) -> "Deferred[Group]":
        def work(tx: _Transaction) -> Group:
            if tx.one("SELECT 1 FROM groups_ WHERE id = ?", (group.id,)):
                raise ValidationError("the group %s exists already" % group.id)
            tx.execute("INSERT INTO groups_ (id, name, email, type, privacy) VALUES (?, ?, ?, ?, ?)",
                       (group.id, group.name, group.email, group.type, group.privacy))
            tx.changed("group", group.id)
            return group
        return self._write(work)

    def remove_group(self, group_id: str) -> "Deferred[bool]":
        def work(tx: _Transaction) -> bool:
            members = [r[0] for r in tx.all(
                "SELECT profile_id FROM memberships WHERE group_id = ?", (group_id,))]
            tx.execute("DELETE FROM memberships WHERE group_id = ?", (group_id,))
            existed = tx.execute("DELETE FROM groups_ WHERE id = ?", (group_id,)).rowcount > 0
            if existed:
                tx.changed("group", group_id)
                for member in members:
                    tx.changed("profile", member)
            return existed
        return self._write(work)

    def add_member(self, group_id: str, profile_id: str) -> "Deferred[bool]":
        def work(tx: _Transaction) -> bool:
            added = tx.execute("INSERT INTO memberships (group_id, profile_id) VALUES (?, ?) "
                               "ON CONFLICT DO NOTHING", (group_id, profile_id)).rowcount > 0
            if added:
                tx.changed("profile", profile_id)
            return added
        return self._write(work)

    def remove_member(self, group_id: str, profile_id: str) -> "Deferred[bool]":
        def work(tx: _Transaction) -> bool:
            removed = tx.execute("DELETE FROM memberships WHERE group_id = ? AND profile_id = ?",
                                 (group_id, profile_id)).rowcount > 0
            if removed:
                tx.changed("profile", profile_id)
            return removed
        return self._write(work)

    # -- the shared failure throttle ------------------------------------------------

    def record_throttle(self, instance: str, at: float,
                        rows: Sequence[tuple[str, str, int, bool]]) -> "Deferred[None]":
        """Write one instance's batch of throttle outcomes: ``(login, client,
        failures, succeeded)`` rows, in order. Writers are serialised like
        the change log's, so a reader that has seen number N has seen every
        row before it."""
        def work(tx: _Transaction) -> None:
            for login, client, failures, succeeded in rows:
                tx.execute("INSERT INTO throttle_events (instance, at, login, client, "
                           "failures, succeeded) VALUES (?, ?, ?, ?, ?, ?)",
                           (instance, at, login, client, failures, succeeded))
        return self._write(work)

    def throttle_since(self, seq: int, instance: str, not_before: float, limit: int = 10_000
                       ) -> "Deferred[tuple[int, list[tuple[str, str, int, bool]]]]":
        """Other instances' rows after number ``seq`` and not older than
        ``not_before``, oldest first, at most ``limit``; with the number to
        ask from next time."""
        def work(tx: _Transaction) -> tuple[int, list[tuple[str, str, int, bool]]]:
            rows = tx.all("SELECT seq, instance, at, login, client, failures, succeeded "
                          "FROM throttle_events WHERE seq > ? ORDER BY seq LIMIT ?",
                          (seq, limit))
            last = int(rows[-1][0]) if rows else seq
            return last, [(r[3], r[4], int(r[5]), bool(r[6])) for r in rows
                          if r[1] != instance and float(r[2]) >= not_before]
        return self._read(work)

    def prune_throttle(self, before: float) -> "Deferred[int]":
        """Forget throttle rows older than ``before``; how many went.

        The newest row always stays, so numbers never go back (SQLite would
        give a number again once every row above it is gone).
        """
        def work(tx: _Transaction) -> int:
            return int(tx.execute(
                "DELETE FROM throttle_events WHERE at < ? AND seq < "
                "(SELECT MAX(seq) FROM throttle_events)", (before,)).rowcount)
        return self._write(work)

    # -- collector state (mailhub.collector.state) ------------------------------

    def collector_state(self, login: str) -> "Deferred[CollectorRow]":
        """One user's collector settings, tombstones and block list (one read)."""
        def work(tx: _Transaction) -> CollectorRow:
            row = tx.one("SELECT collect, book_seen, reason FROM collector_users "
                         "WHERE login = ?", (login,))
            tombstones = {r[0]: (float(r[1]), r[2]) for r in tx.all(
                "SELECT address_key, at, by_whom FROM collector_tombstones WHERE login = ?",
                (login,))}
            blocks = [r[0] for r in tx.all(
                "SELECT entry FROM collector_blocks WHERE login = ? ORDER BY entry", (login,))]
            return CollectorRow(
                collect=bool(row[0]) if row else True, book_seen=bool(row[1]) if row else False,
                reason=row[2] if row else "", tombstones=tombstones, blocks=blocks)
        return self._read(work)

    def set_collector_user(self, login: str, *, collect: bool | None = None,
                           book_seen: bool | None = None, reason: str | None = None,
                           only_if_collecting: bool = False) -> "Deferred[bool]":
        """Change a user's switch and/or whether their book was seen; True when
        something changed. ``only_if_collecting``: leave an opted-out user as is."""
        def work(tx: _Transaction) -> bool:
            row = tx.one("SELECT collect, book_seen, reason FROM collector_users "
                         "WHERE login = ?", (login,))
            old = (bool(row[0]), bool(row[1]), row[2]) if row else (True, False, "")
            if only_if_collecting and not old[0]:
                return False
            new = (old[0] if collect is None else collect,
                   old[1] if book_seen is None else book_seen,
                   old[2] if reason is None else reason)
            if row is not None and new == old:
                return False
            if row is None:
                tx.execute("INSERT INTO collector_users (login, collect, book_seen, reason, "
                           "changed) VALUES (?, ?, ?, ?, ?)", (login, *new, now()))
            else:
                tx.execute("UPDATE collector_users SET collect = ?, book_seen = ?, "
                           "reason = ?, changed = ? WHERE login = ?", (*new, now(), login))
            tx.changed("collector", login)
            return True
        return self._write(work)

    def set_tombstones(self, login: str, keys: Sequence[str], at: float,
                       by_whom: str) -> "Deferred[None]":
        """Record (or replace) tombstones of ``keys`` for ``login``."""
        def work(tx: _Transaction) -> None:
            for key in keys:
                tx.execute("DELETE FROM collector_tombstones WHERE login = ? "
                           "AND address_key = ?", (login, key))
                tx.execute("INSERT INTO collector_tombstones (login, address_key, at, "
                           "by_whom) VALUES (?, ?, ?, ?)", (login, key, at, by_whom))
            tx.changed("collector", login)
        return self._write(work)

    def remove_tombstones(self, login: str, keys: Sequence[str]) -> "Deferred[int]":
        """Remove tombstones of ``keys`` for ``login`` (all when ``keys`` is
        empty); how many were removed."""
        def work(tx: _Transaction) -> int:
            if keys:
                removed = 0
                for key in keys:
                    removed += tx.execute("DELETE FROM collector_tombstones WHERE login = ? "
                                          "AND address_key = ?", (login, key)).rowcount
            else:
                removed = tx.execute("DELETE FROM collector_tombstones WHERE login = ?",
                                     (login,)).rowcount
            if removed:
                tx.changed("collector", login)
            return int(removed)
        return self._write(work)

    def change_blocks(self, login: str, add: Sequence[str] = (),
                      remove: Sequence[str] = ()) -> "Deferred[None]":
        """Add entries to and remove entries from a user's block list."""
        def work(tx: _Transaction) -> None:
            for entry in remove:
                tx.execute("DELETE FROM collector_blocks WHERE login = ? AND entry = ?",
                           (login, entry))
            for entry in add:
                tx.execute("INSERT INTO collector_blocks (login, entry) VALUES (?, ?) "
                           "ON CONFLICT (login, entry) DO NOTHING", (login, entry))
            tx.changed("collector", login)
        return self._write(work)

    # -- change log -----------------------------------------------------------

    def changes_since(self, seq: int) -> "Deferred[list[tuple[int, str, str]]]":
        def work(tx: _Transaction) -> list[tuple[int, str, str]]:
            return [(int(r[0]), r[1], r[2]) for r in tx.all(
                "SELECT seq, kind, key FROM changes WHERE seq > ? ORDER BY seq LIMIT 10000", (seq,))]
        return self._read(work)

    def last_change(self) -> "Deferred[int]":
        def work(tx: _Transaction) -> int:
            row = tx.one("SELECT COALESCE(MAX(seq), 0) FROM changes")
            return int(row[0]) if row else 0
        return self._read(work)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class StoreService(Service):
    """Owns the store's thread pool: started with mailhub, stopped with it."""

    name = "database"  # type: ignore[assignment]

    def __init__(self, dsn: str, site_id: str, reactor: IReactorFromThreads,
                 threads: int = 4) -> None:
        self.dialect = dialect_for(dsn)
        if isinstance(self.dialect, SQLiteDialect) and self.dialect.path == ":memory:":
            threads = 1  # one connection, one database
        self.pool = ThreadPool(minthreads=1, maxthreads=threads, name="mailhub-db")
        self._reactor = reactor
        self.store = SQLStore(self.dialect, site_id, runner=self._in_pool)

    def _in_pool(self, work: Callable[[], T]) -> "Deferred[T]":
        if not self.pool.started:
            self.pool.start()
        return deferToThreadPool(self._reactor, self.pool, work)

    def startService(self) -> None:
        if not self.pool.started:
            self.pool.start()
        super().startService()

    def stopService(self) -> "Deferred[None] | None":
        super().stopService()
        store = self.store

        def close() -> None:
            store.close_all()

        # Close connections from a worker, then stop the pool from the reactor thread.
        d = deferToThreadPool(self._reactor, self.pool, close) if self.pool.started else None
        if d is None:
            return None
        d.addBoth(lambda _: self.pool.stop())
        return d
