"""Dovecot's push notifications in: the OX and Lua drivers' receiver.

:class:`PushReceiver` answers Dovecot's two drivers:

- ``/preliminary/http-notify/v1/notify`` (PUT, POST): the OX driver, answered
  ``{"success": true}`` as OX App Suite does;
- ``/push/v1/notify`` (POST, PUT): mailhub's Lua script
  (``contrib/dovecot/mailhub-push.lua``), other Lua scripts' form bodies too.

Both answer at once and publish afterwards: decoded events are handed to a
bounded :class:`~mailhub.pubsub.relay.Relay`, which publishes them on
``hub.local`` first, then on ``hub.global_`` (in-process subscribers such as
the collector's mail source, this process's event streams, other nodes).
When the relay has no room the request gets 503 with ``Retry-After``, which
Dovecot retries, so overload never queues without bound nor slows delivery
down.

The events reach web clients through :mod:`mailhub.web.events`.
"""

from __future__ import annotations

from typing import Any, Callable

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from zope.interface import implementer

from mailhub.auth import Auth, StaticBasic
from mailhub.config import Config
from mailhub.errors import ValidationError
from mailhub.logs import printable
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.pubsub.relay import Relay
from mailhub.push import PushEvent, decode_lua, decode_ox
from mailhub.web.common import (
    HTTPError,
    json_bytes,
    json_routing_errors,
    read_body,
    reply,
    reply_encoded,
    unauthorized,
)

PUSH_REALM = "mailhub push"

#: What a full queue asks Dovecot to wait before retrying (seconds).
RETRY_AFTER = b"1"


#: OX App Suite's answer, whatever the count (encoded once: it is every delivery's).
_OX_ANSWER = json_bytes({"success": True})


def _ox_answer(count: int) -> bytes:
    return _OX_ANSWER


def _lua_answer(count: int) -> bytes:
    return json_bytes({"success": True, "events": count})


