"""The one twisted.web Site: bounded request bodies, a JSON root, per-route metrics.

:class:`Root` hands each request to the surface that owns its first path
segment, unchanged (Klein sees the whole path), answers JSON 404s for the
rest, and times every request for ``/metrics``. :class:`LimitedRequest`
refuses bodies above ``[mailhub] max_body`` with a JSON 413 without keeping
them: the bytes past the limit are read from the socket and dropped.

:class:`MailhubSite` bounds connections: a client has ``header_timeout``
seconds to send a request's headers (a slow-header client cannot hold a
socket), at most ``max_connections`` are open (at the cap, the connection
that has waited longest for its headers makes room, else the new one is
closed), and the last ``health_reserve`` of them serve only ``/healthz``, so
a health check gets through when the site is full. Its access log hides
``token``, ``password`` and ``pass`` query parameters.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from mailhub.logs import access_log_formatter
from mailhub.metrics import Metrics
from mailhub.web.common import json_bytes


#: Methods counted under their own name; any other is counted as "other".
KNOWN_METHODS = frozenset([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS",
                           b"PROPFIND", b"PROPPATCH", b"REPORT", b"MKCOL", b"MOVE", b"COPY",
                           b"LOCK", b"UNLOCK"])


class LimitedRequest(Request):
    """A request whose body may not exceed ``channel.site.max_body`` bytes."""

    too_large = False
    _received = 0

    def _limit(self) -> int:
        try:
            return self.channel.site.max_body  # type: ignore[attr-defined, no-any-return]
        except AttributeError:  # made by another Site, or its channel is gone
            return 1024 * 1024

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self.too_large = True
            length = 0  # keep nothing of it
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self._limit():
            self.too_large = True
            if self.content is not None:
                self.content.seek(0)
                self.content.truncate()
            return
        super().handleContentChunk(data)

    def finish(self) -> None:
        super().finish()
        observed = getattr(self, "mailhub_observed", None)
        if observed is not None:
            observed[0].finished(self)

    def process(self) -> None:
        if getattr(self.channel, "reserved", False) and self.path not in HEALTH_PATHS:
            # Accepted on a connection kept for health checks: the site is full.
            self.channel.site.dropped("reserve")  # type: ignore[attr-defined]
            self._refuse(503, "too many connections, try again", {b"retry-after": b"1"})
            return
        if self.too_large:
            self._refuse(413, "request body larger than %d bytes" % self._limit())
            return
        super().process()

    def _refuse(self, status: int, message: str,
                headers: dict[bytes, bytes] | None = None) -> None:
        """Answer before any surface sees the request, in the shape of the
        surface its path belongs to (``Root.shape_errors``), and close."""
        root = getattr(getattr(self.channel, "site", None), "resource", None)
        shape = root.error_shape(self.path) if isinstance(root, Root) else site_error_body
        self.setResponseCode(status)
        self.setHeader(b"content-type", b"application/json; charset=utf-8")
        for name, value in (headers or {}).items():
            self.setHeader(name, value)
        self.setHeader(b"connection", b"close")
        self.write(shape(status, message))
        self.finish()


#: Paths answered on the connections kept in reserve for health checks.
HEALTH_PATHS = frozenset([b"/healthz"])


class MailhubChannel(HTTPChannel):
    """An HTTP connection that must send each request's headers in time.

    The deadline runs from the connection (or the end of the previous
    response) until the request's headers are complete; the idle timeout of
    twisted.web restarts at every byte, so it does not stop a client that
    sends one byte at a time.
    """

    site: "MailhubSite"
    #: Accepted from the reserve: serves health checks only.
    reserved = False
    _deadline: IDelayedCall | None = None
    #: Between the end of a response (or the connection) and the next
    #: request's complete headers.
    _waiting = False
    _gone = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_deadline()

    def allHeadersReceived(self) -> None:
        self._stop_deadline()
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        if self.persistent and not self._gone:
            self._start_deadline()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = True
        self._cancel_deadline()
        self.site.connection_closed(self)
        super().connectionLost(reason)

    def drop(self) -> None:
        """Close at once: too slow, or making room for another connection."""
        self._cancel_deadline()
        _abort(self.transport)

    def _start_deadline(self) -> None:
        self._waiting = True
        if self._deadline is not None and self._deadline.active():
            # Moved later, not cancelled and made anew: on a keep-alive
            # connection this happens for every request, and a reset to a
            # later time costs the reactor no reordering of its calls.
            self._deadline.reset(self.site.header_timeout)
        else:
            self._deadline = self.callLater(self.site.header_timeout, self._too_slow)
        self.site.waiting_for_headers(self)

    def _stop_deadline(self) -> None:
        """The headers are in: the deadline stays scheduled and finds nothing to do."""
        self._waiting = False
        self.site.headers_done(self)

    def _cancel_deadline(self) -> None:
        self._waiting = False
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None
        self.site.headers_done(self)

    def _too_slow(self) -> None:
        self._deadline = None
        if not self._waiting:
            return  # the headers came in time; the next wait schedules anew
        self.site.headers_done(self)
        self.site.dropped("header_timeout")
        _abort(self.transport)


class _Refused(Protocol):
    """A connection the site has no room for: closed as soon as it is made."""

    def connectionMade(self) -> None:
        _abort(self.transport)


def _abort(transport: Any) -> None:
    """Close without waiting for the peer to read what is pending."""
    if transport is not None:
        getattr(transport, "abortConnection", transport.loseConnection)()


class MailhubSite(Site):
    """The Site with mailhub's request class, body limit and connection bounds."""

    requestFactory = LimitedRequest
    # The port logs "MailhubSite starting on PORT"; "Starting factory <...
    # object at 0x...>" says nothing more.
    noisy = False
    # HTTP/1.1 only: the HTTP/2 negotiation wrapper is private to twisted.web
    # (and HTTP/2 needs TLS with ALPN, which mailhub leaves to its proxy).
    protocol = MailhubChannel  # type: ignore[assignment]

    def __init__(self, root: IResource, max_body: int, *, max_connections: int = 800,
                 health_reserve: int = 16, header_timeout: float = 15.0,
                 metrics: Metrics | None = None, **kw: Any) -> None:
        # Surfaces parse their own bodies (common.form_fields); twisted.web's
        # parse would be done twice, and it answers a malformed multipart
        # body with an empty, non-JSON 400.
        kw.setdefault("parsePOSTFormSubmission", False)
        kw.setdefault("logFormatter", access_log_formatter)
        super().__init__(root, **kw)
        if not 0 <= health_reserve < max_connections:
            raise ValueError("health_reserve must be smaller than max_connections")
        self.max_body = max_body
        self.max_connections = max_connections
        self.health_reserve = health_reserve
        self.header_timeout = header_timeout
        self.connections: set[MailhubChannel] = set()
        # Insertion-ordered: the first is the one that has waited longest.
        self._awaiting: dict[MailhubChannel, None] = {}
        metrics = metrics if metrics is not None else Metrics()
        self._open = metrics.gauge("mailhub_http_connections", "HTTP connections open")
        self._dropped = metrics.counter(
            "mailhub_http_connections_dropped_total",
            "HTTP connections cut by the connection bounds, by reason (full, evicted, "
            "header_timeout) and requests refused on the health-check reserve (reserve)",
            ["reason"])

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.connections) >= self.max_connections:
            if not self._awaiting:
                self.dropped("full")
                # Every connection is busy: close this one. (Not None: a
                # wrapping factory, TLS's, would wrap it.)
                return _Refused()
            oldest = next(iter(self._awaiting))
            self.dropped("evicted")
            self.connection_closed(oldest)
            oldest.drop()
        channel = super().buildProtocol(addr)
        channel.reserved = len(self.connections) >= self.max_connections - self.health_reserve
        self.connections.add(channel)
        self._open.set(len(self.connections))
        return channel

    def dropped(self, reason: str) -> None:
        """Count a connection (or a request) cut by the bounds, for ``reason``."""
        self._dropped.labels(reason).inc()

    def waiting_for_headers(self, channel: MailhubChannel) -> None:
        """``channel`` waits for a request's headers (it may be evicted)."""
        if channel in self.connections:
            self._awaiting.pop(channel, None)
            self._awaiting[channel] = None

    def headers_done(self, channel: MailhubChannel) -> None:
        """``channel`` has its request's headers (or is gone)."""
        self._awaiting.pop(channel, None)

    def connection_closed(self, channel: MailhubChannel) -> None:
        """Forget ``channel``: its slot is free."""
        self.connections.discard(channel)
        self._awaiting.pop(channel, None)
        self._open.set(len(self.connections))


