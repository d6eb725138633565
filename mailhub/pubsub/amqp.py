"""The global pubsub over RabbitMQ (AMQP 0-9-1, txamqp), ESN-compatible.

:class:`Broker` is the one reconnecting connection of a mailhub process: a
``ClientService`` with ``backoffPolicy()``, heartbeats on, whose
``prepareConnection`` authenticates, opens a publisher channel in confirm mode
and a control channel for declarations, then lets each user of the connection
(:class:`GlobalPubSub`, :class:`~mailhub.pubsub.workqueue.WorkQueue`) set its
channels up again. Publications go through the broker's
:class:`~mailhub.pubsub.outbox.Outbox` (bounded, confirmed, kept across
reconnections).

:class:`GlobalPubSub` speaks ESN's wire format: one durable fanout exchange per
topic, named as the topic; JSON text bodies; routing key ``''``; each
subscription has its own queue bound to that exchange. ESN's queues are
server-named, exclusive and auto-delete, so they die with the connection and
a subscriber misses what is published until it is back; mailhub's are named
per subscription and expire (``x-expires``) only after
:data:`SUBSCRIPTION_EXPIRES` without a consumer, so a subscription that comes
back after a cut connection gets what was published meanwhile. Exchanges are
declared exactly as OpenPaaS declares them
(amqplib's ``assertExchange(topic, 'fanout')``, whose default is
``durable: true``), so both can share a topic without PRECONDITION_FAILED.
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import unquote, urlsplit

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred, DeferredList, TimeoutError as DeferredTimeout, fail, maybeDeferred, succeed,
)
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from txamqp.client import ChannelClosed, Closed, TwistedDelegate
from txamqp.content import Content
from txamqp.protocol import AMQClient
from txamqp.queue import Closed as QueueClosed
from zope.interface import Attribute, Interface, implementer

from mailhub.errors import ConfigError, Unavailable
from mailhub.metrics import Metrics
from mailhub.pubsub.frames import pack_frame, unpack_frame
from mailhub.pubsub.outbox import IPublishChannel, Outbox, Refused, Route

RABBIT_SPEC = "/usr/share/amqp/specs/0-9-1-rabbit/amqp0-9-1.stripped.extended.xml"
JSON_PROPERTIES = {"content-type": "application/json", "delivery-mode": 2}
encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

_specs: dict[str, Any] = {}


def load_spec(path: str) -> Any:
    """Load the AMQP 0-9-1 XML spec txamqp needs, or raise ConfigError.

    Publisher confirms need RabbitMQ's ``confirm`` class, which Debian's plain
    0-9-1 file lacks: when ``path`` has no such class, the RabbitMQ-extended
    file of the same amqp-specs package (``0-9-1-rabbit/``) is used instead.
    """
    if path in _specs:
        return _specs[path]
    import txamqp.spec

    if not os.path.isfile(path):
        raise ConfigError(
            "[amqp] spec: %s not found: install Debian's amqp-specs package "
            "or set [amqp] spec to an AMQP 0-9-1 XML file" % path)
    try:
        spec = txamqp.spec.load(path)
    except Exception as e:
        raise ConfigError("[amqp] spec: %s is not an AMQP spec file: %s" % (path, e))
    if "confirm" not in spec.classes.byname:
        extended = Path(path).parent.parent / "0-9-1-rabbit" / "amqp0-9-1.stripped.extended.xml"
        if not extended.is_file():
            raise ConfigError(
                "[amqp] spec: %s lacks RabbitMQ's confirm class: set [amqp] spec to %s "
                "(Debian's amqp-specs package)" % (path, RABBIT_SPEC))
        spec = load_spec(str(extended))
    _specs[path] = spec
    return spec


@attrs.frozen
class BrokerAddress:
    """Where and how to connect, parsed from ``[amqp] url``."""

    host: str
    port: int
    username: str
    password: str = attrs.field(repr=False)
    vhost: str
    tls: bool

    @classmethod
    def from_url(cls, url: str) -> "BrokerAddress":
        """Parse ``amqp[s]://user:password@host:port/vhost`` (RabbitMQ's URI spec)."""
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps"):
            raise ConfigError("[amqp] url: expected amqp://user:password@host:port/vhost")
        tls = parts.scheme == "amqps"
        try:
            port = parts.port or (5671 if tls else 5672)
        except ValueError:
            raise ConfigError("[amqp] url: bad port")
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        return cls(host=parts.hostname or "localhost", port=port,
                   username=unquote(parts.username or "guest"),
                   password=unquote(parts.password or "guest"),
                   vhost=vhost, tls=tls)

    def endpoint(self, reactor: Any, timeout: float = 30) -> Any:
        tcp = HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)
        if self.tls:
            return wrapClientTLS(optionsForClientTLS(self.host), tcp)
        return tcp