class PushReceiver:
    """The HTTP surface Dovecot's push drivers talk to.

    ``config.push`` gives the Basic credentials (``username``, ``password``),
    the body limit (``max_body``) and the queue size (``queue``, counted in
    requests). With neither username nor password set every request is
    refused with 401, unless ``allow_loopback`` is yes: then requests from
    loopback peers are accepted without credentials. The credentials are
    checked by :class:`mailhub.auth.StaticBasic` (surfaces ``push-ox`` and
    ``push-lua``, one throttle key for both), synchronously: accepting a
    delivery costs no Deferred.

    After the answer, each request's events go to a
    :class:`~mailhub.pubsub.relay.Relay` of ``config.push.queue`` requests,
    which publishes them in process first, then on the global pubsub, whose
    outbox keeps them while the broker is away. Once the relay is full too,
    new requests get 503, which Dovecot retries. Nothing accepted is dropped
    while there is room.
    """

    app = Klein()
    json_routing_errors(app)
    log = Logger()

    def __init__(self, config: Config, hub: Hub, metrics: Metrics,
                 reactor: IReactorTime, auth: Auth | None = None) -> None:
        self._settings = config.push
        self._hub = hub
        self._reactor = reactor
        self._relay = Relay(hub, reactor, self._settings.queue, metrics, "push")
        self._requests = metrics.counter(
            "mailhub_push_requests_total", "Push notifications answered, by driver and status",
            ["driver", "status"])
        auth = auth if auth is not None else Auth(reactor, metrics, hub)
        self._credentials = {
            driver: StaticBasic(auth, "push-" + driver, "service:push",
                                self._settings.username, self._settings.password,
                                PUSH_REALM, allow_loopback=self._settings.allow_loopback)
            for driver in ("ox", "lua")}
        self._counters: dict[tuple[str, int], Any] = {}

    def resource(self) -> IResource:
        """The resource to mount at the root of the site (it sees the whole path).

        PUT and POST on the two notify paths go straight to the synchronous
        handlers (no routing table, no Deferred: the receiver's rate is
        bounded by twisted.web, not by the framework); every other request
        goes to the Klein app, which routes the same paths to the same
        handlers and answers 404 and 405.
        """
        return _Direct(self, self.app.resource())

    def pending(self) -> int:
        """Requests accepted whose events are not yet all handed to the pubsub."""
        return self._relay.pending()

    def stop(self) -> Deferred[None]:
        """Publish whatever is still accepted (on shutdown): :meth:`Relay.stop`."""
        return self._relay.stop()

    # -- the endpoints ------------------------------------------------------

    @app.route("/preliminary/http-notify/v1/notify", methods=["PUT", "POST"])
    async def ox(self, request: IRequest) -> bytes:
        """Dovecot's OX driver: one ``messageNew`` per delivered message."""
        return self.handle_ox(request)

    @app.route("/push/v1/notify", methods=["POST", "PUT"])
    async def lua(self, request: IRequest) -> bytes:
        """mailhub's Lua script (every event of a transaction), or a form body."""
        return self.handle_lua(request)

    def handle_ox(self, request: IRequest) -> bytes:
        """Answer one OX driver request, synchronously: ``{"success": true}``."""
        return self._handle(request, "ox", decode_ox, _ox_answer)

    def handle_lua(self, request: IRequest) -> bytes:
        """Answer one Lua script request, synchronously."""
        return self._handle(request, "lua", decode_lua, _lua_answer)

    def _handle(self, request: IRequest, driver: str,
                decode: Callable[[bytes], list[PushEvent]],
                answer: Callable[[int], bytes]) -> bytes:
        # Synchronous on purpose: nothing here waits, so no Deferred is made
        # (the hot path of every delivery). Errors map as handle_errors does.
        try:
            body = reply_encoded(request, answer(self._accept(request, driver, decode)))
        except HTTPError as e:
            body = reply(request, e.body, e.status, e.headers)
        except ValidationError as e:
            body = reply(request, {"error": e.messages[0], "messages": e.messages}, 400)
        except Exception:
            self.log.failure("unhandled error in {path}", path=request.path)
            body = reply(request, {"error": "internal error"}, 500)
        code: int = request.code  # type: ignore[attr-defined]
        counter = self._counters.get((driver, code))
        if counter is None:
            counter = self._counters[(driver, code)] = self._requests.labels(driver, str(code))
        counter.inc()
        return body

    def _accept(self, request: IRequest, driver: str,
                decode: Callable[[bytes], list[PushEvent]]) -> int:
        self._authorize(request, driver)
        body = read_body(request, self._settings.max_body)
        if not self._relay.has_room():
            raise HTTPError(503, {"error": "push queue full, retry later"},
                            {b"retry-after": RETRY_AFTER})
        try:
            events = decode(body)
        except ValidationError as e:
            self.log.info("refused a {driver} push notification: {reason}",
                          driver=driver, reason=printable(e.messages[0]))
            raise
        self._relay.hand_over(events)
        return len(events)

    def _authorize(self, request: IRequest, driver: str) -> None:
        # Wrong credentials are answered at once: the throttle's slots bound
        # how many are checked, so Dovecot's deliveries never wait on them.
        if self._credentials[driver].check(request) is not None:
            raise unauthorized(PUSH_REALM)


@implementer(IResource)
class _Direct:
    """The receiver's resource: the notify paths directly, the rest through Klein."""

    isLeaf = True

    def __init__(self, receiver: PushReceiver, klein: IResource) -> None:
        self._routes = {
            b"/preliminary/http-notify/v1/notify": receiver.handle_ox,
            b"/push/v1/notify": receiver.handle_lua,
        }
        self._klein = klein

    def render(self, request: IRequest) -> Any:
        handler = self._routes.get(request.path)
        if handler is not None and request.method in (b"PUT", b"POST"):
            return handler(request)
        return self._klein.render(request)

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:
        return self  # a leaf: never asked, but IResource wants it

    def putChild(self, path: bytes, child: IResource) -> None:
        raise NotImplementedError("the push receiver has no children")
