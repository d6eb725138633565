"""Long work on the reactor thread, cut into steps that each end well within a turn.

The reactor runs everything else (``/healthz``, the push receiver, the event
streams) between two steps, so a step must be short: a few milliseconds.
:func:`sorted_in_steps` sorts a large list in runs and merges them lazily
(``list.sort`` of a million items is one C call of a second or more, which
no thread can interrupt: the GIL is held throughout). :class:`TurnBudget`
gives the reactor back once the current turn has run long enough.
"""

from __future__ import annotations

import heapq
from typing import Any, Callable, Iterator, Sequence, TypeVar

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


__all__ = ["TURN", "SORT_RUN", "TurnBudget", "sorted_in_steps"]
