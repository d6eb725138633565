"""The seams of pubsub: what the rest of mailhub may rely on.

Two implementations of each, chosen once by :mod:`mailhub.pubsub.wiring`
from the configuration, so no caller ever asks which one it has:

- :class:`IPubSub` / :class:`ITopic`: :class:`~mailhub.pubsub.local.LocalPubSub`
  in process, :class:`~mailhub.pubsub.globalpubsub.GlobalPubSub` over RabbitMQ;
- :class:`IWorkQueue`: :class:`~mailhub.pubsub.spool.SpoolQueue` (files in a
  folder) without a broker, :class:`~mailhub.pubsub.workqueue.WorkQueue` with one.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

#: A subscriber: called with each publication's data; may return a value, a
#: Deferred or a coroutine (the publisher's Deferred waits for it).
Subscriber = Callable[[Any], Any]
#: A subscriber to several topics: called with the topic and the data.
TopicSubscriber = Callable[[str, Any], Any]
#: A work queue's consumer: called with each message's body (bytes); a
#: :class:`~mailhub.errors.ValidationError` means "never", anything else
#: "not now, try again".
Handler = Callable[[bytes], Any]


class ITopic(Interface):
    """One named topic: ESN's ``subscribe / unsubscribe / publish / forward``."""

    name = Attribute("the topic's name (str), as ESN names it, e.g. 'mail:new'")

    def subscribe(callback: Subscriber) -> Deferred[None]:
        """Call ``callback(data)`` for every publication on this topic.

        The Deferred fires when the subscription is in place (at once in
        process; over RabbitMQ once its queue is bound); callers may ignore it.
        """

    def unsubscribe(callback: Subscriber) -> None:
        """Stop calling ``callback`` (a callback never subscribed is ignored)."""

    def publish(data: Any) -> Deferred[None]:
        """Publish ``data`` (JSON-encodable).

        This process's subscribers are called at once, in publication order.
        The Deferred fires when the publication is done (over RabbitMQ: also
        confirmed by the broker); it fails with
        :class:`~mailhub.errors.Unavailable`, and nobody saw the data, when
        the pubsub has no room (see :meth:`IPubSub.has_room`).
        """

    def forward(other: IPubSub, data: Any) -> Deferred[None]:
        """Publish here, then on ``other`` under the same name (ESN's forward)."""


class IPubSub(Interface):
    """Topics by name, and the back-pressure a publisher needs."""

    def topic(name: str) -> ITopic:
        """The topic called ``name`` (the same object each time)."""

    def subscribe_topics(topics: Sequence[str], callback: TopicSubscriber) -> Deferred[None]:
        """Call ``callback(topic, data)`` for every publication on any of ``topics``.

        One subscription for them all: over RabbitMQ one queue bound to each
        topic's exchange, so publications from another node arrive in the
        order they were published, across topics (one subscription per topic
        keeps order only within each). This process's own publications are
        delivered at once, in order, as on a topic. The Deferred fires when
        it is in place.
        """

    def unsubscribe_topics(topics: Sequence[str], callback: TopicSubscriber) -> None:
        """End the subscription :meth:`subscribe_topics` made with the same arguments."""

    def has_room() -> bool:
        """Whether a publication would be taken now (always, in process)."""

    def when_room() -> Deferred[None]:
        """A Deferred that fires once :meth:`has_room` is true (at once if it is).

        Over RabbitMQ, the outbox is full while the broker has been away
        long; this is how a publisher waits for it without polling.
        """


class IWorkQueue(Interface):
    """A point-to-point queue: each message handled once, until it succeeds.

    Messages survive a stop and a crash of the process; a handler's transient
    failure is retried with exponential backoff
    (:class:`~mailhub.pubsub.retry.RetryPolicy`); a message that can never
    succeed (:class:`~mailhub.errors.ValidationError`) is kept apart, with
    its reason, as a dead letter.
    """

    name = Attribute("the queue's name (str)")

    def publish(data: Any) -> Deferred[None]:
        """Queue one message (bytes as they are, str as UTF-8, anything else as JSON).

        Fires once the message is safe (on disk, or confirmed by the broker);
        fails with :class:`~mailhub.errors.Unavailable` when the queue cannot
        take more now, so the caller can push back.
        """

    def consume(handler: Handler) -> None:
        """Hand every message's body to ``handler`` (one consumer per queue)."""

    def resume() -> None:
        """Start on the messages an earlier run left (called once mailhub is ready).

        Over RabbitMQ the broker redelivers them by itself: nothing to do.
        """

    def stop() -> None:
        """Cancel pending retries (at shutdown); their messages are kept for later."""
