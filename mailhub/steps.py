"""Long work on the reactor thread, cut into steps that each end well within a turn.

The reactor runs everything else (``/healthz``, the push receiver, the event
streams) between two steps, so a step must be short: a few milliseconds.
:func:`sorted_in_steps` sorts a large list in runs and merges them lazily
(``list.sort`` of a million items is one C call of a second or more, which
no thread can interrupt: the GIL is held throughout). :class:`TurnBudget`
gives the reactor back once the current turn has run long enough.
"""

from __future__ import annotations

import gc
import heapq
from typing import Any, Callable, Iterator, Sequence, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

T = TypeVar("T")

#: Items sorted in one step: about 10 ms of sorting on this machine.
SORT_RUN = 20_000

#: What :func:`sorted_in_steps` yields after a long step (never an item).
TURN = b""


def sorted_in_steps(items: Sequence[T], key: Callable[[T], Any],
                    keep: Callable[[T], bool] | None = None,
                    run: int = SORT_RUN) -> Iterator[T]:
    """``sorted(filter(keep, items), key=key)``, a :data:`TURN` after each long step.

    ``items`` is a snapshot (a list): it is sorted in runs of ``run`` items,
    one run per step, and the runs are merged lazily, so no step holds the
    reactor for the whole sort. The order is the same as ``sorted``'s
    (stable: equal keys keep the snapshot's order).
    """
    runs: list[list[T]] = []
    for start in range(0, len(items), run):
        part = items[start:start + run]
        chosen = [i for i in part if keep(i)] if keep is not None else list(part)
        chosen.sort(key=key)
        runs.append(chosen)
        if start + run < len(items):
            yield TURN  # type: ignore[misc]
    if len(runs) == 1:
        yield from runs[0]
    else:
        yield from heapq.merge(*runs, key=key)




class TurnBudget:
    """Gives the reactor back (``callLater(0)``) once a turn has run ``budget`` seconds.

    Time comes from ``clock``: on the reactor, wall-clock time; with a test's
    ``Clock`` it stands still, so a test's work runs in one go unless the
    test moves the clock.
    """

    def __init__(self, clock: IReactorTime, budget: float = 0.01) -> None:
        self._clock = clock
        self._budget = budget
        self._start = clock.seconds()
        #: Times the reactor was given back (for tests and the benchmark).
        self.yields = 0

    async def check(self) -> None:
        """Return at once, or after a reactor turn if this one has run long enough."""
        if self._clock.seconds() - self._start >= self._budget:
            await deferLater(self._clock, 0, lambda: None)
            self.yields += 1
            self._start = self._clock.seconds()


class _Held:
    """A state of the garbage collector kept while anyone holds it: made at
    the first hold, undone after the last release (each release counts once)."""

    def __init__(self, begin: Callable[[], None], end: Callable[[], None]) -> None:
        self._begin = begin
        self._end = end
        self._holds = 0

    def hold(self) -> Callable[[], None]:
        if self._holds == 0:
            self._begin()
        self._holds += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._holds -= 1
            if self._holds == 0:
                self._end()

        return release


#: The full-collection threshold while :func:`hold_full_collections` holds:
#: never reached.
NEVER = 2**31 - 1

_saved_threshold = 0


def _no_full_collections() -> None:
    global _saved_threshold
    young, middle, _saved_threshold = gc.get_threshold()
    gc.set_threshold(young, middle, NEVER)


def _full_collections_again() -> None:
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, _saved_threshold)


_full = _Held(_no_full_collections, _full_collections_again)


def hold_full_collections() -> Callable[[], None]:
    """Keep the garbage collector from full collections until the returned
    function is called (each hold released once; holds nest).

    A full collection traverses every container in the oldest generation,
    on whichever thread allocates, holding the GIL: with millions of
    objects alive it took 80 to 300 ms while the reactor waited
    (bench/stall). Holds are taken while a large answer is written and
    while the directory loads. The young generations are still collected as
    usual (they hold what a turn makes); cyclic garbage that reached the
    oldest waits for the release.
    """
    return _full.hold()


_was_enabled = True


def _no_collections() -> None:
    global _was_enabled
    _was_enabled = gc.isenabled()
    gc.disable()


def _collections_again() -> None:
    if _was_enabled:
        gc.enable()


_all = _Held(_no_collections, _collections_again)


def pause_collections() -> Callable[[], None]:
    """No garbage collection at all until the returned function is called
    (each pause released once; pauses nest).

    For a load of the directory in this process: its thread makes lists of
    a million items that are young while they grow, and a young
    generation's collection follows every reference of every young list (a
    tenth of a second for a million, the GIL held). Reference counting
    still frees everything that is not in a cycle; the collections resume
    after, from where they were.
    """
    return _all.hold()


def return_freed_memory() -> None:
    """Give the memory the C allocator holds free back to the system (glibc's
    ``malloc_trim``; nothing elsewhere). Blocking: for a thread.

    After a load that made and freed hundreds of megabytes of small objects
    and lists, glibc keeps much of it (its threshold for giving large blocks
    back grows with each one freed): the resident size stayed 500 MiB
    above what the table holds at a million profiles.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def paged(fetch: Callable[[str], "Deferred[list[T]]"],
          key: Callable[[T], str]) -> Iterator["T | Deferred[Any]"]:
    """The items of page after page, each page ``fetch(after)`` where
    ``after`` is the last item's ``key`` ("" first), until an empty page.

    Each fetch is given out as a Deferred, its items after it: a
    :class:`~mailhub.web.streaming.StreamedBody` waits for it (through
    :func:`~mailhub.web.streaming.json_array`) with the reactor free."""
    after = ""
    while True:
        page: list[T] = []
        yield fetch(after).addCallback(page.extend)
        if not page:
            return
        yield from page
        after = key(page[-1])


__all__ = ["TURN", "SORT_RUN", "TurnBudget", "hold_full_collections", "paged", "pause_collections",
           "return_freed_memory", "sorted_in_steps"]