@implementer(IStreamClientEndpoint)
class _Watched:
    """An endpoint that tells ``failed`` why a connection attempt failed
    (ClientService retries without saying)."""

    def __init__(self, endpoint: Any, failed: Callable[[Failure], None]) -> None:
        self._endpoint = endpoint
        self._failed = failed

    def connect(self, factory: Any) -> Deferred[Any]:
        def failed(failure: Failure) -> Failure:
            self._failed(failure)
            return failure

        return self._endpoint.connect(factory).addErrback(failed)  # type: ignore[no-any-return]


class _Delegate(TwistedDelegate):
    """txamqp's delegate, plus a connection name and publisher confirms."""

    def __init__(self, connection_name: str) -> None:
        super().__init__()
        self.connection_name = connection_name

    def connection_start(self, ch: Any, msg: Any) -> None:
        ch.connection_start_ok(
            client_properties={
                "connection_name": self.connection_name, "product": "mailhub",
                "capabilities": {"publisher_confirms": True, "basic.nack": True,
                                 "consumer_cancel_notify": True,
                                 "authentication_failure_close": True}},
            mechanism=self.client.mechanism, response=self.client.response,
            locale=self.client.locale)

    def basic_ack(self, ch: Any, msg: Any) -> None:
        self.client.confirmed(ch, msg.delivery_tag, msg.multiple, True)

    def basic_nack(self, ch: Any, msg: Any) -> None:
        self.client.confirmed(ch, msg.delivery_tag, msg.multiple, False)

    def basic_cancel(self, ch: Any, msg: Any) -> None:
        # The broker cancelled one of our consumers (its queue was deleted,
        # or a cluster node holding it went away): start afresh, which
        # declares every queue again and consumes from it.
        self.client.consumer_cancelled(ch, msg.consumer_tag)


class _Client(AMQClient):
    """An AMQClient that tells its session about confirms and channel failures."""

    session: "Session | None" = None

    def attach_session(self, session: "Session") -> None:
        # A method, not an attribute write: ClientService hands
        # prepareConnection a proxy that forwards calls but not assignments.
        self.session = session

    def confirmed(self, channel: Any, tag: int, multiple: bool, ok: bool) -> None:
        if self.session is not None:
            self.session.confirmed(channel, tag, multiple, ok)

    def channel_failed(self, channel: Any, reason: Any) -> None:
        if self.session is not None:
            self.session.channel_failed(channel, reason)

    def consumer_cancelled(self, channel: Any, tag: str) -> None:
        Session.log.warn("the broker cancelled AMQP consumer {tag}; reconnecting", tag=tag)
        self.transport.loseConnection()

    # Bodies as bytes and complete header tables: see mailhub.pubsub.frames.
    def _unpack_frame(self, data: bytes) -> Any:
        return unpack_frame(self.spec, self.FRAME_END, data)

    def _pack_frame(self, frame: Any) -> bytes:
        return pack_frame(self.spec, self.FRAME_END, frame)


class _Factory(Factory):
    def __init__(self, spec: Any, vhost: str, heartbeat: int, clock: Any, name: str) -> None:
        self.spec = spec
        self.vhost = vhost
        self.heartbeat = heartbeat
        self.clock = clock
        self.name = name

    def buildProtocol(self, addr: Any) -> _Client:
        return _Client(_Delegate(self.name), vhost=self.vhost, spec=self.spec,
                       heartbeat=self.heartbeat, clock=self.clock)


def _reply_text(error: Exception) -> str:
    reason = error.args[0] if error.args else error
    if isinstance(reason, Failure):
        return reason.getErrorMessage() or reason.type.__name__
    code = getattr(reason, "reply_code", None)
    text = getattr(reason, "reply_text", None)
    if code is not None:
        return "%s %s" % (code, text)
    return str(reason)