#: Makes the JSON body of an error answered by the site itself, from the
#: HTTP status and the reason.
ErrorShape = Callable[[int, str], bytes]


def site_error_body(status: int, message: str) -> bytes:
    """The site's own error shape, ``{"error": reason}``."""
    return json_bytes({"error": message})


@implementer(IResource)
class _NotFound:
    isLeaf = True

    def __init__(self, shape_for: Callable[[bytes], ErrorShape] | None = None) -> None:
        self._shape_for = shape_for

    def render(self, request: Any) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        shape = self._shape_for(request.path) if self._shape_for else site_error_body
        return shape(404, "no such resource: %s" % request.path.decode("utf-8", "replace"))

    def getChildWithDefault(self, name: bytes, request: Any) -> "_NotFound":
        return self

    def putChild(self, path: bytes, child: IResource) -> None:  # pragma: no cover
        raise NotImplementedError


def _redirect(request: Any, location: bytes) -> bytes:
    request.setResponseCode(301)
    request.setHeader(b"location", location)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    return json_bytes({"location": location.decode("utf-8")})


class _Redirect(Resource):
    """A 301 to ``location`` for any method."""

    isLeaf = True

    def __init__(self, location: bytes) -> None:
        super().__init__()
        self._location = location

    def render(self, request: Any) -> bytes:
        return _redirect(request, self._location)


