"""Run ``twistd`` with two clocks inside the process, for bench/stall.

    python bench/stall/traced.py TRACE-FILE twistd-arguments...

Writes to TRACE-FILE one line per event worth knowing when a reactor stall
is to be explained:

- ``lag START SECONDS CPU``: a 10 ms timer on the reactor ran SECONDS late
  (only lags of 5 ms and more): the reactor was held. CPU is the processor
  time the reactor's thread used meanwhile: near SECONDS, the reactor's own
  work held it; far below, it waited for the GIL (another thread) or for a
  processor (a loaded machine);
- ``gc START SECONDS GENERATION``: a garbage collection took SECONDS (5 ms
  and more), in whichever thread it ran; while it runs no other thread,
  the reactor's included, can run Python code.

With ``MAILHUB_STALL_GC_DETAIL=1``, a long full collection is followed by a
``#`` line counting the objects it scanned by type (slow: for diagnosis).

START is ``time.monotonic()``, the same clock in every process of the
machine, so the benchmark can match the lines with the phases it timed.
Nothing here is part of mailhub: it is how the benchmark looks inside.
"""

from __future__ import annotations

import collections
import gc
import os
import sys
import time
from typing import Any

TICK = 0.01
WORTH = 0.005


def main() -> None:
    trace = open(sys.argv[1], "a", buffering=1)
    begun: list[float] = [0.0]
    detail = bool(os.environ.get("MAILHUB_STALL_GC_DETAIL"))

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        now = time.monotonic()
        if phase == "start":
            begun[0] = now
        elif now - begun[0] >= WORTH:
            trace.write("gc %.6f %.6f %d\n" % (begun[0], now - begun[0], info["generation"]))
            if detail and info["generation"] == 2:
                kinds = collections.Counter(type(o).__name__ for o in gc.get_objects(2))
                trace.write("# gen 2 holds %d objects, most: %s\n"
                            % (sum(kinds.values()), kinds.most_common(6)))

    gc.callbacks.append(on_gc)

    from twisted.internet import reactor

    due = [0.0]
    used = [0.0]

    def tick() -> None:
        now = time.monotonic()
        cpu = time.thread_time()
        if now - due[0] >= WORTH:
            trace.write("lag %.6f %.6f %.6f\n" % (due[0], now - due[0], cpu - used[0]))
        due[0] = now + TICK
        used[0] = cpu
        reactor.callLater(TICK, tick)  # type: ignore[attr-defined]

    def start() -> None:
        due[0] = time.monotonic() + TICK
        used[0] = time.thread_time()
        reactor.callLater(TICK, tick)  # type: ignore[attr-defined]

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]

    from twisted.scripts.twistd import run

    sys.argv = ["twistd"] + sys.argv[2:]
    run()


if __name__ == "__main__":
    main()
