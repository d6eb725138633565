"""A shared subscription without a broker: the topic itself, with the work queue's retries.

With RabbitMQ, :meth:`mailhub.pubsub.wiring.PubSub.shared_subscription`
gives a durable queue bound to a global topic that every instance consumes
(:class:`~mailhub.pubsub.workqueue.WorkQueue` with ``exchange``). Without a
broker there is one instance and ``hub.global_`` is local, so "shared" is
simply a subscription: :class:`LocalSharedSubscription` subscribes to the
topic and hands each publication, as its JSON body, to the consumer with the
same policy (:func:`~mailhub.pubsub.retry.attempt`): transient failures are
retried with backoff until mailhub stops; a publication that can never
succeed is logged and counted, as there is no dead-letter queue to keep it
in. Callers never ask which of the two they have.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailhub.metrics import Metrics
from mailhub.pubsub.connection import encode_json
from mailhub.pubsub.interfaces import Handler, IPubSub, IWorkQueue
from mailhub.pubsub.retry import Outcome, RetryPolicy, Sleeps, attempt, queue_counters


@implementer(IWorkQueue)
class LocalSharedSubscription:
    """``topic`` of ``pubsub`` as a work queue; see the module docstring."""

    log = Logger()

    def __init__(self, pubsub: IPubSub, topic: str, name: str, clock: IReactorTime,
                 policy: RetryPolicy = RetryPolicy(), metrics: Metrics | None = None) -> None:
        self.name = name
        self.exchange = topic
        self.policy = policy
        self._topic = pubsub.topic(topic)
        self._clock = clock
        self._handler: Handler | None = None
        self._sleeps = Sleeps(clock)
        metrics = metrics or Metrics()
        self._acked, self._dead, self._retries = queue_counters(metrics, name)

    def publish(self, data: Any) -> Deferred[None]:
        """Publish on the topic (every subscriber gets it, this queue's consumer once)."""
        return self._topic.publish(data)

    def consume(self, handler: Handler) -> None:
        """Subscribe ``handler`` (it gets each publication's JSON body)."""
        if self._handler is not None:
            raise ValueError("work queue %s already has a consumer" % self.name)
        self._handler = handler
        self._topic.subscribe(self._on_publication)

    def resume(self) -> None:
        """Nothing is kept between runs without a broker: nothing to take up."""

    def stop(self) -> None:
        """Unsubscribe and stop retrying (at shutdown)."""
        self._topic.unsubscribe(self._on_publication)
        self._sleeps.stop()

    def _on_publication(self, data: Any) -> None:
        try:
            body = encode_json(data).encode("utf-8")  # as the broker would carry it
        except (TypeError, ValueError):
            self.log.warn("a publication on {topic} is not JSON: ignored", topic=self.exchange)
            return
        d = Deferred.fromCoroutine(self._handle(body))
        d.addErrback(lambda f: self.log.failure("{queue} lost track of a message", f,
                                                queue=self.name))

    async def _handle(self, body: bytes) -> None:
        assert self._handler is not None
        settled = await attempt(self._handler, body, self.policy, self._sleeps.sleep,
                                self._retrying)
        if settled.outcome is Outcome.DONE:
            self._acked.inc()
        elif settled.outcome is Outcome.DEAD:
            self._dead.inc()
            self.log.warn("a publication on {topic} can never succeed, dropped (no broker "
                          "to keep dead letters): {reason}", topic=self.exchange,
                          reason=settled.reason)

    def _retrying(self, failure: Failure, delay: float) -> None:
        if self._sleeps.stopped:
            return
        self._retries.inc()
        self.log.info("a publication on {topic} failed ({reason}); retrying in {delay} s",
                      topic=self.exchange, reason=failure.getErrorMessage(), delay=delay)