class Session:
    """One live AMQP connection: its channels and declarations.

    A new Session is made for every connection; users keep per-session state
    and drop it when :meth:`Broker` reports the session lost.
    """

    log = Logger()

    def __init__(self, client: _Client, outbox: Outbox) -> None:
        self.client = client
        self.outbox = outbox
        self.publish_channel: Any = None
        self._control: Any = None
        self.lost = False
        self.closing = False

    async def open_channel(self) -> Any:
        """A new open channel, with the lowest free id."""
        channel_id = 1
        while channel_id in self.client.channels:
            channel_id += 1
        channel = await self.client.channel(channel_id)
        await channel.channel_open()
        return channel

    def forget_channel(self, channel: Any) -> None:
        """Free a closed channel's id for reuse."""
        if self.client.channels.get(channel.id) is channel:
            del self.client.channels[channel.id]

    async def close_channel(self, channel: Any) -> None:
        """Close a channel we opened (consumer cancelled)."""
        try:
            await channel.channel_close(reply_code=200, reply_text="bye",
                                        class_id=0, method_id=0)
        except Closed:
            pass
        channel.close(None)
        self.forget_channel(channel)

    async def start(self) -> None:
        self.publish_channel = await self.open_channel()
        await self.publish_channel.confirm_select()
        self._control = await self.open_channel()

    async def _on_control(self, call: Callable[[Any], Awaitable[Any]]) -> Any:
        """Run one declaration on the control channel; a refusal closes only it."""
        if self._control is None or self._control.closed:
            self._control = await self.open_channel()
        channel = self._control
        try:
            return await call(channel)
        except ChannelClosed as e:
            self.forget_channel(channel)
            self._control = None
            raise Refused(_reply_text(e))

    async def declare_exchange(self, name: str) -> None:
        """A durable fanout exchange, exactly as OpenPaaS declares its topics."""
        await self._on_control(lambda ch: ch.exchange_declare(
            exchange=name, type="fanout", durable=True))

    async def delete_queue(self, name: str) -> None:
        """Delete a queue (gone already is fine)."""
        await self._on_control(lambda ch: ch.queue_delete(queue=name))

    async def declare_route(self, route: Route) -> None:
        """Everything a publication on ``route`` needs on the broker."""
        if route.exchange:
            await self.declare_exchange(route.exchange)
        if route.queue:
            queue = route.queue
            await self._on_control(lambda ch: ch.queue_declare(queue=queue, durable=True))
            if route.exchange:
                exchange = route.exchange
                await self._on_control(lambda ch: ch.queue_bind(
                    queue=queue, exchange=exchange, routing_key=""))

    def confirmed(self, channel: Any, tag: int, multiple: bool, ok: bool) -> None:
        if channel is not self.publish_channel or self.lost:
            return
        if ok:
            self.outbox.ack(tag, multiple)
        else:
            self.outbox.nack(tag, multiple)

    def channel_failed(self, channel: Any, reason: Any) -> None:
        """The broker closed a channel other than the control one.

        Consumers and the publisher cannot carry on with a half-dead
        connection: drop it, and the ClientService connects again, setting
        everything up afresh (unacked messages are redelivered).
        """
        if channel is self._control or self.closing or self.lost:
            return  # our own shutdown, or the connection is already gone
        self.log.error("the broker closed AMQP channel {id}: {reason}; reconnecting",
                       id=channel.id, reason=_reply_text(reason.value))
        self.client.transport.loseConnection()


def _ignore(failure: Any) -> None:
    return None


