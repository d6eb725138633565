"""Operations surface: ``/healthz``, ``/metrics`` and ``/openapi.json``.

``/healthz`` answers 200 while the process lives, with each dependency's
state; ``/healthz?ready`` answers 503 when any dependency is down, for load
balancers that should send no traffic to an instance that cannot work.

``/metrics`` and ``/openapi.json`` tell a caller how the site is built and
used: with ``[mailhub] ops_user`` and ``ops_password`` they need those Basic
credentials (:func:`ops_credentials`), and with ``[mailhub] ops_listen`` they
are served only on that address (``mailhub.tap`` mounts them there).
``/healthz`` stays open, on both, for load balancers.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from klein import Klein
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from mailhub import __version__
from mailhub.auth import Auth, Checker, StaticBasic, requires
from mailhub.checks import Check, Row, run_checks
from mailhub.config import MailhubSection
from mailhub.metrics import Metrics
from mailhub.web.common import handle_errors, json_routing_errors, reply

#: What one run of the checks found: each check with its rows.
Results = list[tuple[Check, list[Row]]]

#: The realm of the operations endpoints' Basic credentials.
REALM = "mailhub operations"

#: The paths that only operations tools need (``/healthz`` is not one: load
#: balancers probe it on the main port).
OPS_ONLY = (b"metrics", b"openapi.json")


class Open:
    """The checker of operations endpoints without credentials: anyone may ask."""

    async def authorise(self, request: IRequest) -> None:
        """Accept every request."""
        return None


def ops_credentials(settings: MailhubSection, auth: Auth) -> Checker:
    """What ``/metrics`` and ``/openapi.json`` require: ``[mailhub] ops_user``
    and ``ops_password`` as Basic credentials (surface ``ops``), or nothing
    when they are not set."""
    if not settings.ops_user:
        return Open()
    return StaticBasic(auth, "ops", "service:ops", settings.ops_user, settings.ops_password,
                       REALM)


class Operations:
    """Liveness, metrics and the API description.

    ``checks`` are the process's health checks (:func:`mailhub.checks.make_checks`),
    the same that ``mailhub check`` runs; each becomes one entry of
    ``dependencies``, its rows' details joined. ``credentials`` guard
    ``/metrics`` and ``/openapi.json`` (default: :class:`Open`).
    ``/healthz`` needs no credentials, so requests that arrive while the
    checks run share that run, and its results answer for :attr:`reuse`
    seconds: a flood of requests costs the database, LDAP and CardDAV one
    probe a second.
    """

    app = Klein()
    json_routing_errors(app)

    #: Seconds the results of one run of the checks answer /healthz.
    reuse = 1.0

    def __init__(self, metrics: Metrics, checks: Sequence[Check],
                 openapi: Callable[[], dict[str, Any]], clock: IReactorTime,
                 credentials: Checker | None = None) -> None:
        self.metrics = metrics
        self._credentials = credentials if credentials is not None else Open()
        self.checks = list(checks)
        self.openapi = openapi
        self.clock = clock
        self._latest: tuple[float, Results] | None = None
        self._waiting: list[Deferred[Results]] = []

    def _results(self) -> Deferred[Results]:
        """The latest results if fresh, else those of the run under way or a new one."""
        if self._latest is not None and self.clock.seconds() - self._latest[0] < self.reuse:
            return succeed(self._latest[1])
        d: Deferred[Results] = Deferred()
        self._waiting.append(d)
        if len(self._waiting) == 1:
            run = Deferred.fromCoroutine(run_checks(self.checks, self.clock))
            run.addBoth(self._ran)
        return d

    def _ran(self, results: "Results | Failure") -> None:
        if not isinstance(results, Failure):
            self._latest = (self.clock.seconds(), results)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if isinstance(results, Failure):
                d.errback(results)
            else:
                d.callback(results)

    def resource(self) -> IResource:
        return self.app.resource()  # type: ignore[no-any-return]

    @app.route("/healthz", methods=["GET", "HEAD"])
    @handle_errors
    async def healthz(self, request: IRequest) -> bytes:
        state: dict[str, dict[str, Any]] = {}
        healthy = True
        for check, rows in await self._results():
            ok = check.healthy(rows)
            healthy = healthy and ok
            state[check.name] = {"ok": ok, "detail": "; ".join(r.detail for r in rows)}
            if check.figures is not None:
                state[check.name].update(check.figures())
        body = {"status": "ok" if healthy else "degraded", "version": __version__,
                "dependencies": state}
        query = request.uri.partition(b"?")[2]
        ready = any(part.partition(b"=")[0] == b"ready" for part in query.split(b"&"))
        return reply(request, body, 503 if (ready and not healthy) else 200)

    @app.route("/metrics", methods=["GET"])
    @handle_errors
    @requires("_credentials")
    async def metrics_page(self, request: IRequest, _: None) -> bytes:
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return self.metrics.exposition()

    @app.route("/openapi.json", methods=["GET"])
    @handle_errors
    @requires("_credentials")
    async def openapi_document(self, request: IRequest, _: None) -> bytes:
        return reply(request, self.openapi())
