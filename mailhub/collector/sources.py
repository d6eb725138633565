"""Where collector messages come from inside mailhub: sent mail and calendar events.

Both sources turn what they see into the ``collector:email`` message
(``{"userId" | "userEmail", "emails": [...]}``) and hand it to a dispatcher:

- :class:`QueueDispatcher` publishes it on the work queue (persistent,
  confirmed), so with a broker every message gets the queue's guarantees
  (ack after collection, retries, dead letters, one consumer among instances);
- :class:`InProcessDispatcher` (no broker) calls the engine directly and
  retries transient failures with exponential backoff, bounded in number of
  messages held. With a :class:`Spool` (as ``twistd mailhub`` gives it, in
  the data folder) each message is on disk from its acceptance until it is
  collected or decided, so a stop, a crash or a kill -9 loses nothing (the
  next start collects what was held), and what can never be collected is
  kept in ``dead/`` with its reason.

:class:`MailSource` listens to the local ``mail:append`` topic (the push
receiver's MessageAppend events) and collects the recipients of messages
appended to a sent folder. :class:`CalendarSource` takes the global
``calendar:event:created`` / ``calendar:event:updated`` topics in ESN's shape,
through a queue shared by every mailhub instance when there is a broker (each
event is collected once, not once per instance).
:func:`ical_addresses` reads the same attendees from an iCalendar text, for
the HTTP surface in :mod:`mailhub.web.calendar`.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable

import vobject
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailhub.collector.addresses import format_address
from mailhub.collector.engine import message_body
from mailhub.errors import Unavailable, ValidationError
from mailhub.logs import printable
from mailhub.metrics import Metrics

CALENDAR_TOPICS = ("calendar:event:created", "calendar:event:updated")
MAIL_APPEND = "mail:append"


class QueueDispatcher:
    """Submit messages to the work queue (``WorkQueue.publish``)."""

    def __init__(self, publish: Callable[[bytes], Deferred[Any]]) -> None:
        self._publish = publish

    def submit(self, body: bytes) -> Deferred[Any]:
        return self._publish(body)


class Spool:
    """Collector messages on disk, from their acceptance until collected or decided.

    ``folder`` holds one file per message (``<name>.msg``, the body as it
    was submitted), written under a temporary name and renamed, so a crash
    leaves each one whole or absent; ``folder/dead`` holds the messages that
    can never be collected, each with a ``<name>.reason`` beside it. Names
    sort in the order the messages came. Files are not fsynced: they survive
    a crash or a kill -9 of mailhub, not a power cut of the machine.
    """

    log = Logger()

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.dead_folder = folder / "dead"
        self.dead_folder.mkdir(parents=True, exist_ok=True)
        self._counter = itertools.count()

    def keep(self, body: bytes) -> str:
        """Write ``body`` down; its name. Raises Unavailable when the disk refuses."""
        name = "%020d-%d-%06d" % (time.time_ns(), os.getpid(), next(self._counter))
        temporary = self.folder / (name + ".tmp")
        try:
            temporary.write_bytes(body)
            os.replace(temporary, self.folder / (name + ".msg"))
        except OSError as e:
            try:
                temporary.unlink(missing_ok=True)
            except OSError:
                pass  # nothing was written there either
            raise Unavailable("cannot keep the collector message in %s: %s" % (self.folder, e))
        return name

    def done(self, name: str) -> None:
        """The message is collected: forget it."""
        try:
            (self.folder / (name + ".msg")).unlink(missing_ok=True)
        except OSError:
            self.log.failure("cannot remove {name} from the collector spool", name=name)

    def dead(self, name: str, reason: str) -> None:
        """The message can never be collected: keep it in ``dead/`` with the reason."""
        reason_file = self.dead_folder / (name + ".reason")
        temporary = self.dead_folder / (name + ".reason.tmp")
        try:
            # The message first, then its reason (whole, by a rename): whoever
            # sees a reason finds its message beside it.
            os.replace(self.folder / (name + ".msg"), self.dead_folder / (name + ".msg"))
            temporary.write_text(reason + "\n", "utf-8")
            os.replace(temporary, reason_file)
        except OSError:
            self.log.failure("cannot move {name} to the collector spool's dead letters",
                             name=name)

    def dead_count(self) -> int:
        """How many messages ``dead/`` holds."""
        return sum(1 for _ in self.dead_folder.glob("*.msg"))

    def messages(self) -> list[tuple[str, bytes]]:
        """The messages on disk, oldest first (half-written files are removed)."""
        for leftover in [*self.folder.glob("*.tmp"), *self.dead_folder.glob("*.tmp")]:
            leftover.unlink(missing_ok=True)
        found = []
        for path in sorted(self.folder.glob("*.msg")):
            try:
                found.append((path.stem, path.read_bytes()))
            except OSError:
                self.log.failure("cannot read {path} from the collector spool", path=path)
        return found


class InProcessDispatcher:
    """Without a broker: run the engine now, and retry transient failures later.

    ``handler`` is :meth:`CollectorEngine.handle`. A ValidationError ends the
    message (logged, counted, and kept in the spool's ``dead/`` with the
    reason); any other failure retries after ``retry_initial`` seconds,
    doubling up to ``retry_max``. At most ``limit`` messages are held
    (running or waiting); beyond that ``submit`` fails with Unavailable so
    the caller can push back. With a ``spool``, every message is on disk
    until it is collected or decided, and :meth:`recover` takes up again
    what an earlier process left there.
    """

    log = Logger()

    def __init__(self, handler: Callable[[bytes], Deferred[Any]], clock: IReactorTime,
                 retry_initial: float = 1.0, retry_max: float = 300.0, limit: int = 1000,
                 metrics: Metrics | None = None, spool: Spool | None = None) -> None:
        self._handler = handler
        self._clock = clock
        self._initial = retry_initial
        self._max = retry_max
        self._limit = limit
        self._spool = spool
        self._waiting: set[Any] = set()
        self._names: set[str] = set()
        #: Recovered messages waiting for room under ``limit``.
        self._backlog: deque[tuple[str, bytes]] = deque()
        self._stopped = False
        self.held = 0
        self._dead = spool.dead_count() if spool is not None else 0
        metrics = metrics or Metrics()
        self._retries = metrics.counter(
            "mailhub_collector_retries_total", "In-process collector retries (no broker)")
        self._dropped = metrics.counter(
            "mailhub_collector_dropped_total",
            "In-process collector messages ended without collecting: poison (kept in the "
            "spool's dead letters), or refused when too many were held", ["reason"])
        metrics.gauge_callback("mailhub_collector_held", "In-process collector messages held",
                               lambda: self.held + len(self._backlog))
        metrics.gauge_callback("mailhub_collector_spool_dead",
                               "Messages in the collector spool's dead/ (no broker)",
                               lambda: self._dead)

    def submit(self, body: bytes) -> Deferred[Any]:
        """Accept a message (written to the spool first, if any); the engine runs it,
        retrying as needed."""
        if self.held >= self._limit:
            self._dropped.labels(reason="full").inc()
            raise Unavailable("collector is holding %d messages already" % self.held)
        name = self._spool.keep(body) if self._spool is not None else None
        self._start(body, name)
        return succeed(None)

    def recover(self) -> int:
        """Take up the messages a stopped process left in the spool; how many.

        They are started oldest first as room allows under ``limit``, beside
        new messages.
        """
        if self._spool is None:
            return 0
        self._stopped = False
        waiting = {name for name, _ in self._backlog} | self._names
        found = [(name, body) for name, body in self._spool.messages() if name not in waiting]
        self._backlog.extend(found)
        if found:
            self.log.info("collecting {count} messages left in the spool by an earlier run",
                          count=len(found))
        self._take_backlog()
        return len(found)

    def _take_backlog(self) -> None:
        while self._backlog and self.held < self._limit and not self._stopped:
            name, body = self._backlog.popleft()
            self._start(body, name)

    def _start(self, body: bytes, name: str | None) -> None:
        self.held += 1
        if name is not None:
            self._names.add(name)
        self._run(body, self._initial, name)

    def _run(self, body: bytes, delay: float, name: str | None) -> None:
        d = maybeDeferred(self._handler, body)

        def failed(failure: Any) -> None:
            if failure.check(ValidationError):
                self._dropped.labels(reason="poison").inc()
                self.log.warn("collector message dropped: {reason}",
                              reason=printable(failure.getErrorMessage()))
                if self._spool is not None and name is not None:
                    self._spool.dead(name, failure.getErrorMessage())
                    self._dead += 1
                self._finished(name)
                return
            if self._stopped:
                # Shutting down: no more tries here; the spool keeps it for
                # the next start (without one, it is lost, as logged).
                self.log.info("collector message failed while stopping ({reason}); "
                              "{fate}", reason=failure.getErrorMessage(),
                              fate="kept in the spool" if name else "dropped")
                self._finished(name)
                return
            self._retries.inc()
            self.log.info("collector message failed ({reason}); retrying in {delay}s",
                          reason=failure.getErrorMessage(), delay=delay)
            call = self._clock.callLater(delay, self._retry, body, min(delay * 2, self._max),
                                         name)
            self._waiting.add(call)

        def collected(_: object) -> None:
            if self._spool is not None and name is not None:
                self._spool.done(name)
            self._finished(name)

        d.addCallbacks(collected, failed)

    def _finished(self, name: str | None) -> None:
        self.held -= 1
        if name is not None:
            self._names.discard(name)
        self._take_backlog()

    def _retry(self, body: bytes, delay: float, name: str | None) -> None:
        self._waiting = {c for c in self._waiting if c.active()}
        self._run(body, delay, name)

    def stop(self) -> None:
        """Cancel waiting retries (at shutdown); their messages stay in the spool, if any.

        Messages still running finish, but are not tried again here.
        """
        self._stopped = True
        for call in self._waiting:
            if call.active():
                call.cancel()
                self.held -= 1  # its message waits in the spool, not here
        self._waiting.clear()
        self._names.clear()
        self._backlog.clear()


class SpoolRecovery(Service):
    """Takes up, once mailhub runs, what an earlier process left in the spool."""

    def __init__(self, dispatcher: InProcessDispatcher) -> None:
        self.dispatcher = dispatcher

    def startService(self) -> None:
        super().startService()
        self.dispatcher.recover()


def folder_matches(mailbox: str, folders: Iterable[str]) -> bool:
    """True when ``mailbox`` (or its last hierarchy level) is one of ``folders``.

    Case-insensitive; ``/`` and ``.`` separate levels, so ``Sent`` matches
    ``Sent``, ``INBOX.Sent`` and ``INBOX/Sent``; ``Sent Items`` must be listed
    as such.
    """
    name = mailbox.strip().casefold()
    last = re.split(r"[/.]", name)[-1]
    wanted = {f.strip().casefold() for f in folders}
    return name in wanted or last in wanted


class MailSource:
    """Collect the recipients of messages appended to a user's sent folder."""

    log = Logger()

    def __init__(self, hub: Any, dispatcher: Any, sent_folders: Iterable[str],
                 metrics: Metrics | None = None) -> None:
        self._hub = hub
        self._dispatcher = dispatcher
        self._folders = tuple(sent_folders)
        metrics = metrics or Metrics()
        self._seen = metrics.counter("mailhub_collector_source_messages_total",
                                     "Collector messages made by the built-in sources",
                                     ["source"])

    def start(self) -> None:
        self._hub.local.topic(MAIL_APPEND).subscribe(self.on_append)

    def stop(self) -> None:
        self._hub.local.topic(MAIL_APPEND).unsubscribe(self.on_append)

    def on_append(self, data: Any) -> Deferred[Any] | None:
        """A ``mail:append`` payload: submit its recipients if it went to a sent folder."""
        if not isinstance(data, dict):
            return None
        mailbox = data.get("mailbox")
        user = data.get("user")
        special = data.get("special_use") or []
        is_sent = "\\Sent" in special if isinstance(special, list) else False
        if not isinstance(user, str) or not user or not isinstance(mailbox, str):
            return None
        if not (is_sent or folder_matches(mailbox, self._folders)):
            return None
        emails = [data[k] for k in ("to", "cc", "bcc")
                  if isinstance(data.get(k), str) and data[k].strip()]
        if not emails and isinstance(data.get("to_address"), str) and data["to_address"]:
            name = data.get("to_display_name")
            emails = [format_address(name if isinstance(name, str) else "", data["to_address"])]
        if not emails:
            return None
        self._seen.labels(source="mail").inc()
        return self._dispatcher.submit(message_body(emails, user_email=user))