@implementer(IPublishChannel)
class _PublishChannel:
    """The outbox's view of a session's confirm-mode channel."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def declare(self, route: Route) -> Deferred[None]:
        return Deferred.fromCoroutine(self.session.declare_route(route))

    def publish(self, route: Route, body: bytes, properties: dict[str, Any]) -> None:
        d = self.session.publish_channel.basic_publish(
            exchange=route.exchange, routing_key=route.routing_key,
            content=Content(body, properties=properties))
        # A closed channel means the connection is going: the outbox puts the
        # publication back in line when it is told (detach).
        d.addErrback(_ignore)


class IDelivery(Interface):
    """One message handed to a consumer."""

    body = Attribute("the message body (bytes)")
    properties = Attribute("its AMQP properties (dict, txamqp names: 'headers', ...)")
    redelivered = Attribute("whether the broker delivered it before")

    def alive() -> bool:
        """Whether it can still be acked (its channel is open)."""

    def ack() -> Deferred[None]:
        """Acknowledge it: the broker forgets it."""

    def requeue() -> Deferred[None]:
        """Give it back to the broker (``basic.reject``, requeue): redelivered later.

        Does nothing once it was acked or requeued, or when its channel is
        closed (the broker has taken it back already).
        """


@implementer(IDelivery)
class Delivery:
    """One message delivered to one of our consumers (pubsub or work queue)."""

    def __init__(self, channel: Any, message: Any) -> None:
        self._channel = channel
        self.tag = message.delivery_tag
        self.redelivered = bool(message.redelivered)
        content = message.content
        body = content.body if content is not None else b""
        self.body: bytes = body if isinstance(body, bytes) else body.encode("utf-8")
        self.properties: dict[str, Any] = dict(content.properties) if content is not None else {}

        self.settled = False

    def alive(self) -> bool:
        """Whether it can still be acked (its channel is open)."""
        return not self._channel.closed

    def ack(self) -> Deferred[None]:
        self.settled = True
        return self._channel.basic_ack(delivery_tag=self.tag, multiple=False)

    def requeue(self) -> Deferred[None]:
        if self.settled or not self.alive():
            return succeed(None)
        self.settled = True
        return self._channel.basic_reject(delivery_tag=self.tag, requeue=True)


class _Unreadable(Delivery):
    """A message :class:`Delivery` could not read: it can only be requeued."""

    def __init__(self, channel: Any, message: Any) -> None:
        self._channel = channel
        self.tag = getattr(message, "delivery_tag", None)
        self.redelivered = True
        self.body = b""
        self.properties = {}
        self.settled = False


class Consumer:
    """A basic.consume on its own channel, feeding deliveries to a function.

    ``sequential``: wait for each delivery's handling before taking the next
    (pubsub subscriptions keep order); otherwise up to ``prefetch`` messages
    are handled at once (work queues). The loop ends when the connection
    closes; the owner starts a new Consumer on the next session.

    ``handle`` is expected to settle every delivery itself (ack, dead-letter
    or leave it to a lost connection). When it raises or its Deferred fails
    anyway (a bug), the failure is logged, the loop goes on with the next
    message, and the delivery is given back to the broker after
    :attr:`requeue_delay` seconds (so it is neither lost nor held unacked
    until the connection ends, and a message that always trips the bug is
    not redelivered in a hot loop).
    """

    log = Logger()

    #: Seconds before a delivery whose handling failed unexpectedly is
    #: requeued.
    requeue_delay = 5.0

    def __init__(self, session: Session, channel: Any, tag: str, queue: Any,
                 clock: Any = None) -> None:
        self.session = session
        self.channel = channel
        self.tag = tag
        self._queue = queue
        self._clock = clock
        self._requeues: set[Any] = set()
        self.cancelled = False
        self.failures = 0

    @classmethod
    async def start(cls, session: Session, queue_name: str, prefetch: int,
                    handle: Callable[[IDelivery], Any], sequential: bool,
                    channel: Any = None, clock: Any = None) -> "Consumer":
        if channel is None:
            channel = await session.open_channel()
        await channel.basic_qos(prefetch_size=0, prefetch_count=prefetch, global_=False)
        reply = await channel.basic_consume(queue=queue_name, no_ack=False)
        queue = await session.client.queue(reply.consumer_tag)
        consumer = cls(session, channel, reply.consumer_tag, queue, clock)
        d = Deferred.fromCoroutine(consumer._run(handle, sequential))
        d.addErrback(lambda f: cls.log.failure("AMQP consumer {tag} stopped", f,
                                               tag=consumer.tag))
        return consumer

    async def _run(self, handle: Callable[[IDelivery], Any], sequential: bool) -> None:
        while True:
            try:
                message = await self._queue.get()
            except (QueueClosed, Closed):
                return
            try:
                delivery = Delivery(self.channel, message)
            except Exception:
                # Not expected of txamqp's messages; if it happens, the
                # message still goes back to the broker, unseen.
                self._handling_failed(Failure(), _Unreadable(self.channel, message))
                continue
            try:
                result = handle(delivery)
            except Exception:
                self._handling_failed(Failure(), delivery)
                continue
            if isinstance(result, Deferred):
                result.addErrback(self._handling_failed, delivery)
                if sequential:
                    await result

    def _handling_failed(self, failure: Failure, delivery: IDelivery) -> None:
        self.failures += 1
        self.log.failure("handling a message on AMQP consumer {tag} failed; it goes back "
                         "to the queue in {delay} s", failure, tag=self.tag,
                         delay=self.requeue_delay)
        if self._clock is None:
            self._requeue(delivery)
            return
        call = self._clock.callLater(self.requeue_delay, self._requeue, delivery)
        self._requeues.add(call)

    def _requeue(self, delivery: IDelivery) -> None:
        self._requeues = {c for c in self._requeues if c.active()}
        d = delivery.requeue()
        d.addErrback(lambda f: None)  # channel gone: the broker requeued it already

    async def cancel(self) -> None:
        """Stop consuming; unacked messages go back to the queue."""
        if self.cancelled:
            return
        self.cancelled = True
        for call in self._requeues:
            if call.active():
                call.cancel()
        self._requeues.clear()
        try:
            await self.channel.basic_cancel(consumer_tag=self.tag)
        except Closed:
            pass
        self._queue.close()
        self.session.client.queues.pop(self.tag, None)
        await self.session.close_channel(self.channel)


def call_handler(handler: Callable[[Any], Any], value: Any) -> Deferred[Any]:
    """Call a handler that may return a value, a Deferred or a coroutine."""
    def call() -> Any:
        result = handler(value)
        if inspect.iscoroutine(result):
            return Deferred.fromCoroutine(result)
        return result
    return maybeDeferred(call)


class Broker(Service):
    """The reconnecting AMQP connection of one mailhub process.

    A :class:`~twisted.application.service.IService` named ``amqp``: add it to
    the application's MultiService. Users (the global pubsub, work queues)
    register with :meth:`add` and get ``connected(session)`` (a coroutine) on
    every new connection and ``disconnected(session)`` when it is lost.
    """

    log = Logger()

    def __init__(self, reactor: Any, url: str, spec: str, heartbeat: int = 30,
                 outbox: int = 10000, prefetch: int = 16,
                 metrics: Metrics | None = None, connection_name: str | None = None,
                 retry_policy: Callable[[int], float] | None = None) -> None:
        self.setName("amqp")
        self.reactor = reactor
        self.address = BrokerAddress.from_url(url)
        self.spec = load_spec(spec)
        self.prefetch = prefetch
        self.metrics = metrics or Metrics()
        self.outbox = Outbox(outbox, self.metrics)
        self.connection_name = connection_name or "mailhub %s pid %d" % (
            socket.gethostname(), os.getpid())
        self._users: list[Any] = []
        self.session: Session | None = None
        self._waiting: list[Deferred[Session]] = []
        self._setup_failures = 0
        self._preparing: tuple[Any, Deferred[None]] | None = None
        self._policy = retry_policy or backoffPolicy(maxDelay=30)
        self._connected = self.metrics.gauge(
            "mailhub_amqp_connected", "1 while the AMQP broker is connected")
        self._connections = self.metrics.counter(
            "mailhub_amqp_connections_total", "AMQP connections made")
        #: Why the last connection attempt failed (None once one succeeded),
        #: for the health checks (mailhub.checks).
        self.last_error: str | None = None
        self._settling: list[Deferred[None]] = []
        self._factory = _Factory(self.spec, self.address.vhost, heartbeat, reactor,
                                 self.connection_name)
        self._service = ClientService(
            _Watched(self.address.endpoint(reactor), self._connect_failed), self._factory,
            retryPolicy=self._retry_delay,
            clock=reactor, prepareConnection=self._prepare)

    @property
    def connected(self) -> bool:
        """Whether a connection is up and set up (for /healthz)."""
        return self.session is not None

    def health(self) -> dict[str, Any]:
        """The broker's state for /healthz."""
        return {"ok": self.connected,
                "state": "connected" if self.connected else "disconnected",
                "outbox": len(self.outbox)}

    def add(self, user: Any) -> None:
        """Register a user; set it up at once when already connected."""
        self._users.append(user)
        if self.session is not None:
            session = self.session
            d = Deferred.fromCoroutine(user.connected(session))
            d.addErrback(self._user_failed, session)

    def _user_failed(self, failure: Any, session: Session) -> None:
        self.log.failure("AMQP set-up failed; reconnecting", failure)
        if not session.lost:
            session.client.transport.loseConnection()

    def when_connected(self) -> Deferred[Session]:
        """Fires with the session once a connection is up and set up."""
        if self.session is not None:
            return succeed(self.session)
        d: Deferred[Session] = Deferred()
        self._waiting.append(d)
        return d

    def settled(self) -> Deferred[None]:
        """Fires once a connection attempt has ended: set up (``connected``)
        or failed (``last_error`` says why); at once if one has already."""
        if self.session is not None or self.last_error is not None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._settling.append(d)
        return d

    def _settle(self, error: str | None) -> None:
        self.last_error = error
        waiting, self._settling = self._settling, []
        for d in waiting:
            d.callback(None)

    def _connect_failed(self, failure: Failure) -> None:
        self._settle("%s:%d: cannot connect: %s" % (
            self.address.host, self.address.port, failure.getErrorMessage()))

    def startService(self) -> None:
        super().startService()
        self._service.startService()

    #: Seconds a shutdown waits for messages in progress and unconfirmed
    #: publications before closing the connection.
    drain_timeout = 10.0

    async def _drain(self) -> None:
        """Let consumers finish what they hold, then wait for the confirms."""
        for user in self._users:
            drain = getattr(user, "drain", None)
            if drain is not None:
                await drain(self.drain_timeout)
        waited = 0.0
        while len(self.outbox) and self.session is not None and waited < self.drain_timeout:
            await deferLater(self.reactor, 0.05, lambda: None)
            waited += 0.05

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self.session is not None:
            d = Deferred.fromCoroutine(self._drain())
            d.addErrback(lambda f: self.log.failure("draining before shutdown failed", f))
            return d.addCallback(lambda _: self._close())
        return self._close()

    def _close(self) -> Deferred[None]:
        session = self.session
        d: Deferred[Any] = succeed(None)
        if session is not None:
            session.closing = True
            # A clean connection.close (bounded wait), so the broker does not
            # log an abrupt disconnection.
            d = session.client.close(within=2)
            d.addErrback(lambda f: None)
        elif self._preparing is not None:
            # Stopping ClientService during prepareConnection would cancel
            # the preparation and leave the socket open: close the socket
            # instead, let the preparation end (ClientService sees the
            # connection made, then lost) and stop after that.
            client, preparing = self._preparing
            d = Deferred()
            preparing.addBoth(lambda _: d.callback(None))
            client.transport.loseConnection()
        d.addCallback(lambda _: self._service.stopService())
        d.addCallback(lambda _: self.outbox.fail_all("mailhub is shutting down"))
        return d

    def _retry_delay(self, attempts: int) -> float:
        # ClientService counts failed TCP connections only; a broker that
        # accepts TCP and then refuses us (bad password, refused declaration)
        # must back off too, so set-up failures count as well.
        return self._policy(attempts + self._setup_failures)

    def _prepare(self, client: Any) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._set_up(client))
        if not d.called:
            self._preparing = (client, d)
        return d

    async def _set_up(self, client: _Client) -> None:
        session = Session(client, self.outbox)
        client.disconnected.wait().addCallback(lambda _: self._lost(session))
        try:
            auth = client.authenticate(self.address.username, self.address.password,
                                       mechanism="PLAIN")
            await auth.addTimeout(30, self.reactor)
            client.attach_session(session)
            await session.start()
            for user in list(self._users):
                await user.connected(session)
            if session.lost:
                raise Unavailable("the connection was lost during set-up")
        except Exception as e:
            self._setup_failures += 1
            self.log.warn("AMQP set-up on {host}:{port} failed: {error}",
                          host=self.address.host, port=self.address.port,
                          error=_reply_text(e))
            self._settle(self._refusal(e))
            # ClientService (Twisted 26) neither closes a connection whose
            # preparation failed nor accepts that connection being lost
            # afterwards. So the preparation never fails: ClientService
            # counts the connection as made, then sees it lost, and takes
            # its ordinary "disconnected, wait, retry" path (with our
            # back-off, see _retry_delay). A connection lost during set-up
            # makes its awaits fail inside connectionLost, before
            # ClientService hears of the loss, so that path holds too.
            self.reactor.callLater(0, client.transport.loseConnection)
            return
        finally:
            self._preparing = None
        self._setup_failures = 0
        self.session = session
        self._connected.set(1)
        self._connections.inc()
        self.log.info("AMQP connected to {host}:{port} as {name!r}",
                      host=self.address.host, port=self.address.port,
                      name=self.connection_name)
        self.outbox.attach(_PublishChannel(session))
        self._settle(None)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(session)

    def _refusal(self, error: Exception) -> str:
        """What a failed set-up means, in the words an operator needs."""
        where = "%s:%d" % (self.address.host, self.address.port)
        reason = _reply_text(error)
        code = reason.split(" ", 1)[0]
        if code == "403":
            return "%s refused the login of %s: %s" % (where, self.address.username, reason)
        if code == "530":
            return "%s refused the virtual host %s: %s" % (where, self.address.vhost, reason)
        return "%s refused the channel set-up: %s" % (where, reason)

    def _lost(self, session: Session) -> None:
        session.lost = True
        if self.session is session:
            self.session = None
            self._connected.set(0)
            self.outbox.detach()
            self.log.warn("AMQP connection to {host}:{port} lost",
                          host=self.address.host, port=self.address.port)
            self._settle("%s:%d: the connection was lost; reconnecting"
                         % (self.address.host, self.address.port))
        for user in list(self._users):
            try:
                user.disconnected(session)
            except Exception:
                self.log.failure("AMQP user {user!r} failed on disconnection", user=user)


