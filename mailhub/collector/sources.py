"""Where collector messages come from inside mailhub: sent mail and calendar events.

Both sources turn what they see into the ``collector:email`` message
(``{"userId" | "userEmail", "emails": [...]}``) and publish it on the
collector's work queue (an :class:`~mailhub.pubsub.interfaces.IWorkQueue`:
RabbitMQ's with a broker, the spool in the data folder without one; both
keep each message until it is collected or decided, retry transient failures
and keep what can never be collected as a dead letter with its reason).

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

import re
from typing import Any, Callable, Iterable

import vobject
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailhub.collector.addresses import format_address
from mailhub.collector.engine import message_body
from mailhub.decoding import decode_json_object
from mailhub.errors import ValidationError
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.pubsub.interfaces import IWorkQueue

CALENDAR_TOPICS = ("calendar:event:created", "calendar:event:updated")
MAIL_APPEND = "mail:append"


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

    def __init__(self, hub: Hub, queue: IWorkQueue, sent_folders: Iterable[str],
                 metrics: Metrics | None = None) -> None:
        self._hub = hub
        self._queue = queue
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
        """A ``mail:append`` payload: queue its recipients if it went to a sent folder."""
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
        message_id = data.get("message_id")
        return self._queue.publish(message_body(
            emails, user_email=user, source="mail",
            message_id=message_id.strip() if isinstance(message_id, str) else None))


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


def jcal_event(jcal: Any) -> tuple[str, str]:
    """(UID, organizer address) of the first event of a jCal value ("" when absent)."""
    uid = organizer = ""

    def walk(component: Any) -> None:
        nonlocal uid, organizer
        if not (isinstance(component, list) and len(component) >= 2) or (uid and organizer):
            return
        for prop in component[1] if isinstance(component[1], list) else []:
            if isinstance(prop, list) and len(prop) >= 4 and isinstance(prop[0], str):
                name = prop[0].lower()
                if name == "uid" and not uid and isinstance(prop[3], str):
                    uid = prop[3].strip()
                elif name == "organizer" and not organizer:
                    organizer = _cal_address(prop[3]) or ""
        if len(component) >= 3 and isinstance(component[2], list):
            for sub in component[2]:
                walk(sub)

    walk(jcal)
    return uid, organizer


def ical_event(text: str) -> tuple[str, str]:
    """(UID, organizer address) of the first event of an iCalendar text ("" when
    absent or unreadable: :func:`ical_addresses` says why)."""
    try:
        for calendar in vobject.readComponents(text):
            for component in calendar.getChildren():
                children = list(getattr(component, "getChildren", lambda: [])())
                uids = [c.value for c in children if c.name == "UID"]
                organizers = [c.value for c in children if c.name == "ORGANIZER"]
                if uids or organizers:
                    uid = uids[0] if uids and isinstance(uids[0], str) else ""
                    organizer = _cal_address(organizers[0]) if organizers else None
                    return uid.strip(), organizer or ""
    except Exception:  # vobject raises many types on bad input
        pass
    return "", ""


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

    ``shared(topic)`` gives a shared subscription to each calendar topic
    (:meth:`mailhub.pubsub.wiring.PubSub.shared_subscription`). With a
    broker that is one durable queue that every mailhub instance consumes, so
    each event is queued once across the instances, and acked only once the
    collector queue accepted it (a failing ``publish`` on the collector's
    queue, e.g. a full outbox, is retried with backoff, never dropped; a body
    that is not an ESN event goes to the dead-letter queue with the reason).
    Without a broker it is the local topic, with the same retries.
    """

    log = Logger()

    def __init__(self, queue: IWorkQueue, shared: Callable[[str], IWorkQueue],
                 metrics: Metrics | None = None) -> None:
        self._queue = queue
        self._shared = shared
        self._queues: list[IWorkQueue] = []
        metrics = metrics or Metrics()
        self._seen = metrics.counter("mailhub_collector_source_messages_total",
                                     "Collector messages made by the built-in sources",
                                     ["source"])

    def start(self) -> None:
        for topic in CALENDAR_TOPICS:
            queue = self._shared(topic)
            queue.consume(self.on_message)
            self._queues.append(queue)

    def stop(self) -> None:
        """Stop the shared subscriptions' pending retries (with a broker, it keeps
        those messages for the next consumer)."""
        for queue in self._queues:
            queue.stop()

    def on_message(self, body: bytes) -> Deferred[Any] | None:
        """A raw message from a shared calendar queue.

        Raises ValidationError (dead letter) when it is not an ESN calendar
        event; returns what the collector queue's ``publish`` returns, so the
        message is acked only after that queue accepted it.
        """
        return self._submit(decode_json_object(body, "the calendar event"))

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
        uid, organizer = jcal_event(data.get("event"))
        # The owner is resolved by the engine (ESN id, else the organizer),
        # which also collects only the organizer's own copy ([collector] calendar).
        return self._queue.publish(message_body(emails, user_id=user, source="calendar",
                                                event_uid=uid, organizer=organizer))