class _WellKnown(Resource):
    """``/.well-known/carddav`` (RFC 6764): a redirect to the CardDAV store."""

    isLeaf = True

    def __init__(self, dav_root: bytes, not_found: IResource) -> None:
        super().__init__()
        self._dav_root = dav_root
        self._not_found = not_found

    def render(self, request: Any) -> bytes:
        # Root hands over the whole path: [b".well-known", b"carddav"].
        if request.postpath[1:] in ([b"carddav"], [b"carddav", b""]):
            return _redirect(request, self._dav_root)
        return self._not_found.render(request)  # type: ignore[no-any-return]


class Root(Resource):
    """Dispatch on the first path segment to the surface that owns it.

    ``routes`` maps a first segment (bytes) to a resource, which sees the
    whole path, as if it were the root itself. Metrics are labelled with the
    segment, so their number stays bounded whatever clients ask for.
    """

    def __init__(self, metrics: Metrics, routes: dict[bytes, IResource] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__()
        self.routes = dict(routes or {})
        self.mounted: dict[bytes, tuple[list[bytes], IResource]] = {}
        #: (first-segment prefix, error shape), see :meth:`shape_errors`.
        self.error_shapes: list[tuple[bytes, ErrorShape]] = []
        self.not_found = _NotFound(self.error_shape)
        self._clock = clock
        self._requests = metrics.counter(
            "mailhub_http_requests_total", "HTTP requests answered, by route and status",
            ["route", "method", "status"])
        self._latency = metrics.histogram(
            "mailhub_http_request_seconds", "Time to answer HTTP requests, by route", ["route"])
        self._errors = metrics.counter(
            "mailhub_http_errors_total", "HTTP requests answered 5xx, by route", ["route"])
        self._instruments: dict[tuple[str, bytes, int], tuple[Any, Any, Any]] = {}
        #: Where the embedded CardDAV store is mounted ("/dav/"), or None.
        self.dav_root: bytes | None = None

    def serve_dav_discovery(self, dav_root: bytes) -> None:
        """RFC 6764 discovery of the CardDAV store at ``dav_root``.

        ``/.well-known/carddav`` (any method) and a PROPFIND on ``/`` are
        redirected (301, as Radicale does) to ``dav_root``, where the store
        answers ``current-user-principal`` to an authenticated client.
        """
        self.dav_root = dav_root
        self.mount(b".well-known", _WellKnown(dav_root, self.not_found))

    def shape_errors(self, prefix: bytes, shape: ErrorShape) -> None:
        """Answer the site's own errors in ``shape`` for paths whose first
        segment starts with ``prefix``: the 404 of an unknown path, and the
        413 and 503 refused before any surface sees the request. So a surface
        with an error shape of its own (the hooks: ``/gs-*``) keeps it for
        every error a client of it can meet."""
        self.error_shapes.append((prefix, shape))

    def error_shape(self, path: bytes) -> ErrorShape:
        """The error shape for a request path (the site's, unless a surface set one)."""
        first = path.split(b"?", 1)[0].lstrip(b"/").split(b"/", 1)[0]
        for prefix, shape in self.error_shapes:
            if first.startswith(prefix):
                return shape
        return site_error_body

    def mount(self, segment: bytes, resource: IResource) -> None:
        """Hand requests whose first segment is ``segment`` to ``resource``,
        which sees the whole path."""
        self.routes[segment] = resource

    def mount_at(self, path: str, resource: IResource) -> None:
        """Hand requests for ``path`` (and below) to ``resource``, which sees
        the path relative to it (``/``), as Klein apps mounted as children do.
        """
        segments = [s.encode("utf-8") for s in path.strip("/").split("/")]
        self.mounted[segments[0]] = (segments[1:], resource)

    def getChildWithDefault(self, name: bytes, request: Any) -> IResource:
        route = "/" + name.decode("utf-8", "replace")
        mounted = self.mounted.get(name)
        if mounted is not None:
            rest, resource = mounted
            if request.postpath[:len(rest)] == rest:
                for _ in rest:
                    request.prepath.append(request.postpath.pop(0))
                if not request.postpath:
                    # "/mailstore" is the surface's "/", not a redirect to "/mailstore/".
                    request.postpath.append(b"")
                self._observe(request, "/" + b"/".join([name, *rest]).decode("utf-8", "replace"))
                return resource
        target = self.routes.get(name)
        if name == b"" and request.postpath == [] and self.dav_root is not None \
                and request.method == b"PROPFIND":
            # CardDAV clients given only the host ask "/" for their principal.
            target = _Redirect(self.dav_root)
            route = "/"
        if target is None:
            target = self.not_found
            route = "other"
        # Let the surface see the whole path: undo the traversal of this segment.
        request.postpath.insert(0, request.prepath.pop())
        self._observe(request, route)
        return target

    def render(self, request: Any) -> bytes:
        self._observe(request, "/")
        return self.not_found.render(request)

    def _observe(self, request: Any, route: str) -> None:
        request.mailhub_observed = (self, route, self._clock())
        if not isinstance(request, LimitedRequest):
            # Requests made by other Sites (tests' StubTreq) have no finish hook.
            request.notifyFinish().addBoth(lambda _: self.finished(request))

    def finished(self, request: Any) -> None:
        """Count a request that has been answered (called once per request)."""
        _, route, started = request.mailhub_observed
        method = request.method if request.method in KNOWN_METHODS else b"other"
        key = (route, method, request.code)
        instruments = self._instruments.get(key)
        if instruments is None:
            # Labelled children are looked up once per (route, method, status).
            instruments = self._instruments[key] = (
                self._requests.labels(route=route, method=method.decode("ascii"),
                                      status=str(request.code)),
                self._latency.labels(route=route),
                self._errors.labels(route=route) if request.code >= 500 else None)
        count, latency, errors = instruments
        count.inc()
        latency.observe(self._clock() - started)
        if errors is not None:
            errors.inc()
