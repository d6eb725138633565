"""Large JSON answers written a bounded chunk per reactor turn, as the transport asks.

A list of a million profiles is hundreds of megabytes of JSON and seconds of
work: built at once, it holds the reactor (no ``/healthz``, no push, no
event stream) and the memory. :class:`StreamedBody` instead pulls *pieces*
of the answer (``bytes``) from an iterator, writes at most ``chunk`` bytes
per reactor turn, and gives the reactor back between turns
(``callLater(0)``). It is the request's push producer: while the
connection's buffer is full twisted.web pauses it and nothing is made; when
the client goes away it stops and the handler's wait is cancelled, which
Klein drops quietly.

An empty piece (``b""``) ends the current turn without writing: an iterator
that does a long step (sorting a run of a large list) yields one after it,
so no turn does more than one such step. A piece that is a Deferred (work
done elsewhere: a page read from the database in its thread) ends the turn
too, and the next piece is pulled once it has fired (:func:`paged` makes
such an iterator: :func:`mailhub.steps.paged`).

The helpers below make the pieces of a JSON array byte for byte as
:func:`mailhub.web.common.json_bytes` of the whole list would be.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailhub.steps import TURN, hold_full_collections
from mailhub.web.common import json_bytes

T = TypeVar("T")

#: Bytes written per reactor turn at most (one piece may exceed it).
CHUNK = 64 * 1024
#: Items encoded per piece: one json.dumps call for a batch.
BATCH = 500



@implementer(IPushProducer)
class StreamedBody:
    """Writes ``pieces`` to ``request`` a bounded chunk per reactor turn.

    :meth:`start` registers the producer and returns a Deferred that fires
    when the last piece is written (the handler then returns and Klein
    finishes the request), fails with the iterator's exception, or fails
    with CancelledError when the client goes away. Cancelling it stops
    production.
    """

    log = Logger()

    def __init__(self, request: Any, pieces: Iterator["bytes | Deferred[Any]"], clock: IReactorTime,
                 chunk: int = CHUNK) -> None:
        self._request = request
        self._pieces = pieces
        self._clock = clock
        self._chunk = chunk
        self._paused = False
        self._stopped = False
        self._call: IDelayedCall | None = None
        self._waiting: Deferred[Any] | None = None
        self.done: Deferred[None] = Deferred(self._cancelled)
        self._release: Callable[[], None] = lambda: None
        #: Reactor turns taken so far (for tests and the benchmark).
        self.turns = 0

    def start(self) -> "Deferred[None]":
        """Register on the request and write the first chunk now.

        No full garbage collection runs until the answer ends
        (:func:`mailhub.steps.hold_full_collections`): one would follow
        every container the process holds, the reactor waiting, and an
        answer of a million profiles lasts seconds."""
        self.done.addBoth(self._release_collections)
        self._release = hold_full_collections()
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(self._gone)
        self._turn()
        return self.done

    # -- IPushProducer ------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        self._unschedule()

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        # The transport stops us before the request learns the connection is
        # lost; ``done`` fails then (:meth:`_gone`), or is cancelled by Klein,
        # once the request is finished, so nothing logs the hang-up as an error.
        self._stopped = True
        self._unschedule()
        self._close()

    def _close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()

    # -- the work -----------------------------------------------------------

    def _release_collections(self, result: object) -> object:
        self._release()
        return result

    def _schedule(self) -> None:
        if (self._call is None and self._waiting is None and not self._stopped
                and not self._paused):
            self._call = self._clock.callLater(0, self._turn)

    def _unschedule(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _turn(self) -> None:
        self._call = None
        if self._stopped or self._paused:
            return
        self.turns += 1
        buffer: list[bytes] = []
        size = 0
        finished = False
        waiting: Deferred[Any] | None = None
        try:
            while size < self._chunk:
                piece = next(self._pieces, None)
                if piece is None:
                    finished = True
                    break
                if isinstance(piece, Deferred):
                    waiting = piece
                    break
                if not piece:
                    break
                buffer.append(piece)
                size += len(piece)
        except Exception:
            self._stop(Failure())
            return
        if buffer:
            # May pause us at once (the transport's buffer is full).
            self._request.write(b"".join(buffer))
        if waiting is not None:
            self._waiting = waiting
            waiting.addCallbacks(self._waited, self._stop)
            return
        if finished:
            self._stopped = True
            self._request.unregisterProducer()
            if not self.done.called:
                self.done.callback(None)
            return
        self._schedule()

    def _waited(self, _: object) -> None:
        self._waiting = None
        self._schedule()

    def _stop(self, reason: BaseException | Failure) -> None:
        if self.done.called:
            return
        self._stopped = True
        self._unschedule()
        self._close()
        try:
            self._request.unregisterProducer()
        except Exception:
            pass
        if not self.done.called:
            self.done.errback(reason)

    def _gone(self, failure: Failure) -> None:
        """The connection was lost before the answer ended."""
        self._stop(CancelledError("the client went away"))

    def _cancelled(self, _: "Deferred[None]") -> None:
        # The handler was cancelled (Klein does so when the client goes away).
        self._stopped = True
        self._unschedule()
        self._close()


def json_array(items: Iterable[Any], encode: Callable[[Sequence[Any]], bytes],
               batch: int = BATCH) -> Iterator["bytes | Deferred[Any]"]:
    """The pieces of a JSON array: ``[``, encoded batches joined by ``,``, ``]``.

    ``encode`` turns a batch of items into their JSON texts joined by commas
    (no brackets). A :data:`TURN` from ``items`` (an item that *is* ``b""``)
    is passed on, so a long step upstream ends the writer's turn; so is a
    Deferred (:func:`mailhub.steps.paged`), after the items before it are written.
    """
    yield b"["
    first = True
    pending: list[Any] = []
    for item in items:
        if item is TURN or isinstance(item, Deferred):
            if pending:
                yield (b"" if first else b",") + encode(pending)
                first = False
                pending = []
            yield item
            continue
        pending.append(item)
        if len(pending) >= batch:
            yield (b"" if first else b",") + encode(pending)
            first = False
            pending = []
    if pending:
        yield (b"" if first else b",") + encode(pending)
    yield b"]"


def json_values(values: Sequence[Any]) -> bytes:
    """Plain JSON values joined by commas, exactly as inside ``json_bytes(list)``."""
    return json_bytes(list(values))[1:-1]


__all__ = ["StreamedBody", "json_array", "json_values", "CHUNK"]
