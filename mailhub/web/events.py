"""``/api/v1/events``: a user's own mail and contact events, as Server-Sent Events.

:class:`EventStream` gives each authenticated user their own events (mail and
contacts) as ``text/event-stream``, with keep-alive comments, event ids and
``Last-Event-ID`` resumption from a bounded buffer.
"""

from __future__ import annotations

import secrets
from collections import deque
from typing import Any, Iterable

import attrs
from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from mailhub.auth import Auth, PasswordLogin, requires
from mailhub.config import Config
from mailhub.directory.model import User, normalise_email
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.push import TOPICS
from mailhub.web.common import HTTPError, handle_errors, json_bytes, json_routing_errors

EVENTS_REALM = "mailhub events"

#: Bytes an event stream may queue for a client that does not read before
#: it is ended (the client reconnects with Last-Event-ID).
MAX_UNREAD = 256 * 1024
#: Event streams one user may hold open at once.
MAX_STREAMS_PER_USER = 16

#: Topics an event stream carries: every push topic and collected contacts.
STREAM_TOPICS: tuple[str, ...] = TOPICS + ("contacts:contact:add",)


def _event_keys(data: Any) -> frozenset[str]:
    """Who an event is about: normalised logins/addresses and ``id:`` ids."""
    keys: set[str] = set()

    def add(value: Any) -> None:
        if isinstance(value, str) and value.strip():
            keys.add(normalise_email(value))
            keys.add("id:" + value)

    if isinstance(data, dict):
        user = data.get("user")
        if isinstance(user, dict):
            for name in ("login", "email", "preferredEmail", "id", "_id"):
                add(user.get(name))
            emails = user.get("emails")
            if isinstance(emails, list):
                for email in emails:
                    add(email)
        else:
            add(user)
        add(data.get("bookHome"))
    return frozenset(keys)


def _user_keys(user: User) -> frozenset[str]:
    keys = {normalise_email(user.login)} | {normalise_email(e) for e in user.emails}
    if user.id:
        keys.add("id:" + user.id)
    return frozenset(keys)


@attrs.define
class _Buffered:
    """One event as kept for streaming: encoded only when someone reads it."""

    seq: int
    topic: str
    data: Any
    _keys: frozenset[str] | None = None
    encoded: bytes | None = None

    @property
    def keys(self) -> frozenset[str]:
        """Who the event is about, worked out when a stream first asks."""
        if self._keys is None:
            self._keys = _event_keys(self.data)
        return self._keys

    def frame(self, epoch: bytes) -> bytes | None:
        if self.encoded is None:
            try:
                payload = json_bytes(self.data)
            except (TypeError, ValueError):
                return None
            self.encoded = b"id: %s-%d\nevent: %s\ndata: %s\n\n" % (
                epoch, self.seq, self.topic.encode("utf-8"), payload)
        return self.encoded


@attrs.define(eq=False)
class _Client:
    request: IRequest
    user: User
    keys: frozenset[str]
    done: Deferred[None]
    keepalive: LoopingCall | None = None
    #: Bytes written while the transport asked us to pause (the client is
    #: not reading); past MAX_UNREAD the stream is ended.
    unread: int = 0
    paused: bool = False

    # IPushProducer, registered on the request: the transport tells us when
    # the client stops reading.
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.unread = 0

    def stopProducing(self) -> None:
        if not self.done.called:
            self.done.callback(None)