Subscriber = Callable[[Any], Any]


#: Milliseconds a subscription's queue outlives its consumer (``x-expires``):
#: long enough to come back after a cut connection or a broker restart, short
#: enough that a node that died leaves nothing behind for long.
SUBSCRIPTION_EXPIRES = 300_000
#: Messages a subscription's queue keeps at most while its node is away
#: (``x-max-length``; the oldest go first).
SUBSCRIPTION_MAX_LENGTH = 100_000


def _queue_name(topic: str) -> str:
    """A subscription's own queue: recognisable, unique, within AMQP's 255 bytes."""
    return "mailhub.sub.%s.%s" % (topic.encode("utf-8")[:200].decode("utf-8", "ignore"),
                                  uuid.uuid4().hex)


@attrs.define(eq=False)
class _Subscription:
    topic: str
    callback: Subscriber
    queue: str = attrs.field(default=attrs.Factory(lambda self: _queue_name(self.topic),
                                                   takes_self=True))
    consumer: Consumer | None = None
    active: bool = False
    waiting: list[Deferred[None]] = attrs.Factory(list)

    def ready(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)


class GlobalTopic:
    """One topic of the :class:`GlobalPubSub`: ESN's topic API over AMQP."""

    def __init__(self, owner: "GlobalPubSub", name: str) -> None:
        self.owner = owner
        self.name = name
        self._route = Route(name)

    def subscribe(self, callback: Subscriber) -> Deferred[None]:
        """Call ``callback(data)`` for every publication on this topic, from any node.

        The returned Deferred fires once the subscription's queue is bound on
        the broker (later if the broker is away now); callers may ignore it.
        """
        return self.owner._subscribe(self.name, callback)

    def unsubscribe(self, callback: Subscriber) -> None:
        """Stop calling ``callback`` for this topic (each of its subscriptions)."""
        self.owner._unsubscribe(self.name, callback)

    def publish(self, data: Any) -> Deferred[None]:
        """Publish ``data`` as JSON; fires when the broker has confirmed it.

        Fails with :class:`~mailhub.errors.Unavailable` when the outbox is
        full (the broker has been away too long) or the broker refused it.
        """
        try:
            body = encode_json(data).encode("utf-8")
        except (TypeError, ValueError) as e:
            return fail(TypeError("cannot publish %r on %s as JSON: %s" % (data, self.name, e)))
        return self.owner.outbox.put(self._route, body, JSON_PROPERTIES)

    def forward(self, other: Any, data: Any) -> Deferred[None]:
        """Publish here, then on ``other`` under the same name (ESN's forward)."""
        here = self.publish(data)
        if other is self.owner:
            return here
        there = other.topic(self.name).publish(data)
        return DeferredList([here, there], fireOnOneErrback=True, consumeErrors=True
                            ).addCallback(lambda _: None).addErrback(
                                lambda f: f.value.subFailure)


