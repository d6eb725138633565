"""The ``mailhub`` command: the site token, groups, users, and a health check.

Every verb reads the same INI file as ``twistd -n mailhub`` (``--config FILE``,
before or after the verb; without it the embedded defaults, SQLite under
``./mailhub-data``) and works on the same database, so what it changes the
running server sees at once: the server follows the database's change log,
and reads the token from the database when a caller's token does not match
the one it holds.

The command is synchronous: it runs the directory store inline on this
thread (no reactor, no thread pool), migrating the schema first so that it
works on a fresh data folder before the server ever ran. ``check`` uses
blocking sockets with short timeouts.

Exit codes: 0 success; 1 bad input, bad configuration, bad DSN or something
not found (``check``: something is not OK); 2 the database cannot be
reached.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import getpass
import math
import os
import re
import socket
import sqlite3
import ssl
import struct
import sys
import urllib.error
import urllib.request
from pathlib import Path
import functools
from typing import Any, Callable, Iterator, NoReturn, Sequence, TextIO, TypeVar, cast
from urllib.parse import unquote, urlsplit

import attrs
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mailhub import config as configuration
from mailhub.config import Config, redact
from mailhub.directory.model import (
    GROUP_ID, PRIVACY, Email, Group, Profile, new_profile_id, new_token,
)
from mailhub.directory.sql import (
    MIGRATIONS, Dialect, SQLiteDialect, SQLStore, dialect_for, run_inline,
)
from mailhub.directory.users import hash_password
from mailhub.errors import ConfigError, NotFound, Unavailable, ValidationError

T = TypeVar("T")

#: Exit codes, as GroupServer's ``gs_auth_token_create`` uses them.
OK, BAD, UNREACHABLE = 0, 1, 2

#: GroupServer's words around the new token (REFERENCE.md section 2).
TOKEN_CHANGED = "The authentication token has been changed to the following:"
TOKEN_UPDATE = "Please update the relevant configuration files."

#: Seconds that ``check`` waits for any one dependency.
CHECK_TIMEOUT = 5.0

#: A plain address (local@domain): no spaces, brackets, quotes or list separators.
_ATOM = r"[^@\s<>()\[\],;:\"\\]"
_LABEL = r"[^@\s<>()\[\],;:\"\\.]+"
_ADDRESS = re.compile(r"^%s+@%s(\.%s)*$" % (_ATOM, _LABEL, _LABEL))


class Exit(Exception):
    """Stop the command with ``code`` after saying ``message`` on stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- helpers ------------------------------------------------------------------


