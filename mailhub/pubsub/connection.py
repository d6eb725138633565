"""The one reconnecting AMQP connection of a mailhub process (txamqp).

:class:`Broker` is a ``ClientService`` with ``backoffPolicy()``, heartbeats
on, whose ``prepareConnection`` authenticates, opens a publisher channel in
confirm mode and a control channel for declarations, then lets each user of
the connection (:class:`~mailhub.pubsub.globalpubsub.GlobalPubSub`,
:class:`~mailhub.pubsub.workqueue.WorkQueue`) set its channels up again.
Publications go through the broker's :class:`~mailhub.pubsub.outbox.Outbox`
(bounded, confirmed, kept across reconnections). A :class:`Session` is one
live connection; consumers (:mod:`mailhub.pubsub.consumer`) open their
channels on it.

Frames are coded by :mod:`mailhub.pubsub.frames` (quarantined there: see its
docstring for why txamqp's own codec is not enough).
"""

from __future__ import annotations

import json
import os
import re
import socket
import weakref
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import unquote, urlsplit

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, DeferredLock, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from txamqp.client import ChannelClosed, Closed, TwistedDelegate
from txamqp.content import Content
from txamqp.protocol import AMQClient
from zope.interface import implementer

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

    @property
    def where(self) -> str:
        """``host:port``, for the log and ``/healthz``."""
        return "%s:%d" % (self.host, self.port)

    def endpoint(self, reactor: Any, timeout: float = 30) -> Any:
        tcp = HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)
        if self.tls:
            return wrapClientTLS(optionsForClientTLS(self.host), tcp)
        return tcp


def parse_urls(value: str) -> list[BrokerAddress]:
    """The nodes of ``[amqp] url``: one URL, or several separated by commas
    and/or white space (the nodes of one RabbitMQ cluster, tried in turn)."""
    urls = [url for url in re.split(r"[,\s]+", value.strip()) if url]
    if not urls:
        raise ConfigError("[amqp] url: expected amqp://user:password@host:port/vhost")
    return [BrokerAddress.from_url(url) for url in urls]


