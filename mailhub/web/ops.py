"""Operations surface: ``/healthz``, ``/metrics`` and ``/openapi.json``.

``/healthz`` answers 200 while the process lives, with each dependency's
state; ``/healthz?ready`` answers 503 when any dependency is down, for load
balancers that should send no traffic to an instance that cannot work.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from klein import Klein
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from mailhub import __version__
from mailhub.metrics import Metrics
from mailhub.web.common import handle_errors, json_routing_errors, reply

#: A dependency check: fires with (ok, detail) or fails (counted as not ok).
Check = Callable[[], "Deferred[tuple[bool, str]] | Awaitable[tuple[bool, str]] | tuple[bool, str]"]


def _run(check: Check) -> "Deferred[tuple[bool, str]]":
    def call() -> Any:
        result = check()
        if hasattr(result, "__await__") and not isinstance(result, Deferred):
            return Deferred.fromCoroutine(result)  # type: ignore[arg-type]
        return result
    return maybeDeferred(call)


class Operations:
    """Liveness, metrics and the API description."""

    app = Klein()
    json_routing_errors(app)

    def __init__(self, metrics: Metrics, checks: dict[str, Check],
                 openapi: Callable[[], dict[str, Any]]) -> None:
        self.metrics = metrics
        self.checks = checks
        self.openapi = openapi

    def resource(self) -> IResource:
        return self.app.resource()  # type: ignore[no-any-return]

    @app.route("/healthz", methods=["GET", "HEAD"])
    @handle_errors
    async def healthz(self, request: IRequest) -> bytes:
        names = sorted(self.checks)
        results = await DeferredList([_run(self.checks[n]) for n in names], consumeErrors=True)
        state: dict[str, dict[str, Any]] = {}
        healthy = True
        for name, (succeeded, value) in zip(names, results):
            if succeeded:
                ok, detail = value
            else:
                ok, detail = False, value.getErrorMessage()  # type: ignore[attr-defined]
            healthy = healthy and bool(ok)
            state[name] = {"ok": bool(ok), "detail": detail}
        body = {"status": "ok" if healthy else "degraded", "version": __version__,
                "dependencies": state}
        query = request.uri.partition(b"?")[2]
        ready = any(part.partition(b"=")[0] == b"ready" for part in query.split(b"&"))
        return reply(request, body, 503 if (ready and not healthy) else 200)

    @app.route("/metrics", methods=["GET"])
    def metrics_page(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return self.metrics.exposition()

    @app.route("/openapi.json", methods=["GET"])
    @handle_errors
    async def openapi_document(self, request: IRequest) -> bytes:
        return reply(request, self.openapi())