def result_of(d: "Deferred[T]") -> T:
    """The result of a Deferred that has already fired (the store runs inline).

    A failure is raised again as its exception, so callers use plain
    try/except.
    """
    box: list[Any] = []
    d.addBoth(box.append)
    if not box:
        raise RuntimeError("the store answered asynchronously; the CLI runs it inline")
    result = box[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result  # type: ignore[no-any-return]


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


def open_store(dsn: str, site_id: str) -> SQLStore:
    """A migrated store on ``dsn``, run inline; Exit(1) bad DSN, Exit(2) unreachable."""
    store = SQLStore(checked_dialect(dsn), site_id, runner=run_inline)
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
    if not _ADDRESS.match(address):
        raise Exit(BAD, "%r is not an email address (expected local@domain)" % value)
    return address


def table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Print rows as columns padded to their widest cell (the first row is the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        out.write("  ".join(cells).rstrip() + "\n")


# -- token ----------------------------------------------------------------------


def token_create(config: Config, args: argparse.Namespace, io: "IO") -> int:
    """Replace the site token and print it as GroupServer does."""
    store = open_store(args.dsn or config.dsn, config.mailhub.site_id)
    try:
        token = new_token()
        result_of(store.set_token(token))
        # The audit log says that it changed, never what to.
        result_of(store.audit("token:rotated", "cli", "mailhub token create"))
    except Unavailable as e:
        raise Exit(UNREACHABLE, "cannot change the token: %s" % e)
    finally:
        store.close_all()
    io.stdout.write("%s\n%s\n%s\n" % (TOKEN_CHANGED, token, TOKEN_UPDATE))
    return OK


# -- groups -------------------------------------------------------------------


def group_add(config: Config, args: argparse.Namespace, io: "IO") -> int:
    """Create a group after checking its id, name, address and privacy."""
    problems = []
    if not GROUP_ID.match(args.group_id):
        problems.append("the group id %r must be 1 to 64 letters, digits, '_', '.' or '-', "
                        "starting with a letter or digit" % args.group_id)
    name = args.name.strip()
    if not name:
        problems.append("the group name must not be empty")
    if args.privacy not in PRIVACY:
        problems.append("the privacy must be one of %s" % ", ".join(PRIVACY))
    address = ""
    if args.email:
        try:
            address = email_address(args.email)
        except Exit as e:
            problems.append(e.message)
    if problems:
        raise Exit(BAD, "; ".join(problems))
    group = Group(id=args.group_id, name=name, email=address, privacy=args.privacy)
    with stored(config) as store:
        result_of(store.create_group(group))
    io.stdout.write("added group %s\n" % group.id)
    return OK


def group_list(config: Config, args: argparse.Namespace, io: "IO") -> int:
    """Print every group with its name, list address, privacy and member count."""
    with stored(config) as store:
        groups = result_of(store.load_groups())
        profiles = result_of(store.load_profiles())
    members: dict[str, int] = {}
    for profile in profiles:
        for group_id in profile.groups:
            members[group_id] = members.get(group_id, 0) + 1
    rows = [["ID", "NAME", "EMAIL", "PRIVACY", "MEMBERS"]]
    rows += [[g.id, g.name, g.email, g.privacy, str(members.get(g.id, 0))] for g in groups]
    table(rows, io.stdout)
    return OK


def group_remove(config: Config, args: argparse.Namespace, io: "IO") -> int:
    """Delete a group and its memberships (the members' profiles stay)."""
    with stored(config) as store:
        if not result_of(store.remove_group(args.group_id)):
            raise Exit(BAD, "no group %s" % args.group_id)
    io.stdout.write("removed group %s\n" % args.group_id)
    return OK


# -- users ----------------------------------------------------------------------


def user_add(config: Config, args: argparse.Namespace, io: "IO") -> int:
    """Create a profile whose preferred, verified address is EMAIL; print its id."""
    address = email_address(args.email)
    name = args.name.strip()
    if not name:
        raise Exit(BAD, "the name must not be empty")
    password_hash = None
    if args.password_stdin:
        password_hash = hash_password(read_password(io.stdin, io.stderr))
    profile = Profile(id=new_profile_id(), name=name,
                      emails=(Email(address, verified=True, preferred=True),))
    with stored(config) as store:
        if result_of(store.find_profile(address)) is not None:
            raise Exit(BAD, "the address %s belongs to another profile" % address)
        result_of(store.create_profile(profile))
        if password_hash is not None:
            result_of(store.set_password_hash(profile.id, password_hash))
    io.stdout.write(profile.id + "\n")
    return OK


def _find_user(store: SQLStore, id_or_email: str) -> Profile:
    wanted = id_or_email.strip()
    if "@" in wanted:
        found = result_of(store.find_profile(wanted))
    else:
        found = result_of(store.get_profile(wanted))
    if found is None:
        raise NotFound("no user %s" % wanted)
    return found


def user_list(config: Config, args: argparse.Namespace, io: "IO") -> int:
    """Print every profile: id, name, addresses (preferred first), groups, password set."""
    with stored(config) as store:
        profiles = result_of(store.load_profiles())
    rows = [["ID", "NAME", "EMAIL", "GROUPS", "PASSWORD"]]
    for p in profiles:
        addresses = sorted(p.emails, key=lambda e: (not e.preferred, not e.verified))
        shown = ",".join(e.address + ("" if e.verified else " (unverified)") for e in addresses)
        rows.append([p.id, p.name, shown, ",".join(sorted(p.groups)) or "-",
                     "yes" if p.has_password else "no"])
    table(rows, io.stdout)
    return OK


def user_passwd(config: Config, args: argparse.Namespace, io: "IO") -> int:
    """Set a user's password from stdin (argon2id hash)."""
    with stored(config) as store:
        profile = _find_user(store, args.user)
        password_hash = hash_password(read_password(io.stdin, io.stderr))
        result_of(store.set_password_hash(profile.id, password_hash))
    io.stdout.write("password changed for %s\n" % profile.id)
    return OK


def user_remove(config: Config, args: argparse.Namespace, io: "IO") -> int:
    """Delete a profile, with its addresses, memberships and password."""
    with stored(config) as store:
        profile = _find_user(store, args.user)
        result_of(store.remove_profile(profile.id))
    io.stdout.write("removed user %s (%s)\n" % (profile.id, profile.login))
    return OK


@contextlib.contextmanager
def stored(config: Config) -> Iterator[SQLStore]:
    """``with stored(config) as store``: the migrated store, its connection closed afterwards."""
    store = open_store(config.dsn, config.mailhub.site_id)
    try:
        yield store
    finally:
        store.close_all()


# -- check ----------------------------------------------------------------------


@attrs.frozen
class Row:
    """One line of ``mailhub check``: what, whether it is fine, and why."""

    what: str
    status: str  # OK, FAIL or "-" (not configured, which is fine)
    detail: str

    @property
    def fine(self) -> bool:
        """Whether this row lets ``check`` exit 0."""
        return self.status != "FAIL"


class CheckFailed(Exception):
    """A dependency is not fine; the message says why."""


def _writable_folder(path: Path) -> str | None:
    """Why ``path`` (a folder) cannot be used, or None when it exists or can be made."""
    probe = path.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return "%s is not a folder" % probe
    if not os.access(probe, os.W_OK | os.X_OK):
        return "%s is not writable" % probe
    return None


def check_data(config: Config) -> Row:
    """The data folder (SQLite, embedded CardDAV) exists or can be made."""
    problem = _writable_folder(config.data_dir)
    if problem:
        return Row("data", "FAIL", problem)
    state = "" if config.data_dir.exists() else " (made on first start)"
    return Row("data", "OK", str(config.data_dir.absolute()) + state)


def check_database(config: Config) -> Row:
    """Connect to the database and read its schema version, changing nothing."""
    dsn = config.dsn
    try:
        dialect = checked_dialect(dsn)
    except Exit as e:
        return Row("database", "FAIL", e.message)
    where = redact(dsn)
    if isinstance(dialect, SQLiteDialect) and dialect.path != ":memory:":
        path = Path(dialect.path)
        if not path.exists():
            problem = _writable_folder(path.parent)
            if problem:
                return Row("database", "FAIL", "%s: %s" % (where, problem))
            return Row("database", "OK", "%s: not created yet (made on first start)" % where)
    try:
        conn = dialect.connect()
    except dialect.unavailable + (OSError,) as e:
        return Row("database", "FAIL", "%s: cannot connect: %s" % (where, _first_line(e)))
    try:
        cursor = conn.cursor()
        if dialect.name == "postgresql":
            cursor.execute("SELECT to_regclass('schema_version') IS NOT NULL")
        else:
            cursor.execute("SELECT count(*) > 0 FROM sqlite_master "
                           "WHERE type = 'table' AND name = 'schema_version'")
        version = 0
        if cursor.fetchone()[0]:
            cursor.execute("SELECT version FROM schema_version")
            row = cursor.fetchone()
            version = int(row[0]) if row else 0
    except dialect.unavailable as e:
        return Row("database", "FAIL", "%s: %s" % (where, _first_line(e)))
    finally:
        conn.close()
    newest = len(MIGRATIONS)
    if version > newest:
        return Row("database", "FAIL", "%s: schema version %d is newer than this mailhub's %d"
                   % (where, version, newest))
    later = "" if version == newest else " (migrated on next start)"
    return Row("database", "OK", "%s: schema version %d of %d%s" % (where, version, newest, later))


def _shortstr(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack(">B", len(data)) + data


def _longstr(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _field_table(fields: dict[str, bytes]) -> bytes:
    return _longstr(b"".join(_shortstr(k) + v for k, v in fields.items()))


def _method(class_id: int, method_id: int, arguments: bytes) -> bytes:
    payload = struct.pack(">HH", class_id, method_id) + arguments
    return struct.pack(">BHI", 1, 0, len(payload)) + payload + b"\xce"


class _Frames:
    """Reads AMQP 0-9-1 method frames off a blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def method(self) -> tuple[int, int, bytes]:
        while True:
            header = self.exactly(7)
            if header.startswith(b"AMQP"):
                version = header[4:] + self.exactly(1)
                raise CheckFailed("the broker speaks AMQP %d-%d-%d, not 0-9-1"
                                  % tuple(version[1:4]))
            kind, _channel, size = struct.unpack(">BHI", header)
            payload = self.exactly(size + 1)[:-1]
            if kind == 8:  # heartbeat
                continue
            if kind != 1 or len(payload) < 4:
                raise CheckFailed("unexpected AMQP frame type %d" % kind)
            class_id, method_id = struct.unpack(">HH", payload[:4])
            return class_id, method_id, payload[4:]


def _close_reason(arguments: bytes) -> str:
    code, length = struct.unpack(">HB", arguments[:3])
    return "%d %s" % (code, arguments[3:3 + length].decode("utf-8", "replace"))


def amqp_handshake(url: str, timeout: float = CHECK_TIMEOUT) -> str:
    """Open and close an AMQP 0-9-1 connection with the URL's credentials and vhost.

    Blocking; returns a description of what answered, raises CheckFailed.
    """
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    secure = parts.scheme == "amqps"
    port = parts.port or (5671 if secure else 5672)
    user = unquote(parts.username) if parts.username is not None else "guest"
    password = unquote(parts.password) if parts.password is not None else "guest"
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise CheckFailed("%s:%d: cannot connect: %s" % (host, port, e.strerror or e))
    try:
        if secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        frames = _Frames(sock)
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        if frames.method()[:2] != (10, 10):
            raise CheckFailed("%s:%d did not start an AMQP connection" % (host, port))
        properties = _field_table({
            "product": b"S" + _longstr(b"mailhub check"),
            "capabilities": b"F" + _field_table({"authentication_failure_close": b"t\x01"}),
        })
        response = b"\x00" + user.encode("utf-8") + b"\x00" + password.encode("utf-8")
        sock.sendall(_method(10, 11, properties + _shortstr("PLAIN") + _longstr(response)
                             + _shortstr("en_US")))
        try:
            class_id, method_id, arguments = frames.method()
        except EOFError:
            raise CheckFailed("%s:%d refused the login of %s" % (host, port, user))
        if (class_id, method_id) == (10, 50):
            raise CheckFailed("%s:%d refused the login of %s: %s"
                              % (host, port, user, _close_reason(arguments)))
        if (class_id, method_id) != (10, 30):
            raise CheckFailed("%s:%d answered the login with method %d.%d"
                              % (host, port, class_id, method_id))
        channel_max, frame_max, _heartbeat = struct.unpack(">HIH", arguments[:8])
        sock.sendall(_method(10, 31, struct.pack(">HIH", channel_max, frame_max, 0)))
        sock.sendall(_method(10, 40, _shortstr(vhost) + _shortstr("") + b"\x00"))
        class_id, method_id, arguments = frames.method()
        if (class_id, method_id) == (10, 50):
            raise CheckFailed("%s:%d refused the virtual host %s: %s"
                              % (host, port, vhost, _close_reason(arguments)))
        if (class_id, method_id) != (10, 41):
            raise CheckFailed("%s:%d answered connection.open with method %d.%d"
                              % (host, port, class_id, method_id))
        sock.sendall(_method(10, 50, struct.pack(">H", 200) + _shortstr("check done")
                             + struct.pack(">HH", 0, 0)))
        try:
            frames.method()  # close-ok
        except (EOFError, OSError):
            pass
        return "%s:%d, virtual host %s, logged in as %s" % (host, port, vhost, user)
    except EOFError:
        raise CheckFailed("%s:%d closed the connection during the AMQP handshake" % (host, port))
    except (OSError, struct.error) as e:
        raise CheckFailed("%s:%d: %s" % (host, port, _first_line(e)))
    finally:
        sock.close()


def check_amqp(config: Config) -> list[Row]:
    """The broker answers an AMQP 0-9-1 handshake, and the spec file is there."""
    if not config.amqp.url:
        return [Row("amqp", "-", "not configured: local pubsub only")]
    rows = []
    try:
        rows.append(Row("amqp", "OK", amqp_handshake(config.amqp.url)))
    except CheckFailed as e:
        rows.append(Row("amqp", "FAIL", str(e)))
    spec = Path(config.amqp.spec)
    try:
        with spec.open("rb") as f:
            head = f.read(4096)
    except OSError as e:
        rows.append(Row("amqp spec", "FAIL", "%s: %s (Debian: apt install amqp-specs)"
                        % (spec, e.strerror or e)))
    else:
        if b"<amqp" in head:
            rows.append(Row("amqp spec", "OK", str(spec)))
        else:
            rows.append(Row("amqp spec", "FAIL", "%s is not an AMQP XML specification" % spec))
    return rows


PROPFIND = (b'<?xml version="1.0" encoding="utf-8"?>\n'
            b'<propfind xmlns="DAV:"><prop><resourcetype/></prop></propfind>')


def check_carddav(config: Config) -> Row:
    """Embedded: nothing to reach. External: a PROPFIND on the base URL, with the credentials."""
    if config.embedded_carddav:
        return Row("carddav", "OK", "embedded, served at /dav/, stored under %s"
                   % config.data_dir.absolute())
    url = config.carddav.url
    request = urllib.request.Request(url, data=PROPFIND, method="PROPFIND", headers={
        "Depth": "0", "Content-Type": "application/xml; charset=utf-8"})
    if config.carddav.username:
        pair = "%s:%s" % (config.carddav.username, config.carddav.password)
        request.add_header("Authorization",
                           "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii"))
    timeout = min(config.carddav.timeout, CHECK_TIMEOUT)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = response.status
            response.read()
    except urllib.error.HTTPError as e:
        status = e.code
        e.close()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return Row("carddav", "FAIL", "%s: cannot connect: %s" % (redact(url), reason))
    if 200 <= status < 300:
        return Row("carddav", "OK", "%s answered PROPFIND with %d" % (redact(url), status))
    if status in (401, 403):
        who = config.carddav.username or "no credentials"
        return Row("carddav", "FAIL", "%s refused %s (%d)" % (redact(url), who, status))
    return Row("carddav", "FAIL", "%s answered PROPFIND with %d" % (redact(url), status))


def ldap_bind(url: str, config: Config) -> str:
    """Bind to one LDAP server with the configured DN; look at the base DN. Raises CheckFailed."""
    import ldap3
    from ldap3.core.exceptions import LDAPException

    section = config.ldap
    tls = None
    if section.ca_file or url.startswith("ldaps:") or section.start_tls:
        tls = ldap3.Tls(ca_certs_file=section.ca_file or None, validate=ssl.CERT_REQUIRED)
    timeout = min(section.timeout, CHECK_TIMEOUT)
    server = ldap3.Server(url, get_info=ldap3.NONE, tls=tls, connect_timeout=timeout)
    # ldap3 packs receive_timeout into SO_RCVTIMEO as whole seconds.
    conn = ldap3.Connection(server, user=section.bind_dn or None,
                            password=section.bind_password or None,
                            receive_timeout=max(1, math.ceil(timeout)), raise_exceptions=False)
    who = section.bind_dn or "anonymous"
    try:
        if not conn.open() and conn.closed:
            raise CheckFailed("%s: cannot connect" % url)
        if section.start_tls and not conn.start_tls():
            raise CheckFailed("%s: StartTLS failed: %s" % (url, conn.result.get("description")))
        if not conn.bind():
            raise CheckFailed("%s: bind as %s refused: %s"
                              % (url, who, conn.result.get("description")))
        detail = "%s: bound as %s" % (url, who)
        if section.base_dn:
            if not conn.search(section.base_dn, "(objectClass=*)", search_scope=ldap3.BASE,
                               attributes=[]):
                raise CheckFailed("%s: base DN %s: %s"
                                  % (url, section.base_dn, conn.result.get("description")))
            detail += ", base DN %s found" % section.base_dn
        return detail
    except LDAPException as e:
        raise CheckFailed("%s: %s" % (url, _first_line(e)))
    finally:
        try:
            conn.unbind()
        except Exception:
            pass


def check_ldap(config: Config) -> list[Row]:
    """Each configured LDAP server accepts the configured bind."""
    if not config.ldap.url:
        return [Row("ldap", "-", "not configured: site users only")]
    rows = []
    for url in config.ldap.url.split():
        try:
            rows.append(Row("ldap", "OK", ldap_bind(url, config)))
        except CheckFailed as e:
            rows.append(Row("ldap", "FAIL", str(e)))
    return rows


def check_listen(config: Config) -> Row:
    """The listen address is a Twisted server endpoint string (nothing is opened)."""
    from twisted.internet import endpoints, reactor

    listen = config.mailhub.listen
    try:
        endpoints.serverFromString(reactor, listen)
    except Exception as e:
        return Row("listen", "FAIL", "%r: %s" % (listen, _first_line(e)))
    return Row("listen", "OK", listen)


def check(config: Config, args: argparse.Namespace, io: "IO") -> int:
    """Reach every configured dependency; print a table; 0 only if all is fine."""
    where = os.path.abspath(config.path) if config.path else "defaults (no --config given)"
    rows = [Row("config", "OK", where), check_listen(config), check_data(config),
            check_database(config)]
    rows += check_amqp(config)
    rows.append(check_carddav(config))
    rows += check_ldap(config)
    table([["CHECK", "STATUS", "DETAIL"]] + [[r.what, r.status, r.detail] for r in rows],
          io.stdout)
    return OK if all(r.fine for r in rows) else BAD


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# -- the parser -------------------------------------------------------------------


@attrs.frozen
class IO:
    """Where the command reads and writes: the process's streams, or a test's."""

    stdin: TextIO
    stdout: TextIO
    stderr: TextIO


Command = Callable[[Config, argparse.Namespace, IO], int]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of exiting, so main() returns codes,
    and writes its help to the command's stdout."""

    def __init__(self, *args: Any, out: TextIO | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._out = out

    def _print_message(self, message: str, file: Any = None) -> None:
        if message:
            (self._out or file or sys.stdout).write(message)

    def error(self, message: str) -> NoReturn:
        raise Exit(BAD, "%s: %s\n%s" % (self.prog, message, self.format_usage().rstrip()))

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise _Done(status, message or "")


class _Done(Exception):
    """argparse finished on its own (--help): the exit status and text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parser(out: TextIO | None = None) -> argparse.ArgumentParser:
    """The ``mailhub`` argument parser: verbs, their objects and options.

    Help text goes to ``out`` (default: sys.stdout).
    """
    # Subparsers are made by argparse itself, so the stream rides on a partial.
    kind = cast("type[_Parser]", functools.partial(_Parser, out=out))
    config_option = _Parser(add_help=False)
    config_option.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS,
        help="the INI file twistd mailhub reads (default: built-in defaults, "
             "SQLite under ./mailhub-data)")

    top = kind(prog="mailhub", parents=[config_option],
                  description="Manage a mailhub site: token, groups, users; check its set-up.")
    verbs = top.add_subparsers(dest="verb", metavar="VERB", parser_class=kind)
    verbs.required = True

    def verb(name: str, text: str) -> argparse._SubParsersAction:
        sub = verbs.add_parser(name, help=text, description=text, parents=[config_option])
        actions = sub.add_subparsers(dest="action", metavar="ACTION", parser_class=kind)
        actions.required = True
        return actions

    def action(group: argparse._SubParsersAction, name: str, run: Command,
               text: str) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=text, description=text, parents=[config_option])
        sub.set_defaults(run=run)
        return sub

    token = verb("token", "the site token of the GroupServer web hooks")
    create = action(token, "create", token_create,
                    "make a new site token, store it, and print it "
                    "(exit 0; 1 bad DSN; 2 cannot connect)")
    create.add_argument("dsn", metavar="DSN", nargs="?", default=None,
                        help="database to change (default: [database] dsn of the config)")

    group = verb("group", "the site's groups")
    add = action(group, "add", group_add, "create a group")
    add.add_argument("group_id", metavar="GROUP_ID")
    add.add_argument("--name", required=True, help="the group's display name")
    add.add_argument("--email", metavar="LIST_ADDRESS", default="",
                     help="the list's posting address")
    add.add_argument("--privacy", default="public", metavar="|".join(PRIVACY),
                     help="who may see the group (default: public)")
    action(group, "list", group_list, "list the groups")
    remove = action(group, "remove", group_remove, "delete a group and its memberships")
    remove.add_argument("group_id", metavar="GROUP_ID")

    user = verb("user", "the site's users (profiles)")
    add = action(user, "add", user_add,
                 "create a user whose preferred, verified address is EMAIL; prints the new id")
    add.add_argument("email", metavar="EMAIL")
    add.add_argument("--name", required=True, help="the user's display name")
    add.add_argument("--password-stdin", action="store_true",
                     help="read a password from the first line of stdin")
    action(user, "list", user_list, "list the users")
    passwd = action(user, "passwd", user_passwd,
                    "set a user's password, read from the first line of stdin")
    passwd.add_argument("user", metavar="EMAIL", help="an address of the user (or the id)")
    remove = action(user, "remove", user_remove, "delete a user")
    remove.add_argument("user", metavar="ID_OR_EMAIL")

    checker = verbs.add_parser("check", parents=[config_option],
                               help="reach every configured dependency and print a table",
                               description="Load the config, reach every configured dependency "
                                           "and print what is OK; exit 1 if anything is not.")
    checker.set_defaults(run=check)
    return top


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None,
         stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run the ``mailhub`` command; returns the exit code (the console script exits with it)."""
    io = IO(stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr)
    try:
        args = parser(io.stdout).parse_args(list(sys.argv[1:] if argv is None else argv))
    except _Done as done:
        if done.message:
            io.stderr.write(done.message)
        return done.status
    except Exit as e:
        io.stderr.write(e.message + "\n")
        return e.code
    try:
        config = configuration.load(getattr(args, "config", None))
        return int(args.run(config, args, io))
    except Exit as e:
        io.stderr.write("mailhub: %s\n" % e.message)
        return e.code
    except ConfigError as e:
        io.stderr.write("mailhub: %s\n" % e)
        return BAD
    except (ValidationError, NotFound) as e:
        io.stderr.write("mailhub: %s\n" % e)
        return BAD
    except Unavailable as e:
        io.stderr.write("mailhub: %s\n" % e)
        return UNREACHABLE
    except _database_errors() as e:
        # Reached, but unusable: not a database, no permission, a broken schema.
        io.stderr.write("mailhub: the database cannot be used: %s\n" % _first_line(e))
        return UNREACHABLE


def _database_errors() -> tuple[type[BaseException], ...]:
    """The DB-API error classes of the drivers loaded so far."""
    errors: list[type[BaseException]] = [sqlite3.Error]
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None:
        errors.append(psycopg.Error)
    return tuple(errors)


if __name__ == "__main__":
    sys.exit(main())