@implementer(IStreamClientEndpoint)
class FailoverEndpoint:
    """Connects to the first node of a cluster that answers.

    Each attempt starts with the :attr:`current` node and goes on to the
    next ones in the order of ``[amqp] url`` (wrapping round) until one
    accepts the TCP connection; that node becomes the current one. It fails,
    naming every node's error, only when none answers (ClientService then
    waits and tries again). :meth:`advance` makes the next attempt start
    with the node after the current one: the broker calls it when a
    connection is lost or refused after TCP, so a node that went down, or
    that accepts TCP but not mailhub, is not tried first again.

    :attr:`trying` is the node being tried (its virtual host is the one the
    AMQP client opens; nodes of one cluster share virtual hosts and users
    anyway).
    """

    def __init__(self, addresses: list[BrokerAddress], endpoints: list[Any]) -> None:
        assert addresses and len(addresses) == len(endpoints)
        self.addresses = addresses
        self._endpoints = endpoints
        #: Index of the node tried first.
        self.current = 0
        #: The node of the attempt under way (the current one between attempts).
        self.trying = addresses[0]

    @property
    def address(self) -> BrokerAddress:
        """The node connected to, or to be tried first."""
        return self.addresses[self.current]

    def advance(self) -> None:
        """Start the next attempt with the next node."""
        self.current = (self.current + 1) % len(self.addresses)

    def connect(self, factory: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        errors = []
        first = self.current
        for step in range(len(self.addresses)):
            index = (first + step) % len(self.addresses)
            address = self.addresses[index]
            self.trying = address
            try:
                protocol = await self._endpoints[index].connect(factory)
            except Exception as e:
                errors.append("%s: %s" % (address.where, Failure(e).getErrorMessage()))
                continue
            self.current = index
            return protocol
        self.trying = self.address
        raise ConnectError(string="; ".join(errors))


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
    """Builds the AMQP client; ``vhost`` says the virtual host of the node
    being connected to."""

    def __init__(self, spec: Any, vhost: Callable[[], str], heartbeat: int, clock: Any,
                 name: str) -> None:
        self.spec = spec
        self.vhost = vhost
        self.heartbeat = heartbeat
        self.clock = clock
        self.name = name

    def buildProtocol(self, addr: Any) -> _Client:
        return _Client(_Delegate(self.name), vhost=self.vhost(), spec=self.spec,
                       heartbeat=self.heartbeat, clock=self.clock)


def _reply_text(error: Any) -> str:
    """The broker's words (``406 PRECONDITION_FAILED - ...``) from a
    ``Closed`` error, the channel.close message itself, or a Failure."""
    reason = error
    if isinstance(error, Exception):
        reason = error.args[0] if error.args else error
    if isinstance(reason, Failure):
        return reason.getErrorMessage() or reason.type.__name__
    code = getattr(reason, "reply_code", None)
    text = getattr(reason, "reply_text", None)
    if code is not None:
        return "%s %s" % (code, text)
    return str(reason)


def _explain_queue_type(queue: str, arguments: dict[str, Any], reason: str) -> str:
    """The broker's refusal of ``queue``'s declaration, with what to do when
    the queue exists with another type (a queue's type never changes)."""
    if "'x-queue-type'" not in reason:
        return reason
    wanted = arguments.get("x-queue-type") or "classic"
    return ("%s (the queue exists with another type than %s, and a queue's type cannot "
            "change: set [collector] queue_type to the existing queue's type, or stop "
            "every consumer, move its messages away and delete it (rabbitmqctl "
            "delete_queue %s), and mailhub declares it again as %s)"
            % (reason, wanted, queue, wanted))


class Refusals:
    """Declarations the broker refuses now, for the log and ``/healthz``.

    A refused declaration (``406 PRECONDITION_FAILED``: the exchange or queue
    exists with other properties; ``403``: no permission) takes down only
    what depends on it; this is where it is remembered, with the broker's
    reason, until a later attempt succeeds. ``on_refused`` is called after
    each refusal (the broker schedules another attempt).
    """

    log = Logger()

    def __init__(self, on_refused: Callable[[], None] | None = None) -> None:
        #: What is refused now (``"exchange 'collector:email'"``) -> the broker's reason.
        self.current: dict[str, str] = {}
        self._adopted: set[str] = set()
        self.on_refused = on_refused

    def refused(self, what: str, reason: str) -> None:
        """The broker refused ``what``; logged when new or for a new reason."""
        if self.current.get(what) != reason:
            self.log.error("the broker refused {what}: {reason}; what depends on it stays "
                           "down (the rest works) and mailhub tries again",
                           what=what, reason=reason)
        self.current[what] = reason
        if self.on_refused is not None:
            self.on_refused()

    def accepted(self, what: str) -> None:
        """``what`` was declared: no longer refused."""
        if self.current.pop(what, None) is not None:
            self.log.info("the broker now accepts {what}", what=what)

    def adopted(self, exchange: str, differs: str, routing_key: str) -> None:
        """``exchange`` is used as it is; said once per process."""
        if exchange in self._adopted:
            return
        self._adopted.add(exchange)
        found = re.search(r"current is '([^']*)'", differs)
        self.log.warn(
            "exchange {exchange!r} exists as a {kind} exchange, not mailhub's durable "
            "fanout: using it as it is, its queue bound with routing key {key!r} "
            "(the broker said: {differs})", exchange=exchange,
            kind=found.group(1) if found else "differently declared",
            key=routing_key, differs=differs)

    def describe(self) -> str:
        """One line for ``/healthz`` and ``mailhub check``."""
        return "; ".join("the broker refused %s: %s" % (what, reason)
                         for what, reason in sorted(self.current.items()))


class Session:
    """One live AMQP connection: its channels and declarations.

    A new Session is made for every connection; users keep per-session state
    and drop it when :meth:`Broker` reports the session lost.
    """

    log = Logger()

    def __init__(self, client: _Client, outbox: Outbox,
                 refusals: "Refusals | None" = None) -> None:
        self.client = client
        self.outbox = outbox
        self.refusals = refusals if refusals is not None else Refusals()
        self.publish_channel: Any = None
        self._control: Any = None
        # One declaration at a time on the control channel: a refusal closes
        # the channel, and must fail only the declaration it answers.
        self._control_lock = DeferredLock()
        #: Control channels, and channels being set up (qos, consume): a
        #: refusal there fails only their owner (see :meth:`refusable`), not
        #: the connection. Weak: a refused channel is forgotten with its owner
        #: (txamqp wakes the owner before it reports the channel closed).
        self._setting_up: weakref.WeakSet[Any] = weakref.WeakSet()
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
        self.refusable(self._control)

    async def _on_control(self, call: Callable[[Any], Awaitable[Any]], what: str,
                          record: bool = True,
                          explain: Callable[[str], str] | None = None) -> Any:
        """Run one declaration on the control channel; a refusal closes only it.

        ``what`` names the declared thing for the log and ``/healthz``
        (``exchange 'collector:email'``); a refusal is recorded in
        :attr:`refusals` (unless ``record`` is false) and raised as
        :class:`Refused`, a success clears an earlier refusal of it.
        ``explain`` turns the broker's reason into the words recorded (what
        the operator can do about it).
        """
        return await self._control_lock.run(
            lambda: Deferred.fromCoroutine(self._run_on_control(call, what, record, explain)))

    async def _run_on_control(self, call: Callable[[Any], Awaitable[Any]], what: str,
                              record: bool,
                              explain: Callable[[str], str] | None = None) -> Any:
        if self._control is None or self._control.closed:
            self._control = await self.open_channel()
            self.refusable(self._control)
        channel = self._control
        try:
            result = await call(channel)
        except ChannelClosed as e:
            self.forget_channel(channel)
            self._control = None
            reason = _reply_text(e)
            if explain is not None:
                reason = explain(reason)
            if record:
                self.refusals.refused(what, reason)
            raise Refused("%s: %s" % (what, reason))
        self.refusals.accepted(what)
        return result

    async def declare_exchange(self, name: str, record: bool = True) -> None:
        """A durable fanout exchange, exactly as OpenPaaS declares its topics
        (amqplib's ``assertExchange(name, 'fanout')``: durable, not
        auto-delete, not internal, no arguments)."""
        await self._on_control(lambda ch: ch.exchange_declare(
            exchange=name, type="fanout", durable=True, auto_delete=False,
            internal=False, arguments={}), "exchange %r" % name, record)

    async def adopt_exchange(self, name: str) -> str | None:
        """Declare ``name`` as :meth:`declare_exchange` does, or take it as it is.

        When the broker refuses the declaration because the exchange exists
        with other properties (Apache James' ``AmqpForwardAttribute`` makes
        it a *direct* exchange), it is used as it is: ``None`` when it was
        declared, else the broker's words about how it differs. Raises
        :class:`Refused` when it does not exist and cannot be declared.
        """
        try:
            await self.declare_exchange(name, record=False)
            return None
        except Refused as e:
            refusal = str(e)
        await self._on_control(lambda ch: ch.exchange_declare(
            exchange=name, passive=True), "exchange %r" % name)
        self.refusals.accepted("exchange %r" % name)
        return refusal

    async def declare_queue(self, name: str, arguments: dict[str, Any] | None = None) -> None:
        """A durable, non-exclusive queue, not auto-delete: with no
        ``arguments``, exactly as OpenPaaS declares ``collector:email``
        (amqplib's ``assertQueue(name)``).

        ``arguments`` may name the queue's type (``x-queue-type``); a queue
        that exists with another type is refused (``406 PRECONDITION_FAILED
        - inequivalent arg 'x-queue-type'``), and the refusal says what to do.
        """
        await self._on_control(lambda ch: ch.queue_declare(
            queue=name, durable=True, exclusive=False, auto_delete=False,
            arguments=arguments or {}), "queue %r" % name,
            explain=lambda reason: _explain_queue_type(name, arguments or {}, reason))

    async def bind_queue(self, queue: str, exchange: str, routing_key: str = "") -> None:
        """Bind ``queue`` to ``exchange`` with ``routing_key``."""
        await self._on_control(lambda ch: ch.queue_bind(
            queue=queue, exchange=exchange, routing_key=routing_key),
            "binding of queue %r to exchange %r" % (queue, exchange))

    async def delete_queue(self, name: str) -> None:
        """Delete a queue (gone already is fine)."""
        await self._on_control(lambda ch: ch.queue_delete(queue=name),
                               "deletion of queue %r" % name, record=False)

    async def message_count(self, name: str) -> int:
        """How many messages the queue ``name`` holds (a passive declare; a
        missing queue raises Refused without marking the broker unhealthy)."""
        reply = await self._on_control(lambda ch: ch.queue_declare(queue=name, passive=True),
                                       "queue %r" % name, record=False)
        return int(reply.message_count)

    async def declare_route(self, route: Route) -> None:
        """Everything a publication on ``route`` needs on the broker.

        A route that ``adopt``s its exchange takes it as it is when it exists
        with another type, and binds its queue with the route's routing key
        (see :meth:`adopt_exchange`); otherwise the exchange is a durable
        fanout and the queue is bound with ``''``, as OpenPaaS binds it.
        """
        key = ""
        if route.exchange:
            if route.adopt:
                differs = await self.adopt_exchange(route.exchange)
                if differs is not None:
                    self.refusals.adopted(route.exchange, differs, route.routing_key)
                    key = route.routing_key
            else:
                await self.declare_exchange(route.exchange)
        if route.queue:
            await self.declare_queue(route.queue, dict(route.queue_arguments))
            if route.exchange:
                await self.bind_queue(route.queue, route.exchange, key)

    def refusable(self, channel: Any) -> None:
        """While ``channel`` is being set up, a refusal fails only its owner."""
        self._setting_up.add(channel)

    def refusal(self, channel: Any, what: str, error: Exception) -> Refused:
        """A channel being set up was closed by the broker: forget it, record why."""
        self.forget_channel(channel)
        reason = _reply_text(error)
        self.refusals.refused(what, reason)
        return Refused("%s: %s" % (what, reason))

    def set_up(self, channel: Any) -> None:
        """``channel`` is set up: a refusal now means the connection is unwell."""
        self._setting_up.discard(channel)

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
        if channel in self._setting_up:
            return  # its owner hears of it as a refusal
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
        #: The nodes of ``[amqp] url``, tried in turn (see :class:`FailoverEndpoint`).
        self.addresses = parse_urls(url)
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
        #: Declarations the broker refuses now (see :class:`Refusals`).
        self.refusals = Refusals(self._retry_soon)
        self._retry_call: Any = None
        self._retry_delay_now = self.refusal_retry
        self._connected = self.metrics.gauge(
            "mailhub_amqp_connected", "1 while the AMQP broker is connected")
        self._connections = self.metrics.counter(
            "mailhub_amqp_connections_total", "AMQP connections made")
        #: Why the last connection attempt failed (None once one succeeded),
        #: for the health checks (mailhub.checks).
        self.last_error: str | None = None
        self._settling: list[Deferred[None]] = []
        self._endpoint = FailoverEndpoint(
            self.addresses, [address.endpoint(reactor) for address in self.addresses])
        self._factory = _Factory(self.spec, lambda: self._endpoint.trying.vhost, heartbeat,
                                 reactor, self.connection_name)
        self._service = ClientService(
            _Watched(self._endpoint, self._connect_failed), self._factory,
            retryPolicy=self._retry_delay,
            clock=reactor, prepareConnection=self._prepare)

    @property
    def address(self) -> BrokerAddress:
        """The node connected to now, or to be tried first."""
        return self._endpoint.address

    @property
    def connected(self) -> bool:
        """Whether a connection is up and set up (for /healthz)."""
        return self.session is not None

    def health(self) -> dict[str, Any]:
        """The broker's state for /healthz and ``mailhub check``.

        Not ok while disconnected, or while the broker refuses a declaration
        (then ``state`` names each refused exchange, queue or binding with
        the broker's reason, and ``refused`` maps them to it).
        """
        state = "connected" if self.connected else "disconnected"
        health: dict[str, Any] = {"ok": self.connected and not self.refusals.current,
                                  "state": state, "outbox": len(self.outbox)}
        if self.refusals.current:
            health["state"] = "%s; %s" % (state, self.refusals.describe())
            health["refused"] = dict(self.refusals.current)
        return health

    #: Seconds before refused declarations are tried again (doubling up to
    #: :attr:`refusal_retry_max` while the broker keeps refusing).
    refusal_retry = 5.0
    refusal_retry_max = 300.0

    def _retry_soon(self) -> None:
        """A declaration was refused: set every user up again later (they
        skip what is already in place), so a conflict fixed on the broker
        heals without a restart."""
        if self._retry_call is not None and self._retry_call.active():
            return
        if not self.running:
            return
        delay = self._retry_delay_now
        self._retry_delay_now = min(delay * 2, self.refusal_retry_max)
        self._retry_call = self.reactor.callLater(delay, self._retry_refused)

    def _retry_refused(self) -> None:
        self._retry_call = None
        session = self.session
        if session is None:
            return  # the next connection sets everything up anyway
        attempts = []
        for user in list(self._users):
            d = Deferred.fromCoroutine(self._set_user_up(user, session))
            attempts.append(d.addErrback(self._user_failed, session))
        DeferredList(attempts).addCallback(lambda _: self._retried())

    def _retried(self) -> None:
        if not self.refusals.current:
            self._retry_delay_now = self.refusal_retry  # all healed: start short again

    async def _set_user_up(self, user: Any, session: Session) -> None:
        """``user.connected(session)``; a refusal is recorded, not fatal."""
        try:
            await user.connected(session)
        except Refused:
            pass  # recorded in self.refusals, retried by _retry_soon

    def add(self, user: Any) -> None:
        """Register a user; set it up at once when already connected."""
        self._users.append(user)
        if self.session is not None:
            session = self.session
            d = Deferred.fromCoroutine(self._set_user_up(user, session))
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
        if len(self.addresses) == 1:
            self._settle("%s: cannot connect: %s" % (
                self.address.where, failure.getErrorMessage()))
        else:
            self._settle("cannot connect to any node: %s" % failure.getErrorMessage())

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
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
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
        session = Session(client, self.outbox, self.refusals)
        client.disconnected.wait().addCallback(lambda _: self._lost(session))
        try:
            auth = client.authenticate(self.address.username, self.address.password,
                                       mechanism="PLAIN")
            await auth.addTimeout(30, self.reactor)
            client.attach_session(session)
            await session.start()
            for user in list(self._users):
                await self._set_user_up(user, session)
            if session.lost:
                raise Unavailable("the connection was lost during set-up")
        except Exception as e:
            self._setup_failures += 1
            self.log.warn("AMQP set-up on {host}:{port} failed: {error}",
                          host=self.address.host, port=self.address.port,
                          error=_reply_text(e))
            self._settle(self._refusal(e))
            # The next attempt starts with the next node of a cluster.
            self._endpoint.advance()
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
            lost = self.address
            # The next attempt starts with the next node of a cluster: this
            # one may be down (and the others have the same queues).
            self._endpoint.advance()
            self.session = None
            self._connected.set(0)
            self.outbox.detach()
            self.log.warn("AMQP connection to {host}:{port} lost",
                          host=lost.host, port=lost.port)
            self._settle("%s: the connection was lost; reconnecting" % lost.where)
        for user in list(self._users):
            try:
                user.disconnected(session)
            except Exception:
                self.log.failure("AMQP user {user!r} failed on disconnection", user=user)


#: Milliseconds a subscription's queue outlives its consumer (``x-expires``):
