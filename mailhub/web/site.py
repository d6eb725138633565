"""The one twisted.web Site: bounded request bodies, a JSON root, per-route metrics.

:class:`Root` hands each request to the surface that owns its first path
segment, unchanged (Klein sees the whole path), answers JSON 404s for the
rest, and times every request for ``/metrics``. :class:`LimitedRequest`
refuses bodies above ``[mailhub] max_body`` with a JSON 413 without keeping
them: the bytes past the limit are read from the socket and dropped.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

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
        if self.too_large:
            self.setResponseCode(413)
            self.setHeader(b"content-type", b"application/json; charset=utf-8")
            self.setHeader(b"connection", b"close")
            self.write(json_bytes({"error": "request body larger than %d bytes" % self._limit()}))
            self.finish()
            return
        super().process()


class MailhubSite(Site):
    """The Site with mailhub's request class and body limit."""

    requestFactory = LimitedRequest

    def __init__(self, root: IResource, max_body: int, **kw: Any) -> None:
        # Surfaces parse their own bodies (common.form_fields); twisted.web's
        # parse would be done twice, and it answers a malformed multipart
        # body with an empty, non-JSON 400.
        kw.setdefault("parsePOSTFormSubmission", False)
        super().__init__(root, **kw)
        self.max_body = max_body


@implementer(IResource)
class _NotFound:
    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return json_bytes({"error": "no such resource: %s" % request.path.decode("utf-8", "replace")})

    def getChildWithDefault(self, name: bytes, request: Any) -> "_NotFound":
        return self

    def putChild(self, path: bytes, child: IResource) -> None:  # pragma: no cover
        raise NotImplementedError


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
        self.not_found = _NotFound()
        self._clock = clock
        self._requests = metrics.counter(
            "mailhub_http_requests_total", "HTTP requests answered, by route and status",
            ["route", "method", "status"])
        self._latency = metrics.histogram(
            "mailhub_http_request_seconds", "Time to answer HTTP requests, by route", ["route"])
        self._errors = metrics.counter(
            "mailhub_http_errors_total", "HTTP requests answered 5xx, by route", ["route"])
        self._instruments: dict[tuple[str, bytes, int], tuple[Any, Any, Any]] = {}

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
