"""Users from an LDAP directory (OpenLDAP, Active Directory, ...), with ldap3.

ldap3 is blocking, so every LDAP operation runs in the thread pool owned by
:class:`LDAPService`; each worker thread keeps two connections of its own
(one bound as the configured service account for searches, one used for the
users' own binds), so no connection is ever shared by two threads at once.

- **Failover**: ``[ldap] url`` may list several servers. A new connection
  tries them in order, skipping for ``retry_after`` seconds one that just
  failed; an operation that fails on a connection (refused, reset, no
  answer within ``timeout``) is retried once on the next server. When none
  answers, the operation fails with :class:`~mailhub.errors.Unavailable`:
  never a success.
- **Lookups** fill the login into ``user_filter`` (every ``{login}``) after
  escaping it per RFC 4515, so ``*)(uid=*`` is searched literally. A login
  that matches more than one entry is nobody: it never authenticates.
- **Authentication** searches the entry, then binds as its DN with the
  given password. An empty password is refused before anything is sent
  (LDAP would treat it as an unauthenticated bind, which "succeeds").
- **Cost**: the search and the bind of a login are the two requests every
  login sends; they are sent pre-encoded by the quarantined
  :mod:`mailhub.directory.ldap_wire` (the same bytes ldap3 would send,
  without pyasn1's cost) and answered through ldap3's connection and
  decoder. ldap3's own path remains for everything else, for a
  ``user_filter`` the template cannot serve, and for any ldap3 version but
  the pinned one.
- **Listing** uses the simple paged results control (RFC 2696) on one
  connection, one page per thread-pool call, with the next page fetched
  while the current one is being written: memory holds two pages at most.
"""

from __future__ import annotations

import math
import ssl
import threading
import time
from typing import Any, AsyncIterator, Callable, TypeVar

from ldap3 import (
    ANONYMOUS, NONE, SIMPLE, SUBTREE, Connection, Server, Tls,
)
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailhub.config import LDAPSection
from mailhub.directory.ldap_wire import FAST_REQUESTS, FastRequests, ber
from mailhub.directory.interfaces import IUserSource
from mailhub.directory.model import User, unique
from mailhub.errors import Unavailable
from mailhub.service import ThreadPoolService

T = TypeVar("T")

#: The paged results control (RFC 2696).
PAGED_RESULTS = "1.2.840.113556.1.4.319"
#: Result codes that say "the server cannot answer now" rather than "no".
TRANSIENT_RESULTS = {
    3,   # timeLimitExceeded
    11,  # adminLimitExceeded
    51,  # busy
    52,  # unavailable
    80,  # other
}
#: Result codes of a bind that mean "wrong credentials / not allowed": a plain no.
REFUSED_BINDS = {
    48,  # inappropriateAuthentication
    49,  # invalidCredentials (AD adds why: expired, disabled, locked)
    50,  # insufficientAccessRights
    53,  # unwillingToPerform (e.g. an empty password, a disabled account)
}
#: Longest login looked up at all.
MAX_LOGIN = 320
class LDAPFailure(Exception):
    """An operation that failed on one connection; another server may work."""


def user_filter(template: str, login: str) -> str:
    """``template`` with every ``{login}`` replaced by the escaped login (RFC 4515)."""
    return template.replace("{login}", escape_filter_chars(login))


def _text(values: Any) -> list[str]:
    if not values:
        return []
    out = []
    for value in values:
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        out.append(str(value))
    return out


def _addresses(values: list[str]) -> list[str]:
    """Mail addresses from ``mail`` or AD's ``proxyAddresses`` values.

    ``SMTP:a@b`` and ``smtp:a@b`` give ``a@b``; other prefixed values
    (``X500:``, ``SIP:``) are not mail addresses and are dropped.
    """
    out = []
    for value in values:
        value = value.strip()
        prefix, colon, rest = value.partition(":")
        if colon and "@" not in prefix:
            if prefix.lower() != "smtp":
                continue
            value = rest.strip()
        if value:
            out.append(value)
    return out


