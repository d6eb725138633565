"""Build the pubsub hub, the AMQP connection and work queues from the config.

``make_pubsub(config, reactor, metrics)`` is what ``mailhub.tap`` calls:

- without ``[amqp] url``: ``Hub(local)``, whose ``global_`` is the local
  pubsub; no service; ``work_queue(name)`` gives a
  :class:`~mailhub.pubsub.spool.SpoolQueue` in the data folder;
- with a URL: one :class:`~mailhub.pubsub.connection.Broker` (an IService
  named ``amqp`` to add to the MultiService) and a
  :class:`~mailhub.pubsub.globalpubsub.GlobalPubSub` as ``hub.global_``;
  ``work_queue(name)`` gives RabbitMQ's point-to-point queues and
  ``shared_subscription(topic)`` a global topic's queue shared by instances.

Either way ``work_queue`` gives an
:class:`~mailhub.pubsub.interfaces.IWorkQueue`: callers never ask which.

A missing spec file or a bad URL raises :class:`~mailhub.errors.ConfigError`
here, so start-up stops with one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import Service

from mailhub.config import Config
from mailhub.events import PUBLISHED_TOPICS
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.pubsub.connection import Broker
from mailhub.pubsub.globalpubsub import GlobalPubSub
from mailhub.pubsub.interfaces import IWorkQueue
from mailhub.pubsub.local import LocalPubSub
from mailhub.pubsub.outbox import Refused
from mailhub.pubsub.retry import RetryPolicy
from mailhub.pubsub.shared import LocalSharedSubscription
from mailhub.pubsub.spool import Spool, SpoolQueue
from mailhub.pubsub.workqueue import WorkQueue

#: The shared queue of a global topic is named as the topic with this prefix.
SHARED_PREFIX = "mailhub:"


@attrs.define
class PubSub:
    """The hub, the services to run, and the way to get work queues."""

    hub: Hub
    services: list[Any]
    broker: Broker | None
    reactor: Any
    metrics: Metrics
    #: Where spooled work queues keep their folders (without a broker).
    data_dir: Path = Path(".")
    _queues: dict[str, IWorkQueue] = attrs.Factory(dict)
    _shared: dict[str, WorkQueue | LocalSharedSubscription] = attrs.Factory(dict)

    def work_queue(self, name: str, dead_letter: str | None = None,
                   retry_initial: float = 1.0, retry_max: float = 300.0,
                   spool: str | None = None, routing_key: str = "",
                   queue_type: str = "classic") -> IWorkQueue:
        """The work queue ``name``: RabbitMQ's with a broker, else a spool.

        On RabbitMQ the exchange ``name`` is taken as it is when it exists
        with another type (a direct exchange: the queue is bound with
        ``routing_key``, the key its publishers use).

        ``queue_type`` (``classic`` or ``quorum``) is the RabbitMQ type of the
        queue and its dead-letter queue (see :class:`WorkQueue`).

        Without a broker the messages live in ``data_dir / spool`` (default:
        the queue's name with ``:`` as ``-``), dead letters in its ``dead/``.
        Asking twice for a name gives the same queue.
        """
        found = self._queues.get(name)
        if found is not None:
            return found
        if self.broker is None:
            folder = self.data_dir / (spool or name.replace(":", "-"))
            found = self._queues[name] = SpoolQueue(
                name, Spool(folder), self.reactor, RetryPolicy(retry_initial, retry_max),
                metrics=self.metrics)
        else:
            found = self._queues[name] = WorkQueue(
                self.broker.outbox, name, self.reactor, dead_letter=dead_letter,
                retry_initial=retry_initial, retry_max=retry_max,
                prefetch=self.broker.prefetch, metrics=self.metrics, broker=self.broker,
                routing_key=routing_key, queue_type=queue_type)
        return found

    def shared_subscription(self, topic: str, queue: str | None = None,
                            dead_letter: str | None = None, retry_initial: float = 1.0,
                            retry_max: float = 300.0) -> WorkQueue | LocalSharedSubscription:
        """A subscription to the global ``topic`` that mailhub instances share.

        Unlike ``hub.global_.topic(topic).subscribe`` (one queue of its own per
        instance, so every instance sees every publication), this is one
        durable queue, ``queue`` (default ``mailhub:`` + topic), bound to the
        topic's exchange: each publication is handled by one instance, acked
        after its handler succeeded, retried on transient failures and
        dead-lettered (``queue`` + ``:dead``) when it can never succeed. Call
        ``consume(handler)`` on the result; ``handler`` gets the raw body.
        Without a broker it is the topic of ``hub.global_`` (local then), with
        the same retries: a
        :class:`~mailhub.pubsub.shared.LocalSharedSubscription`.
        """
        name = queue or SHARED_PREFIX + topic
        found = self._shared.get(name)
        if found is None:
            policy = RetryPolicy(retry_initial, retry_max)
            if self.broker is None:
                found = LocalSharedSubscription(self.hub.global_, topic, name, self.reactor,
                                                policy, self.metrics)
            else:
                found = WorkQueue(
                    self.broker.outbox, name, self.reactor, dead_letter=dead_letter,
                    retry_initial=retry_initial, retry_max=retry_max,
                    prefetch=self.broker.prefetch, metrics=self.metrics, broker=self.broker,
                    exchange=topic)
            self._shared[name] = found
        elif found.exchange != topic:
            raise ValueError("queue %s is bound to %s, not %s" % (name, found.exchange, topic))
        return found

    def health(self) -> dict[str, Any]:
        """The broker's state for /healthz and ``mailhub check``: ``ok`` is
        False when a configured broker is not connected or refuses a
        declaration (``state`` then names it and the broker's reason)."""
        if self.broker is None:
            return {"ok": True, "state": "disabled"}
        return self.broker.health()


@attrs.frozen
class DeclaredTopics:
    """A broker user that declares the exchange of each of ``topics`` on
    every connection, before anything is published on them.

    So a client outside (an OpenPaaS node, ``rabbitmqadmin``, a script) can
    bind its queue to any topic of the catalogue as soon as mailhub has
    connected once, instead of meeting ``404 NOT_FOUND`` until mailhub's
    first publication on it. Each exchange is declared as OpenPaaS and
    mailhub's own publications declare it (durable fanout); one the broker
    refuses is recorded, named in ``/healthz`` and retried like any other
    refused declaration, and the others are declared all the same.
    """

    topics: tuple[str, ...]

    async def connected(self, session: Any) -> None:
        refused: Refused | None = None
        for topic in self.topics:
            try:
                await session.declare_exchange(topic)
            except Refused as e:
                refused = refused or e
        if refused is not None:
            raise refused

    def disconnected(self, session: Any) -> None:
        """Nothing to forget: the next connection declares them again."""


def make_pubsub(config: Config, reactor: Any, metrics: Metrics) -> PubSub:
    """The pubsub side of a mailhub process, from its configuration."""
    local = LocalPubSub()
    amqp = config.amqp
    if not amqp.url:
        return PubSub(Hub(local, local), [], None, reactor, metrics, config.data_dir)
    broker = Broker(reactor, amqp.url, amqp.spec, heartbeat=amqp.heartbeat,
                    outbox=amqp.outbox, prefetch=amqp.prefetch, metrics=metrics)
    broker.add(DeclaredTopics(PUBLISHED_TOPICS))
    return PubSub(Hub(local, GlobalPubSub(broker, metrics)), [broker], broker,
                  reactor, metrics, config.data_dir)


class Resume(Service):
    """Starts a work queue on what an earlier run left (``resume``), once
    mailhub is ready (under :class:`~mailhub.service.AfterReady`)."""

    def __init__(self, queue: IWorkQueue) -> None:
        self.queue = queue

    def startService(self) -> None:
        super().startService()
        self.queue.resume()


def make_hub(config: Config, reactor: Any, metrics: Metrics) -> tuple[Hub, list[Any]]:
    """``(hub, services)``: the short form of :func:`make_pubsub`."""
    made = make_pubsub(config, reactor, metrics)
    return made.hub, made.services
