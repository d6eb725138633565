"""PostgreSQL LISTEN/NOTIFY: every instance hears of a change as it commits.

Each write to the directory's change log on PostgreSQL sends ``NOTIFY
mailhub_changes`` in its transaction (:meth:`mailhub.directory.sql._Transaction.changed`);
PostgreSQL delivers it to every listening connection when the transaction
commits. :class:`ChangeListener` keeps one such connection in a thread of its
own (psycopg is blocking; the store's thread pool is not tied up by a wait
that never ends) and hands each notification to the reactor with
``callFromThread``; the directory then reads the change log at once instead
of at its next poll. A lost connection is made again with a growing delay
(0.5 s doubling to 30 s); after each (re)connection the callback is called
too, since notifications sent while nobody listened are gone. Polling stays
on as the fallback.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailhub.config import redact
from mailhub.directory.sql import CHANNEL

#: Seconds between two looks at the stop flag while waiting for notifications.
WAKE_EVERY = 0.5


class ChangeListener(Service):
    """A thread that LISTENs on PostgreSQL and calls ``notified`` on the reactor.

    ``notified`` takes no argument (the change log says what changed).
    ``listening`` is set (a ``threading.Event``) while the connection is
    up and LISTEN has been sent: tests wait on it before writing.
    """

    log = Logger()
    name = "database-listener"  # type: ignore[assignment]

    def __init__(self, dsn: str, reactor: Any, notified: Callable[[], None],
                 max_delay: float = 30.0) -> None:
        self.dsn = dsn
        self._reactor = reactor
        self._notified = notified
        self._max_delay = max_delay
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped: Deferred[None] | None = None
        self.listening = threading.Event()
        #: Notifications handed to the reactor so far (for tests and metrics).
        self.received = 0

    def startService(self) -> None:
        super().startService()
        self._stop.clear()
        self._stopped = Deferred()
        self._thread = threading.Thread(target=self._run, name="mailhub-db-listen", daemon=True)
        self._thread.start()

    def stopService(self) -> "Deferred[None] | None":
        super().stopService()
        self._stop.set()
        return self._stopped

    # -- the listening thread (never touches Twisted but through callFromThread) --

    def _run(self) -> None:
        delay = 0.5
        try:
            while not self._stop.is_set():
                try:
                    self._listen()
                    delay = 0.5
                except Exception as e:
                    self.listening.clear()
                    if self._stop.is_set():
                        break
                    self._say("database listener: connection lost or refused ({error}); "
                              "trying again in {delay} s (polling goes on)",
                              error=_first_line(e), delay=delay)
                    self._stop.wait(delay)
                    delay = min(delay * 2, self._max_delay)
        finally:
            self.listening.clear()
            stopped = self._stopped
            if stopped is not None:
                self._reactor.callFromThread(stopped.callback, None)

    def _listen(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute("LISTEN %s" % CHANNEL)
            self.listening.set()
            self._say("database listener: listening for changes on {dsn}", dsn=redact(self.dsn))
            # Changes made while nobody listened sent notifications nobody got.
            self._hand_over()
            while not self._stop.is_set():
                for _ in conn.notifies(timeout=WAKE_EVERY, stop_after=1):
                    self._hand_over()

    def _hand_over(self) -> None:
        self.received += 1
        self._reactor.callFromThread(self._notified)

    def _say(self, text: str, **fields: Any) -> None:
        self._reactor.callFromThread(lambda: self.log.info(text, **fields))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