def user_of_entry(settings: LDAPSection, entry: dict[str, Any]) -> User | None:
    """The User an ldap3 search entry describes, or None without a login."""
    raw = entry.get("raw_attributes") or {}
    logins = _text(raw.get(settings.login_attribute))
    if not logins or not logins[0].strip():
        return None
    names = _text(raw.get(settings.name_attribute))
    emails: list[str] = []
    for attribute in settings.mail_attributes:
        emails.extend(_addresses(_text(raw.get(attribute))))
    dn = entry.get("dn") or None
    if settings.dn_attribute:
        given = _text(raw.get(settings.dn_attribute))
        if given:
            dn = given[0]
    return User(login=logins[0].strip(), name=names[0] if names else "",
                emails=tuple(unique(emails)), dn=dn, source="ldap")


class _Listing:
    """One paged listing: its connection and the server's cookie."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.cookie: bytes | None = None
        self.done = False


class _VerifiedTls(Tls):
    """ldap3's Tls, but the server's name is checked in the TLS handshake itself.

    ldap3 turns the context's ``check_hostname`` off and compares the names
    after the handshake; when they differ it raises and drops the wrapped
    socket unclosed (a ResourceWarning, a descriptor left to the garbage
    collector, on every refused connection). Here the standard library checks
    the name during the handshake, and a handshake that fails closes its socket.
    Both a TLS-from-the-start (``ldaps://``) and a StartTLS connection come here.
    """

    def wrap_socket(self, connection: Connection, do_handshake: bool = False) -> None:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_certs_file)
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        connection.socket = context.wrap_socket(
            connection.socket, server_side=False, do_handshake_on_connect=do_handshake,
            server_hostname=connection.server.host)


class LDAPClient:
    """The blocking half: servers, connections, searches, binds (worker threads only)."""

    log = Logger()

    def __init__(self, settings: LDAPSection, clock: Callable[[], float] = time.monotonic,
                 fast: bool = FAST_REQUESTS, retry_after: float = 30.0) -> None:
        if not settings.urls:
            raise ValueError("no LDAP server URL")
        self.settings = settings
        self.retry_after = retry_after
        self._clock = clock
        #: Send logins' searches and binds pre-encoded (mailhub.directory.ldap_wire).
        self.fast = fast
        self._wire = FastRequests(settings)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[Connection] = set()
        self._down_until: dict[str, float] = {}
        tls = None
        if settings.start_tls or any(u.lower().startswith("ldaps:") for u in settings.urls):
            tls = _VerifiedTls(validate=ssl.CERT_REQUIRED, ca_certs_file=settings.ca_file or None)
        self._tls = tls

    # -- servers and connections --------------------------------------------

    def _servers(self) -> list[str]:
        """URLs in configured order, those that failed lately moved last."""
        now = self._clock()
        with self._lock:
            fresh = [u for u in self.settings.urls if self._down_until.get(u, 0.0) <= now]
            stale = [u for u in self.settings.urls if self._down_until.get(u, 0.0) > now]
        return fresh + stale

    def _mark_down(self, url: str) -> None:
        with self._lock:
            self._down_until[url] = self._clock() + self.retry_after

    def _connect(self, url: str, service: bool) -> Connection:
        """An open connection to ``url``: bound as the service account if ``service``."""
        s = self.settings
        server = Server(url, get_info=NONE, connect_timeout=s.timeout, tls=self._tls)
        # ldap3 packs the receive timeout into SO_RCVTIMEO as whole seconds.
        receive_timeout = max(1, math.ceil(s.timeout))
        if service and s.bind_dn:
            conn = Connection(server, user=s.bind_dn, password=s.bind_password,
                              authentication=SIMPLE, receive_timeout=receive_timeout,
                              raise_exceptions=False, auto_referrals=False,
                              read_only=True, return_empty_attributes=False)
        else:
            conn = Connection(server, authentication=ANONYMOUS, receive_timeout=receive_timeout,
                              raise_exceptions=False, auto_referrals=False,
                              read_only=True, return_empty_attributes=False)
        try:
            conn.open()
            if s.start_tls and not url.lower().startswith("ldaps:"):
                if not conn.start_tls():
                    raise LDAPFailure("StartTLS refused: %s" % _why(conn))
            if service and not conn.bind():
                raise LDAPFailure("service bind failed: %s" % _why(conn))
        except (LDAPException, OSError) as e:
            _close(conn)
            raise LDAPFailure("%s: %s" % (url, _reason(e)))
        except LDAPFailure as e:
            _close(conn)
            raise LDAPFailure("%s: %s" % (url, e))
        with self._lock:
            self._open.add(conn)
        return conn

    def _forget(self, conn: Connection) -> None:
        with self._lock:
            self._open.discard(conn)
        _close(conn)

    def _run(self, kind: str, operation: Callable[[Connection], T]) -> T:
        """``operation`` on this thread's ``kind`` connection, failing over.

        A cached connection that fails is dropped and the operation tried
        again on a fresh connection, each server in turn; Unavailable when
        every server failed.
        """
        errors: list[str] = []
        cached: Connection | None = getattr(self._local, kind, None)
        if cached is not None:
            try:
                return operation(cached)
            except (LDAPException, OSError, LDAPFailure) as e:
                errors.append(_reason(e))
                setattr(self._local, kind, None)
                self._forget(cached)
        for url in self._servers():
            try:
                conn = self._connect(url, service=(kind == "search"))
            except LDAPFailure as e:
                errors.append(str(e))
                self._mark_down(url)
                continue
            try:
                result = operation(conn)
            except (LDAPException, OSError, LDAPFailure) as e:
                errors.append("%s: %s" % (url, _reason(e)))
                self._mark_down(url)
                self._forget(conn)
                continue
            setattr(self._local, kind, conn)
            return result
        raise Unavailable("LDAP is unavailable: " + "; ".join(errors))

    def close_all(self) -> None:
        """Close every connection any thread opened (after the pool stopped)."""
        with self._lock:
            conns, self._open = list(self._open), set()
        for conn in conns:
            _close(conn)
        self._local = threading.local()

    # -- operations -------------------------------------------------------

    def _search_entry(self, login: str) -> dict[str, Any] | None:
        login = login.strip()
        if not login or len(login) > MAX_LOGIN:
            return None
        s = self.settings
        query = user_filter(s.user_filter, login)

        def search(conn: Connection) -> list[dict[str, Any]]:
            if not (self.fast and self._wire.search(conn, login)):
                conn.search(s.base_dn, query, SUBTREE, attributes=s.attributes, size_limit=2)
            code = conn.result.get("result", 0)
            if code == 32:  # noSuchObject: the base itself is not there
                return []
            if code in TRANSIENT_RESULTS:
                raise LDAPFailure(_why(conn))
            if code not in (0, 4):  # success, sizeLimitExceeded (two or more found)
                raise LDAPFailure(_why(conn))
            return [e for e in conn.response or () if e.get("type") == "searchResEntry"]

        entries = self._run("search", search)
        if len(entries) != 1:
            if len(entries) > 1:
                self.log.warn("LDAP login {login!r} matches several entries: refused",
                              login=login)
            return None
        return entries[0]

    def find(self, login: str) -> User | None:
        """The user with this login (per ``user_filter``), or None."""
        entry = self._search_entry(login)
        return user_of_entry(self.settings, entry) if entry is not None else None

    def find_by(self, attribute: str, value: str) -> User | None:
        """The one user of ``list_filter`` whose ``attribute`` is ``value``, or None
        (the collector's ESN ids: ``[collector] esn_id_attribute``)."""
        value = value.strip()
        if not value or len(value) > MAX_LOGIN:
            return None
        s = self.settings
        query = "(&%s(%s=%s))" % (s.list_filter, attribute, escape_filter_chars(value))

        entries = self._run("search", lambda conn: _two_at_most(
            conn, s.base_dn, query, s.attributes))
        return user_of_entry(s, entries[0]) if len(entries) == 1 else None

    def attribute_of(self, login: str, attribute: str) -> str | None:
        """The first value of ``attribute`` of the entry of ``login``, or None."""
        login = login.strip()
        if not login or len(login) > MAX_LOGIN:
            return None
        s = self.settings
        query = user_filter(s.user_filter, login)

        entries = self._run("search", lambda conn: _two_at_most(
            conn, s.base_dn, query, [attribute]))
        if len(entries) != 1:
            return None
        raw = entries[0].get("raw_attributes") or {}
        values = next((v for k, v in raw.items() if k.casefold() == attribute.casefold()), None)
        found = _text(values)
        return (found[0].strip() or None) if found else None

    def authenticate(self, login: str, password: str) -> User | None:
        """Search the entry, then bind as it: the User on success, else None."""
        if not password or not login:
            return None
        try:
            # SASLprep (RFC 4013) refuses some characters: such a password can
            # never bind, which is a plain "no", not an LDAP server failure.
            prepared = ber.simple_password(password)
        except LDAPException:
            return None
        entry = self._search_entry(login)
        if entry is None:
            return None
        user = user_of_entry(self.settings, entry)
        dn = entry["dn"]
        if not dn:
            return None  # an empty DN would be an anonymous bind

        def bind(conn: Connection) -> bool:
            if self.fast:
                self._wire.bind(conn, dn, prepared)
            else:
                conn.authentication = SIMPLE
                conn.user = dn
                conn.password = password
                try:
                    if conn.bind():
                        return True
                finally:
                    conn.password = None
            code = conn.result.get("result", 0) if conn.result else 0
            if self.fast and code == 0:
                return True
            if code in REFUSED_BINDS:
                return False
            raise LDAPFailure(_why(conn))

        return user if self._run("auth", bind) else None

    def open_listing(self) -> _Listing:
        """A connection of its own for one paged listing."""
        errors: list[str] = []
        for url in self._servers():
            try:
                return _Listing(self._connect(url, service=True))
            except LDAPFailure as e:
                errors.append(str(e))
                self._mark_down(url)
        raise Unavailable("LDAP is unavailable: " + "; ".join(errors))

    def next_page(self, listing: _Listing, page_size: int) -> list[User]:
        """The next page of users of ``list_filter`` (empty when done)."""
        if listing.done:
            return []
        s = self.settings
        conn = listing.connection
        try:
            conn.search(s.base_dn, s.list_filter, SUBTREE, attributes=s.attributes,
                        paged_size=page_size, paged_cookie=listing.cookie)
        except (LDAPException, OSError) as e:
            raise Unavailable("LDAP listing failed: %s" % _reason(e))
        code = conn.result.get("result", 0)
        if code == 32:
            listing.done = True
            return []
        if code != 0:
            raise Unavailable("LDAP listing failed: %s" % _why(conn))
        controls = conn.result.get("controls") or {}
        cookie = controls.get(PAGED_RESULTS, {}).get("value", {}).get("cookie")
        listing.cookie = cookie or None
        listing.done = not cookie
        users = []
        for entry in conn.response or ():
            if entry.get("type") != "searchResEntry":
                continue
            user = user_of_entry(s, entry)
            if user is not None:
                users.append(user)
        conn.response = None
        return users

    def close_listing(self, listing: _Listing) -> None:
        """Abandon the listing (if unfinished) and close its connection."""
        if not listing.done and listing.cookie:
            try:
                # A zero-size page with the cookie tells the server to drop it.
                listing.connection.search(self.settings.base_dn, self.settings.list_filter,
                                          SUBTREE, attributes=["1.1"], paged_size=0,
                                          paged_cookie=listing.cookie)
            except (LDAPException, OSError):
                pass
        self._forget(listing.connection)

    def ping(self) -> bool:
        """True if a server answers a search for the base entry."""

        def read_base(conn: Connection) -> bool:
            conn.search(self.settings.base_dn, "(objectClass=*)", "BASE", attributes=["1.1"])
            code = conn.result.get("result", 0)
            if code in TRANSIENT_RESULTS:
                raise LDAPFailure(_why(conn))
            return True

        return self._run("search", read_base)

    def check_server(self, url: str) -> str:
        """Connect to the one server ``url`` as the service account (StartTLS
        if set) and read the base entry: what was found, or LDAPFailure
        saying why not. For the health checks, one server at a time."""
        conn = self._connect(url, service=True)
        try:
            s = self.settings
            detail = "%s: bound as %s" % (url, s.bind_dn or "anonymous")
            if s.base_dn:
                if not conn.search(s.base_dn, "(objectClass=*)", "BASE", attributes=["1.1"]):
                    raise LDAPFailure("%s: base DN %s: %s" % (url, s.base_dn, _why(conn)))
                detail += ", base DN %s found" % s.base_dn
            return detail
        finally:
            self._forget(conn)


def _close(conn: Connection) -> None:
    """Unbind and close ``conn``, whatever state it is in.

    A connection whose ``open()`` failed (refused, timed out) is not bound,
    so ``unbind()`` leaves alone the socket ldap3 made for it: close it here.
    """
    try:
        conn.unbind()
    except Exception:
        pass
    sock = getattr(conn, "socket", None)
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass



def _two_at_most(conn: Connection, base_dn: str, query: str,
                 attributes: list[str]) -> list[dict[str, Any]]:
    """The entries (two at most: one is the answer, two say it is not unique)."""
    conn.search(base_dn, query, SUBTREE, attributes=attributes, size_limit=2)
    code = conn.result.get("result", 0)
    if code == 32:  # noSuchObject: the base is not there, so nobody is
        return []
    if code not in (0, 4):  # 4: sizeLimitExceeded, which size_limit=2 asks for
        raise LDAPFailure(_why(conn))
    return [e for e in conn.response or () if e.get("type") == "searchResEntry"]

def _why(conn: Connection) -> str:
    result = conn.result or {}
    parts = [str(result.get("description") or "error"), str(result.get("result", ""))]
    if result.get("message"):
        parts.append(str(result["message"]))
    return " ".join(p for p in parts if p)


def _reason(error: BaseException) -> str:
    return ("%s: %s" % (type(error).__name__, error)).splitlines()[0][:300]


@implementer(IUserSource)
class LDAPUserSource:
    """IUserSource over :class:`LDAPClient`, every call in the LDAP thread pool."""

    name = "ldap"
    log = Logger()

    def __init__(self, client: LDAPClient, reactor: IReactorFromThreads, pool: ThreadPool) -> None:
        self.client = client
        self.reactor = reactor
        self.pool = pool

    def _call(self, function: Callable[..., T], *args: Any) -> "Deferred[T]":
        return deferToThreadPool(self.reactor, self.pool, function, *args)

    def find(self, login: str) -> "Deferred[User | None]":
        """The LDAP user with this login, or None; Unavailable if LDAP is down."""
        return self._call(self.client.find, login)

    def find_by(self, attribute: str, value: str) -> "Deferred[User | None]":
        """The one user whose ``attribute`` is ``value``, or None."""
        return self._call(self.client.find_by, attribute, value)

    def attribute_of(self, login: str, attribute: str) -> "Deferred[str | None]":
        """The first value of ``attribute`` of the user ``login``, or None."""
        return self._call(self.client.attribute_of, login, attribute)

    def authenticate(self, login: str, password: str) -> "Deferred[User | None]":
        """The user if binding as their entry with ``password`` works."""
        if not password or not login:
            return succeed(None)
        return self._call(self.client.authenticate, login, password)

    def ping(self) -> "Deferred[bool]":
        """Fires with True when a server answers."""
        return self._call(self.client.ping)

    def catch_up(self) -> "Deferred[None]":
        """Nothing to follow: every question goes to the server."""
        return succeed(None)

    async def pages(self, page_size: int) -> AsyncIterator[list[User]]:
        """Every user of ``list_filter``, a page at a time, the next one prefetched."""
        listing = await self._call(self.client.open_listing)
        pending: Deferred[list[User]] | None = None
        try:
            pending = self._call(self.client.next_page, listing, page_size)
            while True:
                page = await pending
                pending = None
                if not listing.done:
                    pending = self._call(self.client.next_page, listing, page_size)
                if page:
                    yield page
                if pending is None:
                    return
        finally:
            if pending is not None:
                try:
                    await pending
                except Exception:
                    pass
            await self._call(self.client.close_listing, listing)


class LDAPService(ThreadPoolService):
    """Owns the LDAP thread pool and the connections its threads open.

    ``source`` is the :class:`LDAPUserSource` to put in the user chain.
    """

    name = "ldap"  # type: ignore[assignment]

    def __init__(self, reactor: IReactorFromThreads, settings: LDAPSection,
                 threads: int | None = None) -> None:
        super().__init__(settings.pool_size if threads is None else threads, "mailhub-ldap")
        self.client = LDAPClient(settings)
        self.source = LDAPUserSource(self.client, reactor, self.pool)

    @classmethod
    def from_config(cls, reactor: IReactorFromThreads,
                    section: LDAPSection) -> "LDAPService | None":
        """The service for ``[ldap]``, or None when ``url`` is empty (no LDAP)."""
        if not section.url.strip():
            return None
        return cls(reactor, section)

    def stopService(self) -> None:
        """Stop the pool (its threads finish first), then close their connections."""
        super().stopService()
        self.client.close_all()