def _cal_address(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    value = value.strip()
    if value.lower().startswith("mailto:"):
        value = value[7:]
    return value or None


def _param(params: dict[str, Any], name: str) -> str:
    for key, value in params.items():
        if key.lower() == name:
            if isinstance(value, list):
                value = value[0] if value else ""
            return value if isinstance(value, str) else ""
    return ""


def attendee_entries(props: Iterable[tuple[str, dict[str, Any], Any]]) -> list[str]:
    """``Name <address>`` entries of ATTENDEE/ORGANIZER properties.

    ``props`` gives (name, params, value) triples; resources (CUTYPE=RESOURCE,
    and ROOM, which is a resource too) are dropped; ``mailto:`` is stripped;
    CN becomes the display name (OpenPaaS threw it away).
    """
    out: list[str] = []
    for name, params, value in props:
        if name.lower() not in ("attendee", "organizer"):
            continue
        if _param(params, "cutype").upper() in ("RESOURCE", "ROOM"):
            continue
        address = _cal_address(value)
        if address:
            out.append(format_address(_param(params, "cn"), address))
    return list(dict.fromkeys(out))


def jcal_addresses(jcal: Any) -> list[str]:
    """Attendees and organizers of every component of a jCal (RFC 7265) value."""
    triples: list[tuple[str, dict[str, Any], Any]] = []

    def walk(component: Any) -> None:
        if not (isinstance(component, list) and len(component) >= 2):
            return
        for prop in component[1] if isinstance(component[1], list) else []:
            if isinstance(prop, list) and len(prop) >= 4 and isinstance(prop[0], str):
                triples.append((prop[0], prop[1] if isinstance(prop[1], dict) else {}, prop[3]))
        if len(component) >= 3 and isinstance(component[2], list):
            for sub in component[2]:
                walk(sub)

    walk(jcal)
    return attendee_entries(triples)


def ical_addresses(text: str) -> list[str]:
    """Attendees and organizers of every event of an iCalendar text.

    Raises ValidationError when the text is not iCalendar.
    """
    triples: list[tuple[str, dict[str, Any], Any]] = []
    try:
        found = False
        for calendar in vobject.readComponents(text):
            found = True
            for component in calendar.getChildren():
                for child in getattr(component, "getChildren", lambda: [])():
                    if child.name in ("ATTENDEE", "ORGANIZER"):
                        triples.append((child.name, dict(child.params), child.value))
        if not found:
            raise ValidationError("the body holds no iCalendar object")
    except ValidationError:
        raise
    except Exception as e:  # vobject raises many types on bad input
        raise ValidationError("the body is not iCalendar: %s" % (str(e).splitlines() or [""])[0])
    return attendee_entries(triples)


def user_of_event_path(path: str) -> str | None:
    """The user id of an ESN event path ``/calendars/{userId}/{calendarId}/{uid}.ics``."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "calendars":
        return parts[1]
    return None


class CalendarSource:
    """Collect attendees of events created or updated in ESN's calendar (global topics).

    With a broker, ``shared(topic)`` gives a shared subscription to each
    calendar topic (:meth:`mailhub.pubsub.wiring.PubSub.shared_subscription`):
    one durable queue that every mailhub instance consumes, so each event is
    submitted once across the instances, and acked only once the dispatcher
    accepted it (a failing ``submit``, e.g. a full outbox, is retried with
    backoff, never dropped; a body that is not an ESN event goes to the
    dead-letter queue with the reason). Without a broker (``shared`` is None
    or gives None) it subscribes to ``hub.global_``, which is local then.
    """

    log = Logger()

    def __init__(self, hub: Any, dispatcher: Any, metrics: Metrics | None = None,
                 shared: Callable[[str], Any] | None = None) -> None:
        self._hub = hub
        self._dispatcher = dispatcher
        self._shared = shared
        self._queues: list[Any] = []
        self._subscribed: list[str] = []
        metrics = metrics or Metrics()
        self._seen = metrics.counter("mailhub_collector_source_messages_total",
                                     "Collector messages made by the built-in sources",
                                     ["source"])

    def start(self) -> None:
        for topic in CALENDAR_TOPICS:
            queue = self._shared(topic) if self._shared is not None else None
            if queue is not None:
                queue.consume(self.on_message)
                self._queues.append(queue)
            else:
                self._hub.global_.topic(topic).subscribe(self.on_event)
                self._subscribed.append(topic)

    def stop(self) -> None:
        """Unsubscribe; cancel the shared queues' pending retries (the broker keeps
        those messages for the next consumer)."""
        for topic in self._subscribed:
            self._hub.global_.topic(topic).unsubscribe(self.on_event)
        self._subscribed = []
        for queue in self._queues:
            queue.stop()

    def on_message(self, body: bytes) -> Deferred[Any] | None:
        """A raw message from a shared calendar queue.

        Raises ValidationError (dead letter) when it is not an ESN calendar
        event; returns what ``dispatcher.submit`` returns, so the message is
        acked only after the dispatcher accepted it.
        """
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise ValidationError("the calendar event is not JSON")
        if not isinstance(data, dict):
            raise ValidationError("the calendar event is not a JSON object")
        return self._submit(data)

    def on_event(self, data: Any) -> Deferred[Any] | None:
        """An ESN calendar event: ``{eventPath, event (jCal), import}``."""
        if not isinstance(data, dict):
            return None
        try:
            return self._submit(data)
        except ValidationError as e:
            self.log.warn("calendar event ignored: {reason}",
                          reason=printable("; ".join(e.messages)))
            return None

    def _submit(self, data: dict[str, Any]) -> Deferred[Any] | None:
        if data.get("import") is True:
            return None
        path = data.get("eventPath")
        user = user_of_event_path(path) if isinstance(path, str) else None
        if user is None:
            raise ValidationError("the calendar event has no usable eventPath")
        emails = jcal_addresses(data.get("event"))
        if not emails:
            return None
        self._seen.labels(source="calendar").inc()
        return self._dispatcher.submit(message_body(emails, user_id=user))