class GlobalPubSub:
    """ESN's global pubsub: topics shared by every node on the broker.

    Subscriptions outlive connections: each is set up again on every new
    connection. A subscriber that raises or fails is logged and the others
    (on this topic and every other) still run. Messages that are not JSON (or
    nest too deep to decode) are logged, counted and acked (a raw publisher's mistake cannot stop a topic).
    """

    log = Logger()

    def __init__(self, broker: Broker, metrics: Metrics | None = None) -> None:
        self.broker = broker
        self.outbox = broker.outbox
        self.prefetch = broker.prefetch
        self._topics: dict[str, GlobalTopic] = {}
        self._subscriptions: list[_Subscription] = []
        self._ending: set[Deferred[None]] = set()
        self._session: Session | None = None
        metrics = metrics or broker.metrics
        self._received = metrics.counter(
            "mailhub_pubsub_received_total", "global pubsub messages received")
        self._bad = metrics.counter(
            "mailhub_pubsub_bad_messages_total",
            "global pubsub messages dropped because they were not JSON")
        self._subscriber_failures = metrics.counter(
            "mailhub_pubsub_subscriber_failures_total", "global pubsub subscribers that failed")
        broker.add(self)

    def topic(self, name: str) -> GlobalTopic:
        """The topic called ``name`` (an exchange of the same name)."""
        found = self._topics.get(name)
        if found is None:
            found = self._topics[name] = GlobalTopic(self, name)
        return found

    def _subscribe(self, topic: str, callback: Subscriber) -> Deferred[None]:
        subscription = _Subscription(topic, callback)
        self._subscriptions.append(subscription)
        ready: Deferred[None] = Deferred()
        subscription.waiting.append(ready)
        if self._session is not None:
            self._start_soon(self._session, subscription)
        return ready

    def _unsubscribe(self, topic: str, callback: Subscriber) -> None:
        for subscription in [s for s in self._subscriptions
                             if s.topic == topic and s.callback == callback]:
            self._subscriptions.remove(subscription)
            subscription.active = False
            subscription.ready()
            consumer, subscription.consumer = subscription.consumer, None
            if consumer is not None:
                self._end_soon(consumer, subscription.queue)

    def _end_soon(self, consumer: Consumer, queue: str) -> None:
        """:meth:`_end` in the background; :meth:`drain` waits for it."""
        d = Deferred.fromCoroutine(self._end(consumer, queue))
        d.addErrback(lambda f: self.log.failure("cannot delete the queue {queue}", f,
                                                queue=queue))
        self._ending.add(d)
        d.addBoth(lambda _: self._ending.discard(d))

    async def _end(self, consumer: Consumer, queue: str) -> None:
        """Stop consuming and delete the subscription's queue (it would expire anyway)."""
        await consumer.cancel()
        if not consumer.session.lost:
            await consumer.session.delete_queue(queue)

    async def drain(self, timeout: float) -> None:
        """On shutdown: delete every subscription's queue, as nothing will come back
        for it (within ``timeout`` seconds; what is left expires on the broker)."""
        for subscription in list(self._subscriptions):
            consumer, subscription.consumer = subscription.consumer, None
            if consumer is not None:
                self._end_soon(consumer, subscription.queue)
        if not self._ending:
            return
        waiting = DeferredList(list(self._ending), consumeErrors=True)
        waiting.addTimeout(timeout, self.broker.reactor)
        try:
            await waiting
        except DeferredTimeout:
            self.log.warn("the broker did not delete {count} subscription queues in {timeout} s;"
                          " they expire by themselves", count=len(self._ending), timeout=timeout)

    async def connected(self, session: Session) -> None:
        self._session = session
        for subscription in list(self._subscriptions):
            await self._start(session, subscription)

    def disconnected(self, session: Session) -> None:
        if self._session is session:
            self._session = None
        for subscription in self._subscriptions:
            if subscription.consumer is not None and subscription.consumer.session is session:
                subscription.consumer = None

    def _start_soon(self, session: Session, subscription: _Subscription) -> None:
        d = Deferred.fromCoroutine(self._start(session, subscription))
        d.addErrback(lambda f: self.log.failure(
            "cannot subscribe to {topic}", f, topic=subscription.topic))

    async def _start(self, session: Session, subscription: _Subscription) -> None:
        try:
            await session.declare_exchange(subscription.topic)
        except Refused as e:
            self.log.error("cannot subscribe to {topic}: the broker refused its exchange: "
                           "{reason}", topic=subscription.topic, reason=str(e))
            return
        channel = await session.open_channel()
        # Durable: RabbitMQ 4 deprecates transient queues that are not
        # exclusive (and will refuse them); x-expires removes it all the same.
        await channel.queue_declare(
            queue=subscription.queue, exclusive=False, auto_delete=False, durable=True,
            arguments={"x-expires": SUBSCRIPTION_EXPIRES,
                       "x-max-length": SUBSCRIPTION_MAX_LENGTH})
        await channel.queue_bind(queue=subscription.queue, exchange=subscription.topic,
                                 routing_key="")

        def handle(delivery: IDelivery) -> Deferred[None]:
            return self._deliver(subscription, delivery)

        consumer = await Consumer.start(session, subscription.queue, self.prefetch, handle,
                                        sequential=True, channel=channel,
                                        clock=self.broker.reactor)
        if subscription not in self._subscriptions:
            # Unsubscribed while we were setting up.
            self._end_soon(consumer, subscription.queue)
            return
        subscription.consumer = consumer
        subscription.active = True
        subscription.ready()

    def _deliver(self, subscription: _Subscription, delivery: Any) -> Deferred[None]:
        """Hand one message to its subscriber, then ack it (failure or not)."""
        self._received.inc()
        try:
            data = json.loads(delivery.body)
        except (ValueError, RecursionError):
            # RecursionError: JSON nested deeper than Python's stack (b"[" *
            # 200000). Either way the body can never be decoded: drop it.
            self._bad.inc()
            self.log.warn("dropping a message on {topic} that is not JSON ({size} bytes)",
                          topic=subscription.topic, size=len(delivery.body))
            return self._ack(delivery)
        d = call_handler(subscription.callback, data)

        def failed(failure: Any) -> None:
            self._subscriber_failures.inc()
            self.log.failure("subscriber {subscriber!r} of {topic} failed", failure,
                             subscriber=subscription.callback, topic=subscription.topic)

        d.addErrback(failed)
        d.addCallback(lambda _: self._ack(delivery))
        return d

    def _ack(self, delivery: Any) -> Deferred[None]:
        if not delivery.alive():
            return succeed(None)
        d = delivery.ack()
        d.addErrback(lambda f: None)
        return d
