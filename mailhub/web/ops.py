"""Operations surface: ``/healthz``, ``/metrics`` and ``/openapi.json``.

``/healthz`` answers 200 while the process lives, with each dependency's
state; ``/healthz?ready`` answers 503 when any dependency is down, for load
balancers that should send no traffic to an instance that cannot work.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from mailhub import __version__
from mailhub.checks import Check, run_checks
from mailhub.metrics import Metrics
from mailhub.web.common import handle_errors, json_routing_errors, reply


class Operations:
    """Liveness, metrics and the API description.

    ``checks`` are the process's health checks (:func:`mailhub.checks.make_checks`),
    the same that ``mailhub check`` runs; each becomes one entry of
    ``dependencies``, its rows' details joined.
    """

    app = Klein()
    json_routing_errors(app)

    def __init__(self, metrics: Metrics, checks: Sequence[Check],
                 openapi: Callable[[], dict[str, Any]], clock: IReactorTime) -> None:
        self.metrics = metrics
        self.checks = list(checks)
        self.openapi = openapi
        self.clock = clock

    def resource(self) -> IResource:
        return self.app.resource()  # type: ignore[no-any-return]

    @app.route("/healthz", methods=["GET", "HEAD"])
    @handle_errors
    async def healthz(self, request: IRequest) -> bytes:
        state: dict[str, dict[str, Any]] = {}
        healthy = True
        for check, rows in await run_checks(self.checks, self.clock):
            ok = check.healthy(rows)
            healthy = healthy and ok
            state[check.name] = {"ok": ok, "detail": "; ".join(r.detail for r in rows)}
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
