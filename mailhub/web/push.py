"""Dovecot's push notifications in: the OX and Lua drivers' receiver.

:class:`PushReceiver` answers Dovecot's two drivers:

- ``/preliminary/http-notify/v1/notify`` (PUT, POST): the OX driver, answered
  ``{"success": true}`` as OX App Suite does;
- ``/push/v1/notify`` (POST, PUT): mailhub's Lua script
  (``contrib/dovecot/mailhub-push.lua``), other Lua scripts' form bodies too.

Both answer at once and publish afterwards: decoded events go into a bounded
queue that the reactor drains (``hub.local`` first, then ``hub.global_``, so
in-process subscribers such as the collector's mail source see them as well
as other nodes). A full queue answers 503 with ``Retry-After``, which Dovecot
retries, so overload never queues without bound nor slows delivery down.

The events reach web clients through :mod:`mailhub.web.events`.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
from collections import deque
from typing import Any, Callable

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from zope.interface import implementer

from mailhub.config import Config
from mailhub.errors import Unavailable, ValidationError
from mailhub.logs import printable
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
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

#: In-process publications whose subscribers have not finished (a subscriber
#: may return a Deferred) before the drain stops taking more from the queue.
#: Publications to the broker are bounded by its outbox instead.
MAX_IN_FLIGHT = 256
#: Seconds before events that found the AMQP outbox full are offered again.
OUTBOX_RETRY = 0.5
#: Seconds a shutdown goes on offering such events to the outbox.
STOP_WAIT = 5.0
#: Requests taken from the queue per reactor turn, so answering new requests
#: interleaves with publishing.
DRAIN_BATCH = 100
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

    After the answer, each request's events are published in process first
    (event streams, the collector's mail source), then handed to the global
    pubsub, whose outbox keeps them while the broker is away. When that
    outbox is full, the events wait here, counted in the queue, and are
    offered again every :data:`OUTBOX_RETRY` seconds; once the queue is full
    too, new requests get 503, which Dovecot retries. Nothing accepted is
    dropped while there is room.
    """

    app = Klein()
    json_routing_errors(app)
    log = Logger()

    def __init__(self, config: Config, hub: Hub, metrics: Metrics,
                 reactor: IReactorTime) -> None:
        self._settings = config.push
        self._hub = hub
        self._reactor = reactor
        #: Accepted, not yet published in process.
        self._queue: deque[list[PushEvent]] = deque()
        #: Published in process, waiting for room in the broker's outbox.
        self._outgoing: deque[list[PushEvent]] = deque()
        self._drain_call: Any = None
        self._outgoing_call: Any = None
        self._in_flight = 0
        self._requests = metrics.counter(
            "mailhub_push_requests_total", "Push notifications answered, by driver and status",
            ["driver", "status"])
        self._auth_failures = metrics.counter(
            "mailhub_push_auth_failures_total",
            "Push requests refused for missing or wrong credentials", ["driver"])
        self._published = metrics.counter(
            "mailhub_push_events_total", "Push events published, by topic", ["topic"])
        self._publish_errors = metrics.counter(
            "mailhub_push_publish_errors_total", "Push events whose publication failed",
            ["topic"])
        metrics.gauge_callback("mailhub_push_queue_length",
                               "Push requests accepted and not yet published",
                               self.pending)
        self._warned_open = False
        self._counters: dict[tuple[str, int], Any] = {}
        self._published_by_topic: dict[str, Any] = {}
        self._local_only = hub.global_ is hub.local
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
        return len(self._queue) + len(self._outgoing)

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
        if self.pending() >= self._settings.queue:
            raise HTTPError(503, {"error": "push queue full, retry later"},
                            {b"retry-after": RETRY_AFTER})
        try:
            events = decode(body)
        except ValidationError as e:
            self.log.info("refused a {driver} push notification: {reason}",
                          driver=driver, reason=printable(e.messages[0]))
            raise
        if events:
            self._queue.append(events)
            self._schedule()
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

    # -- publishing, after the answer --------------------------------------

    def _schedule(self) -> None:
        if self._drain_call is None and self._queue and self._in_flight < MAX_IN_FLIGHT:
            self._drain_call = self._reactor.callLater(0, self._drain)

    def _drain(self) -> None:
        self._drain_call = None
        budget = DRAIN_BATCH
        while self._queue and budget and self._in_flight < MAX_IN_FLIGHT:
            budget -= 1
            self._hand_over(self._queue.popleft())
        self._send_outgoing()
        self._schedule()

    def _hand_over(self, events: list[PushEvent]) -> None:
        """Publish one request's events in process, and line them up for the broker."""
        for event in events:
            self._publish_local(event)
        if not self._local_only:
            self._outgoing.append(events)

    def _publish_local(self, event: PushEvent) -> None:
        """Publish in process; without a broker that is the whole publication."""
        try:
            d = self._hub.local.topic(event.topic).publish(event.data)
        except Exception:
            self._publish_failed(Failure(), event.topic)
            return
        if d.called and not isinstance(getattr(d, "result", None), Failure):
            # Fired already (plain subscribers): no callbacks needed.
            if self._local_only:
                self._count_published(event.topic)
            return
        self._in_flight += 1

        def finished(result: object) -> None:
            self._in_flight -= 1
            if isinstance(result, Failure):
                self._publish_failed(result, event.topic)
            elif self._local_only:
                self._count_published(event.topic)
            self._schedule()

        d.addBoth(finished)

    def _send_outgoing(self) -> None:
        """Hand waiting events to the global pubsub, in order, while its outbox takes them."""
        if self._outgoing_call is not None:
            return  # the outbox was full: wait for the retry
        global_: Any = self._hub.global_
        while self._outgoing:
            events = self._outgoing[0]
            while events:
                event = events[0]
                try:
                    d = global_.topic(event.topic).publish(event.data)
                except Exception:
                    self._publish_failed(Failure(), event.topic)
                    events.pop(0)
                    continue
                if d.called and isinstance(getattr(d, "result", None), Failure) and \
                        d.result.check(Unavailable):
                    # The outbox is full (the broker has been away long): keep
                    # the event here, in order, and offer it again soon.
                    d.addErrback(lambda _: None)
                    self._outgoing_call = self._reactor.callLater(OUTBOX_RETRY, self._retry)
                    return
                events.pop(0)
                d.addCallbacks(self._confirmed, self._publish_failed,
                               callbackArgs=(event.topic,), errbackArgs=(event.topic,))
            self._outgoing.popleft()

    def _retry(self) -> None:
        self._outgoing_call = None
        self._send_outgoing()

    def _confirmed(self, _: object, topic: str) -> None:
        self._count_published(topic)

    def _publish_failed(self, failure: Failure, topic: str) -> None:
        """Count and log a publication that failed (in process, or refused by the broker)."""
        self._publish_errors.labels(topic).inc()
        self.log.failure("publishing {topic} failed", failure, topic=topic)

    def _count_published(self, topic: str) -> None:
        counter = self._published_by_topic.get(topic)
        if counter is None:
            counter = self._published_by_topic[topic] = self._published.labels(topic)
        counter.inc()

    def stop(self) -> Deferred[None]:
        """Publish whatever is still queued (on shutdown) and stop draining.

        Events waiting for room in the broker's outbox are offered to it for
        up to :data:`STOP_WAIT` seconds more (the broker is still connected
        then); what it cannot take by then is counted and logged as a
        publication error.
        """
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        self._drain_call = None
        while self._queue:
            self._hand_over(self._queue.popleft())
        self._send_outgoing()
        return Deferred.fromCoroutine(self._flush())

    async def _flush(self) -> None:
        waited = 0.0
        while self._outgoing and waited < STOP_WAIT:
            await deferLater(self._reactor, OUTBOX_RETRY, lambda: None)
            waited += OUTBOX_RETRY
        if self._outgoing_call is not None and self._outgoing_call.active():
            self._outgoing_call.cancel()
        self._outgoing_call = None
        if self._outgoing:
            lost = [event for events in self._outgoing for event in events]
            for event in lost:
                self._publish_errors.labels(event.topic).inc()
            self.log.error("stopping with the AMQP outbox full: {count} push events were "
                           "not published", count=len(lost))
            self._outgoing.clear()


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
