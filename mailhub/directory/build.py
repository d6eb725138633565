"""The directory's table built by a process of its own, for a start with none saved.

Reading a million profiles and indexing them is about ten seconds of Python.
In the server's own process that work holds the GIL against the reactor
(pauses of tens of milliseconds), and its millions of short-lived small
objects leave the allocator's memory pinned by whatever the reactor kept
meanwhile (the process stayed at 700 bytes a profile instead of 250). So
mailhub runs it as ``python -m mailhub.directory.build``, on the other
processor, which writes the table where the server keeps its saved one
(:mod:`mailhub.directory.snapshot`): the server then reads it as it reads
any saved table, and applies the changes logged since the build began.

The child reads its orders as one line of JSON on standard input (the DSN
may hold a password: never on the command line, where ``ps`` shows it):
``{"dsn": ..., "site": ..., "out": ...}``. Once the file is written it
prints a line of JSON on standard output (``profiles``, ``seconds``,
``peak_mib``: what the server logs of the build) and exits 0; else it exits
1 with one line on standard error.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailhub.errors import Unavailable


def build(dsn: str, site: str, out: Path) -> int:
    """Read the database, write its table to ``out``; the profiles written."""
    from mailhub.directory import snapshot
    from mailhub.directory.sql import SQLStore, dialect_for, result_of, run_inline
    from mailhub.steps import hold_full_collections, pause_collections

    pause_collections()
    hold_full_collections()
    store = SQLStore(dialect_for(dsn), site, runner=run_inline)
    # The log's position before the read: a change made during it is
    # applied again by the server, which is harmless.
    seq = result_of(store.last_change())
    table = result_of(store.load_table())
    identity, at, _ = result_of(store.mark(seq))
    snapshot.write(out, table.state(), snapshot.Mark(identity, seq, at))
    store.close_all()
    return len(table)


def main() -> None:
    began = time.monotonic()
    try:
        orders = json.loads(sys.stdin.readline())
        profiles = build(orders["dsn"], orders["site"], Path(orders["out"]))
    except Exception as e:  # one line for the server's log, whatever it was
        sys.stderr.write("%s: %s\n" % (type(e).__name__, e))
        sys.exit(1)
    # What the server logs of the build: its time and its memory's peak.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sys.stdout.write(json.dumps({"profiles": profiles, "seconds": time.monotonic() - began,
                                 "peak_mib": peak}) + "\n")


class _Child(ProcessProtocol):
    log = Logger()

    def __init__(self, orders: bytes) -> None:
        self.orders = orders
        self.said = b""
        self.errors = b""
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.orders)  # type: ignore[union-attr]
        self.transport.closeStdin()  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        self.said = (self.said + data)[-2000:]

    def errReceived(self, data: bytes) -> None:
        self.errors = (self.errors + data)[-2000:]

    def processEnded(self, reason: Failure) -> None:
        if reason.check(ProcessDone):
            try:
                summary = json.loads(self.said.decode("utf-8").strip().splitlines()[-1])
                self.log.info("directory table built by a child process: {profiles} profiles "
                              "in {seconds:.1f} s, at most {peak_mib:.0f} MiB", **summary)
            except (ValueError, IndexError, KeyError, TypeError):
                pass
            self.done.callback(None)
        else:
            said = self.errors.decode("utf-8", "replace").strip().splitlines()
            self.done.errback(Unavailable("the directory's build process failed: %s"
                                          % (said[-1] if said else reason.getErrorMessage())))


def in_child(reactor: Any, dsn: str, site: str, out: Path) -> "Deferred[None]":
    """Run :func:`build` in a child process; fires when ``out`` is written,
    fails with Unavailable (and what the child said) when not."""
    orders = json.dumps({"dsn": dsn, "site": site, "out": str(out)}).encode() + b"\n"
    child = _Child(orders)
    reactor.spawnProcess(child, sys.executable,
                         [sys.executable, "-m", "mailhub.directory.build"],
                         env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r"})
    return child.done


if __name__ == "__main__":
    main()
