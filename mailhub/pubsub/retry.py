"""The one retry policy of every work queue: try until it succeeds or can never.

Both work queues (:class:`~mailhub.pubsub.workqueue.WorkQueue` over RabbitMQ,
:class:`~mailhub.pubsub.spool.SpoolQueue` in a folder) hand each message to
:func:`attempt`, and differ only in what they do with the outcome (ack or
remove the file; dead-letter queue or ``dead/`` folder; leave it to the broker
or to the next start):

- the handler succeeds: :attr:`Outcome.DONE`;
- it raises :class:`~mailhub.errors.ValidationError`: the message can never
  succeed, :attr:`Outcome.DEAD` with the reason;
- anything else is transient: wait ``initial`` seconds, then twice as long
  each time up to ``maximum``, and try again; when the wait is cut short
  (connection lost, shutdown), :attr:`Outcome.ABANDONED`: the message is
  kept where it is for someone else to take up.
"""

from __future__ import annotations

import enum
import inspect
from typing import Any, Awaitable, Callable

import attrs
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from mailhub.errors import ValidationError
from mailhub.metrics import Metrics


def queue_counters(metrics: Metrics, queue: str) -> tuple[Any, Any, Any]:
    """The acked, dead-lettered and retried counters of the work queue ``queue``.

    Every work queue that retries counts under the same names, labelled by
    queue, whichever implementation handles it.
    """
    return (
        metrics.counter("mailhub_workqueue_acked_total",
                        "work queue messages handled and acked", ["queue"]).labels(queue),
        metrics.counter("mailhub_workqueue_dead_lettered_total",
                        "work queue messages sent to the dead-letter queue",
                        ["queue"]).labels(queue),
        metrics.counter("mailhub_workqueue_retries_total",
                        "work queue handler failures that will be retried",
                        ["queue"]).labels(queue),
    )


@attrs.frozen
class RetryPolicy:
    """Exponential backoff: ``initial`` seconds, doubling up to ``maximum``."""

    initial: float = 1.0
    maximum: float = 300.0

    def after(self, delay: float) -> float:
        """The wait that follows a wait of ``delay`` seconds."""
        return min(delay * 2, self.maximum)


class Outcome(enum.Enum):
    """How the handling of one message ended."""

    DONE = "done"
    DEAD = "dead"
    ABANDONED = "abandoned"


@attrs.frozen
class Settled:
    """An outcome, with the reason when the message is dead."""

    outcome: Outcome
    reason: str = ""


def call_handler(handler: Callable[[Any], Any], value: Any) -> Deferred[Any]:
    """Call a handler that may return a value, a Deferred or a coroutine."""
    def call() -> Any:
        result = handler(value)
        if inspect.iscoroutine(result):
            return Deferred.fromCoroutine(result)
        return result
    return maybeDeferred(call)


async def attempt(handler: Callable[[bytes], Any], body: bytes, policy: RetryPolicy,
                  wait: Callable[[float], Awaitable[bool]],
                  retrying: Callable[[Failure, float], None],
                  alive: Callable[[], bool] = lambda: True) -> Settled:
    """Run ``handler(body)`` until it succeeds or can never succeed.

    ``wait(delay)`` sleeps and says whether to go on (False: abandon);
    ``retrying(failure, delay)`` is told of each transient failure before
    the wait (to count and log it); ``alive()`` is asked before each try.
    """
    delay = policy.initial
    while True:
        if not alive():
            return Settled(Outcome.ABANDONED)
        try:
            await call_handler(handler, body)
        except ValidationError as e:
            return Settled(Outcome.DEAD, "; ".join(e.messages))
        except Exception:
            retrying(Failure(), delay)
            if not await wait(delay):
                return Settled(Outcome.ABANDONED)
            delay = policy.after(delay)
            continue
        return Settled(Outcome.DONE)


class Sleeps:
    """The waits between tries of one in-process queue, all cut short by :meth:`stop`."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._sleeping: set[Deferred[None]] = set()
        self.stopped = False

    async def sleep(self, delay: float) -> bool:
        """Wait ``delay`` seconds; False when stopped meanwhile (or already)."""
        if self.stopped:
            return False
        sleep: Deferred[None] = deferLater(self._clock, delay, lambda: None)
        self._sleeping.add(sleep)
        try:
            await sleep
        except CancelledError:
            return False
        finally:
            self._sleeping.discard(sleep)
        return not self.stopped

    def stop(self) -> None:
        """End every wait now (their messages are abandoned)."""
        self.stopped = True
        for sleep in list(self._sleeping):
            sleep.cancel()
