"""The embedded CardDAV store: Radicale, in process, at ``/dav/``.

With ``[carddav] url = embedded`` (the default) a newcomer needs no other
server: collected contacts live under ``{[mailhub] data}/dav`` and any CardDAV
client (Thunderbird, DAVx5, Apple Contacts) syncs them from
``{site_url}/dav/{login}/collected/`` with the user's own mailhub login and
password.

Pieces:

- :func:`radicale_app`: a ``radicale.Application`` configured with
  ``remote_user`` authentication (Radicale trusts ``REMOTE_USER``, which only
  :class:`Guard` sets) and ``owner_only`` rights (each user sees only
  ``/{login}/...``);
- :class:`Guard`: WSGI middleware that checks the Basic credentials against the
  site's :class:`~mailhub.directory.interfaces.IUserSource`. WSGI runs in a
  worker thread, so it calls back into the reactor with
  ``blockingCallFromThread`` (which blocks only that worker); on the reactor
  side every check is the site's one password login (:mod:`mailhub.auth`):
  throttled, counted (``mailhub_auth_failures_total{surface="dav"}``) and
  published as ``login:success`` / ``login:failure`` (source ``dav``). Successful logins are
  remembered for ten seconds (keyed by an HMAC of login and password under a
  per-process key), so a syncing client's burst of requests pays one password
  check; :meth:`Guard.invalidate` forgets them when a site user changes;
- :class:`EmbeddedDAV`: the Service owning the thread pool, handing out the
  ``/dav/`` resource (for the site) and an in-process HTTP client (for the
  collector).

How the collector authenticates: it does not go through HTTP at all. Its
in-process client calls the Radicale application directly (in the same
thread pool) with ``REMOTE_USER`` set to the first path segment, i.e. the user
whose book it writes; Radicale's ``owner_only`` rights still apply. No
service password exists, so none can leak, and the ``/dav/`` mount accepts
only users' own credentials.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import secrets
import threading
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import unquote, urlsplit

import attrs
import radicale
from cachetools import TTLCache
import radicale.config
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import blockingCallFromThread, deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource, Resource
from twisted.web.wsgi import WSGIResource

from mailhub.auth import Auth, Throttle
from mailhub.directory.model import User
from mailhub.errors import Unavailable
from mailhub.logs import route_radicale_logging
from mailhub.metrics import Metrics
from mailhub.web.common import parse_basic

#: Base URL the collector uses for the embedded store (never resolved: the
#: in-process client ignores scheme and host).
EMBEDDED_URL = "http://mailhub.embedded/dav/"
REALM = "mailhub CardDAV"

StartResponse = Callable[..., Any]


def radicale_app(folder: Path) -> Any:
    """A Radicale WSGI application storing under ``folder``, trusting REMOTE_USER."""
    folder.mkdir(parents=True, exist_ok=True)
    route_radicale_logging()
    configuration = radicale.config.load()
    configuration.update({
        "auth": {"type": "remote_user", "delay": "0"},
        "rights": {"type": "owner_only"},
        # Radicale keeps the state of the book for every sync token it hands
        # out; the collector syncs at every lookup (see collector.mirror), so
        # a week (not 30 days) bounds what accumulates. A client that has not
        # synced for a week reads its books again.
        # Radicale goes over every card of a book for each PUT of a new card
        # (no other card may have its UID) and each sync-collection; by
        # default it reads and hashes each card's file to check its cache
        # entry. Checked by the file's size and modification time instead,
        # a write no longer reads the whole book from disk (issue 14,
        # doc/performance: "The collector as books grow").
        "storage": {"filesystem_folder": str(folder), "max_sync_token_age": "604800",
                    "use_mtime_and_size_for_item_cache": "True"},
        "web": {"type": "none"},
        "server": {"delay_on_error": "0"},
    }, "mailhub embedded CardDAV", privileged=True)
    return radicale.Application(configuration)


def _fix_text(environ: dict[str, Any], key: str) -> None:
    # PEP 3333 hands paths over as latin-1-decoded bytes; Radicale wants text.
    value = environ.get(key)
    if isinstance(value, str):
        try:
            environ[key] = value.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            pass


class Guard:
    """WSGI middleware: Basic credentials checked by mailhub, REMOTE_USER for Radicale.

    It runs in a WSGI worker thread. A login not in the success cache makes
    one hop to the reactor (``blockingCallFromThread``) where :meth:`check`
    runs the site's password login there (:meth:`mailhub.auth.Auth.login`,
    surface ``dav``): the throttle's wait (a Deferred on ``clock``: the
    worker waits, the reactor does not), the user source, the counters and
    the ``login:success`` / ``login:failure`` events (source ``dav``). A
    wait longer than ``max_wait`` is refused at once: it would hold a worker
    thread that the collector shares.

    The success cache maps an HMAC of (login, password) under a per-process
    random key to the canonical login: never a password, nor anything a
    password can be recovered from without the key, which never leaves
    memory. An entry lives ``ttl`` seconds and :meth:`invalidate` drops them
    all (call it when a site user's profile or password changes); a check
    that began before an invalidation does not store its answer.
    """

    log = Logger()

    def __init__(self, app: Any, users: Any, reactor: Any, ttl: float = 10.0,
                 size: int = 1000, *, hub: Any = None, metrics: Metrics | None = None,
                 clock: IReactorTime | None = None, throttle: Throttle | None = None,
                 max_wait: float = 2.0, auth: Auth | None = None) -> None:
        self._app = app
        self._users = users
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        if auth is None:
            auth = Auth(self._clock, metrics if metrics is not None else Metrics(), hub,
                        throttle)
        self._auth = auth
        self._max_wait = max_wait
        self._ttl = ttl
        self._size = size
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._generation = 0
        #: HMAC of (login, password) -> (canonical login, when stored), for
        #: ``ttl`` seconds on the reactor's clock, the least recently used
        #: dropped beyond ``size``.
        self._logins: TTLCache[bytes, tuple[str, float]] = TTLCache(maxsize=max(size, 1), ttl=ttl,
                                                      timer=self._clock.seconds)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        _fix_text(environ, "PATH_INFO")
        _fix_text(environ, "SCRIPT_NAME")
        for key in ("REMOTE_USER", "HTTP_X_REMOTE_USER", "HTTP_REMOTE_USER",
                    "HTTP_X_SCRIPT_NAME"):
            environ.pop(key, None)
        credentials = parse_basic(environ.pop("HTTP_AUTHORIZATION", "").encode("latin-1"))
        if credentials is None:
            # No attempt was made (clients ask without credentials first): a
            # challenge, not an authentication failure.
            if environ.get("REQUEST_METHOD") == "OPTIONS":
                return self._app(environ, start_response)
            return _deny(start_response)
        client = str(environ.get("REMOTE_ADDR") or "unknown")
        try:
            login = self._login(credentials[0], credentials[1], client)
        except Unavailable:
            start_response("503 Service Unavailable",
                           [("Content-Type", "text/plain"), ("Retry-After", "5")])
            return [b"the user directory is unavailable, try again"]
        if login is None:
            return _deny(start_response)
        environ["REMOTE_USER"] = login
        return self._app(environ, start_response)

    def invalidate(self) -> None:
        """Forget every remembered login (a password or a site user changed)."""
        with self._lock:
            self._generation += 1
            self._logins.clear()

    def directory_changed(self, kind: str, key: str) -> None:
        """A change-log callback: any profile change forgets remembered logins."""
        if kind == "profile":
            self.invalidate()

    def _login(self, login: str, password: str, client: str) -> str | None:
        """The canonical login of the user these credentials are, or None.

        Runs in a WSGI worker thread.
        """
        key = hmac.new(self._key, ("%s\0%s" % (login, password)).encode("utf-8"),
                       hashlib.sha256).digest()
        now = self._clock.seconds()
        with self._lock:
            known = self._logins.get(key)
            # Stored in the future means the clock went back: check again.
            if known is not None and known[1] <= now:
                return known[0]
            generation = self._generation
        # Wait here (this worker only) for the reactor's answer.
        user: User | None = blockingCallFromThread(
            self._reactor, self.check, login, password, client)  # type: ignore[arg-type]
        if user is None:
            return None
        with self._lock:
            if generation != self._generation:
                # Invalidated while we checked: answer, but do not remember.
                return str(user.login)
            if self._size > 0 and self._ttl > 0:
                self._logins[key] = (str(user.login), now)
        return str(user.login)

    def check(self, login: str, password: str, client: str) -> "Deferred[User | None]":
        """On the reactor: throttle, verify, count and publish one attempt."""
        return Deferred.fromCoroutine(self._check(login, password, client))

    async def _check(self, login: str, password: str, client: str) -> User | None:
        return await self._auth.login("dav", self._users, login, password, client,
                                      max_wait=self._max_wait)


def _deny(start_response: StartResponse) -> list[bytes]:
    start_response("401 Unauthorized", [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("WWW-Authenticate", 'Basic realm="%s", charset="UTF-8"' % REALM)])
    return [b"authentication required"]


class DAVMount(Resource):
    """The WSGI resource, mounted under one path segment of the site.

    The site hands surfaces the whole path; this moves the mount segment into
    SCRIPT_NAME so Radicale sees ``/{login}/...`` and writes ``/dav/...`` hrefs.
    """

    isLeaf = True

    def __init__(self, wsgi: IResource, segment: bytes) -> None:
        super().__init__()
        self._wsgi = wsgi
        self._segment = segment

    def render(self, request: Any) -> Any:
        if request.postpath and request.postpath[0] == self._segment:
            request.prepath.append(request.postpath.pop(0))
        _declare_length(request)
        return self._wsgi.render(request)


def _declare_length(request: Any) -> None:
    """Give a chunked request body the Content-Length WSGI needs.

    twisted.web has already received the whole body (de-chunked, and cut at
    ``[mailhub] max_body`` by the site's request class); WSGIResource takes
    CONTENT_LENGTH from the request's header only, and Radicale reads no body
    without one: a chunked PUT was refused (400) and a chunked PROPFIND read
    as an empty one (allprop). The buffered body's size is its length.
    """
    headers = request.requestHeaders
    content = request.content
    if content is None or headers.hasHeader(b"content-length"):
        return
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    headers.removeHeader(b"transfer-encoding")
    headers.setRawHeaders(b"content-length", [b"%d" % size])


@attrs.frozen
class _Response:
    code: int
    headers: Headers
    body: bytes

    def content(self) -> Deferred[bytes]:
        return succeed(self.body)


class InProcessHTTP:
    """A treq-like client that calls the Radicale application in the thread pool.

    ``request(method, url, headers=, data=)`` answers like treq; the user is
    the first path segment after the mount, given to Radicale as REMOTE_USER.
    """

    def __init__(self, app: Any, pool: ThreadPool, reactor: Any, mount: str = "/dav") -> None:
        self._app = app
        self._pool = pool
        self._reactor = reactor
        self._mount = mount.rstrip("/")

    def request(self, method: str, url: str, headers: Headers | None = None,
                data: bytes | None = None, **kw: Any) -> Deferred[_Response]:
        return deferToThreadPool(self._reactor, self._pool, self._call, method, url,
                                 headers or Headers(), data or b"")

    def _call(self, method: str, url: str, headers: Headers, data: bytes) -> _Response:
        parts = urlsplit(url)
        path = unquote(parts.path)
        if path.startswith(self._mount + "/"):
            path = path[len(self._mount):]
        user = path.strip("/").split("/", 1)[0]
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method,
            "SCRIPT_NAME": self._mount,
            "PATH_INFO": path,
            "QUERY_STRING": parts.query,
            "SERVER_NAME": "mailhub.embedded",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
            "REMOTE_USER": user,
            "CONTENT_LENGTH": str(len(data)),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(data),
            "wsgi.errors": io.StringIO(),
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for name, values in headers.getAllRawHeaders():
            key = name.decode("latin-1").upper().replace("-", "_")
            if key == "AUTHORIZATION":
                continue
            value = ", ".join(v.decode("latin-1") for v in values)
            if key == "CONTENT_TYPE":
                environ["CONTENT_TYPE"] = value
            else:
                environ["HTTP_" + key] = value
        status: list[str] = []
        out_headers: list[tuple[str, str]] = []

        def start_response(s: str, h: list[tuple[str, str]], exc_info: Any = None) -> Any:
            status[:] = [s]
            out_headers[:] = h
            return lambda chunk: None

        chunks = self._app(environ, start_response)
        try:
            body = b"".join(chunks)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        raw = Headers()
        for header, text in out_headers:
            raw.addRawHeader(header.encode("latin-1"), text.encode("latin-1"))
        return _Response(int(status[0].split(" ", 1)[0]), raw, body)


class EmbeddedDAV(Service):
    """Owns the Radicale application and its thread pool; gives out the mount and a client."""

    name = "dav"  # type: ignore[assignment]

    def __init__(self, reactor: Any, folder: Path, users: Any, threads: int = 4,
                 segment: bytes = b"dav", *, hub: Any = None, metrics: Metrics | None = None,
                 clock: IReactorTime | None = None, throttle: Throttle | None = None,
                 auth: Auth | None = None) -> None:
        self.reactor = reactor
        self.folder = folder
        self.app = radicale_app(folder)
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name="mailhub-dav")
        self.guard = Guard(self.app, users, reactor, hub=hub, metrics=metrics, clock=clock,
                           throttle=throttle, auth=auth)
        self.segment = segment

    def directory_changed(self, kind: str, key: str) -> None:
        """Hook for the directory's change log: a profile change forgets cached logins."""
        self.guard.directory_changed(kind, key)

    def startService(self) -> None:
        self.pool.start()
        super().startService()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self.pool.stop()
        return None

    def resource(self) -> IResource:
        """The resource to mount at ``/dav/`` on the site."""
        return DAVMount(WSGIResource(self.reactor, self.pool, self.guard), self.segment)

    def http_client(self) -> InProcessHTTP:
        """The collector's client: straight into Radicale, no HTTP, no credential."""
        return InProcessHTTP(self.app, self.pool, self.reactor, "/" + self.segment.decode())

    @property
    def url(self) -> str:
        """The base URL to build the collector's BookLayout from."""
        return EMBEDDED_URL.replace("/dav/", "/%s/" % self.segment.decode())