class EventStream:
    """``/api/v1/events``: a user's own push and contact events, as Server-Sent Events.

    Users authenticate with Basic credentials against ``user_source`` (an
    :class:`~mailhub.directory.interfaces.IUserSource`) through ``auth``
    (:class:`mailhub.auth.Auth`: the site's one throttle, metric and login
    events; a private one when not given). An event goes to a
    user when its ``user`` is their login or one of their addresses
    (``contacts:contact:add`` also by user id). Ids are ``EPOCH-SEQ``, where
    EPOCH is drawn when this stream starts: ``Last-Event-ID`` resumes from the
    last ``config.push.sse_buffer`` events of this process; an id this
    process cannot resume from (another instance, a restart, too old) gets an
    ``event: reset`` telling the client to reload its state.
    """

    app = Klein()
    json_routing_errors(app)
    log = Logger()

    def __init__(self, config: Config, hub: Hub, metrics: Metrics, user_source: Any,
                 clock: IReactorTime, auth: Auth | None = None) -> None:
        self._settings = config.push
        self._hub = hub
        self._users = user_source
        self._clock = clock
        self._epoch = secrets.token_hex(4)
        self._epoch_bytes = self._epoch.encode("ascii")
        self._seq = 0
        self._buffer: deque[_Buffered] = deque(maxlen=self._settings.sse_buffer)
        self._by_key: dict[str, set[_Client]] = {}
        self._clients: set[_Client] = set()
        #: Streams open per login (checked at each open: a scan of every
        #: stream would cost O(streams) per open, O(n^2) to open n).
        self._per_user: dict[str, int] = {}
        auth = auth if auth is not None else Auth(clock, metrics, hub)
        self._login = PasswordLogin(auth, "events", user_source, EVENTS_REALM)
        self._sent = metrics.counter("mailhub_sse_events_total",
                                     "Events written to event streams")
        metrics.gauge_callback("mailhub_sse_clients", "Open event streams",
                               lambda: len(self._clients))
        # One subscription for every topic: over RabbitMQ one queue bound to
        # each topic's exchange, so events from other instances keep their
        # publication order across topics (doc/push.rst).
        self._subscribed = True
        self._hub.global_.subscribe_topics(STREAM_TOPICS, self._on_event)

    def resource(self) -> IResource:
        """The Klein resource to mount at the root of the site."""
        return self.app.resource()

    def clients(self) -> int:
        """Event streams open now."""
        return len(self._clients)

    def close(self) -> None:
        """Unsubscribe and end every open stream (on shutdown)."""
        if self._subscribed:
            self._hub.global_.unsubscribe_topics(STREAM_TOPICS, self._on_event)
            self._subscribed = False
        for client in list(self._clients):
            if not client.done.called:
                client.done.callback(None)

    # -- the endpoint ------------------------------------------------------

    @app.route("/api/v1/events", methods=["GET"])
    @handle_errors
    @requires("_login")
    async def events(self, request: IRequest, user: User) -> None:
        """Stream the authenticated user's events until they disconnect."""
        if self._per_user.get(user.login, 0) >= MAX_STREAMS_PER_USER:
            raise HTTPError(429, {"error": "too many event streams open for this user"},
                            {b"retry-after": b"30"})
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        client = _Client(request, user, _user_keys(user), Deferred())
        request.registerProducer(client, True)  # type: ignore[attr-defined]
        request.write(b"retry: 5000\n: connected\n\n")
        last = request.getHeader(b"last-event-id")
        if last is not None:
            self._replay(client, last)
        self._clients.add(client)
        self._per_user[user.login] = self._per_user.get(user.login, 0) + 1
        for key in client.keys:
            self._by_key.setdefault(key, set()).add(client)

        def ended(_: object) -> None:
            if not client.done.called:
                client.done.callback(None)

        request.notifyFinish().addBoth(ended)  # type: ignore[attr-defined]
        client.keepalive = LoopingCall(self._ping, client)
        client.keepalive.clock = self._clock
        client.keepalive.start(self._settings.keepalive, now=False)
        try:
            await client.done
        except CancelledError:
            pass  # Klein cancels the handler when the client goes away.
        finally:
            self._forget(client)
        return None

    # -- events ------------------------------------------------------------

    def _on_event(self, topic: str, data: Any) -> None:
        self._seq += 1
        item = _Buffered(self._seq, topic, data)
        self._buffer.append(item)
        if self._by_key:  # with no stream open, nobody needs to know whom it is about
            for client in self._matching(item.keys):
                self._write(client, item)

    def _matching(self, keys: Iterable[str]) -> set[_Client]:
        found: set[_Client] = set()
        for key in keys:
            found |= self._by_key.get(key, set())
        return found

    def _replay(self, client: _Client, last: bytes) -> None:
        epoch, _, seq_text = last.decode("ascii", "replace").strip().partition("-")
        try:
            seq = int(seq_text)
        except ValueError:
            seq = -1
        oldest = self._buffer[0].seq if self._buffer else self._seq + 1
        if epoch != self._epoch or seq < 0 or seq > self._seq or seq < oldest - 1:
            client.request.write(b'event: reset\ndata: {"reason":"cannot resume from '
                                 b'this id: reload your state"}\n\n')
            return
        for item in self._buffer:
            if item.seq > seq and item.keys & client.keys:
                self._write(client, item)

    def _write(self, client: _Client, item: _Buffered) -> None:
        if client.done.called:
            return
        frame = item.frame(self._epoch_bytes)
        if frame is None:
            self.log.warn("event on {topic} is not JSON, not streamed", topic=item.topic)
            return
        self._send(client, frame)
        self._sent.inc()

    def _ping(self, client: _Client) -> None:
        if not client.done.called:
            self._send(client, b": keepalive\n\n")

    def _send(self, client: _Client, data: bytes) -> None:
        """Write to a stream; end it when its client has stopped reading."""
        if client.paused:
            client.unread += len(data)
            if client.unread > MAX_UNREAD:
                self.log.info("event stream of {user} ended: the client is not reading",
                              user=client.user.login)
                client.done.callback(None)
                return
        client.request.write(data)

    def _forget(self, client: _Client) -> None:
        if client.keepalive is not None and client.keepalive.running:
            client.keepalive.stop()
        try:
            client.request.unregisterProducer()  # type: ignore[attr-defined]
        except Exception:
            pass  # the connection is already gone
        if client in self._clients:
            self._clients.discard(client)
            left = self._per_user.get(client.user.login, 1) - 1
            if left > 0:
                self._per_user[client.user.login] = left
            else:
                self._per_user.pop(client.user.login, None)
        for key in client.keys:
            found = self._by_key.get(key)
            if found is not None:
                found.discard(client)
                if not found:
                    del self._by_key[key]

