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

import base64
import hmac
import ipaddress
from typing import Any, Callable

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from zope.interface import implementer

from mailhub.config import Config
from mailhub.errors import ValidationError
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.pubsub.relay import Relay
from mailhub.push import PushEvent, decode_lua, decode_ox
from mailhub.web.common import (
    HTTPError,
    basic_credentials,
    json_bytes,
    json_routing_errors,
    read_body,
    reply,
    reply_encoded,
    same_secret,
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


def same_bytes(given: bytes, expected: bytes) -> bool:
    """Constant-time comparison of two byte strings."""
    return hmac.compare_digest(given, expected)


def _is_loopback(request: IRequest) -> bool:
    host = getattr(request.getClientAddress(), "host", None)
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


class PushReceiver:
    """The HTTP surface Dovecot's push drivers talk to.

    ``config.push`` gives the Basic credentials (``username``, ``password``),
    the body limit (``max_body``) and the queue size (``queue``, counted in
    requests). With neither username nor password set every request is
    refused with 401, unless ``allow_loopback`` is yes: then requests from
    loopback peers are accepted without credentials.

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
                 reactor: IReactorTime) -> None:
        self._settings = config.push
        self._hub = hub
        self._reactor = reactor
        self._relay = Relay(hub, reactor, self._settings.queue, metrics, "push")
        self._requests = metrics.counter(
            "mailhub_push_requests_total", "Push notifications answered, by driver and status",
            ["driver", "status"])
        self._auth_failures = metrics.counter(
            "mailhub_push_auth_failures_total",
            "Push requests refused for missing or wrong credentials", ["driver"])
        self._warned_open = False
        self._counters: dict[tuple[str, int], Any] = {}
        self._expected_header = b"Basic " + base64.b64encode(
            ("%s:%s" % (self._settings.username, self._settings.password)).encode("utf-8"))

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
                          driver=driver, reason=e.messages[0])
            raise
        self._relay.hand_over(events)
        return len(events)

    def _authorize(self, request: IRequest, driver: str) -> None:
        username, password = self._settings.username, self._settings.password
        if not username or not password:
            if self._settings.allow_loopback and _is_loopback(request):
                return
            if not self._warned_open:
                self._warned_open = True
                self.log.warn("push request refused: set [push] username and password "
                              "(or allow_loopback = yes)")
            self._auth_failures.labels(driver).inc()
            raise unauthorized(PUSH_REALM)
        header = request.getHeader(b"authorization")
        if header is not None and same_bytes(header, self._expected_header):
            return  # the exact header Dovecot sends: no decoding needed
        given = basic_credentials(request)
        # Both compared every time, in constant time, so timing tells nothing.
        good = given is not None
        user_ok = same_secret(given[0] if given else "", username)
        password_ok = same_secret(given[1] if given else "", password)
        if not (good and user_ok and password_ok):
            self._auth_failures.labels(driver).inc()
            self.log.info("push request with bad credentials from {client}",
                          client=getattr(request.getClientAddress(), "host", "?"))
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
