"""``POST /collector/v1/calendar``: attendees of an iCalendar body become contacts.

For calendar systems without AMQP: the body is an iCalendar text (one or more
events; ``text/calendar``), the user whose collected book receives the
attendees is named by ``user`` (query string: a login, an address or an id),
and the caller proves itself with the site token (``Authorization: Bearer
TOKEN`` or ``token`` in the query string), checked by the
:class:`mailhub.auth.SiteToken` given in ``__init__`` (constant-time, read
per request; a bad token is logged, counted in
``mailhub_auth_failures_total{surface="calendar"}`` and slowed down like the
hooks').

The collector message says it is a calendar event, with the first event's
UID and organizer: the named user is the calendar's owner, and with
[collector] calendar = organizer only an event they organise collects (see
doc/collector.rst, "What is collected, and what never is").

Answers: 202 ``{"user": ..., "emails": [...]}`` when a collector message was
submitted; 200 with ``"emails": []`` when the events had no attendees to
collect; 400 for a missing user or a body that is not iCalendar; 403 for a
missing or wrong token; 503 when the collector cannot take more now.
"""

from __future__ import annotations

from klein import Klein
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from mailhub.auth import SiteToken, requires
from mailhub.collector.engine import message_body
from mailhub.collector.sources import ical_addresses, ical_event
from mailhub.decoding import decode_utf8
from mailhub.errors import ValidationError
from mailhub.pubsub.interfaces import IWorkQueue
from mailhub.web.common import (
    handle_errors, json_routing_errors, read_body, refuse_controls, reply,
)


class CalendarCollect:
    """The calendar collector's HTTP surface."""

    app = Klein()
    json_routing_errors(app)

    def __init__(self, queue: IWorkQueue, token: SiteToken,
                 max_body: int = 1024 * 1024) -> None:
        self._queue = queue
        self._token = token
        self._max_body = max_body

    def resource(self) -> IResource:
        return self.app.resource()

    @app.route("/collector/v1/calendar", methods=["POST"])
    @handle_errors
    @requires("_token")
    async def collect(self, request: IRequest, _: None) -> bytes:
        """Submit the attendees of the iCalendar body for the user named in the query."""
        user = _query(request, b"user").strip()
        if not user:
            raise ValidationError("the query parameter user is required")
        text = decode_utf8(read_body(request, self._max_body), "the request body")
        emails = ical_addresses(text)
        if not emails:
            return reply(request, {"user": user, "emails": []}, 200)
        uid, organizer = ical_event(text)
        await self._queue.publish(message_body(emails, user_email=user, source="calendar",
                                               event_uid=uid, organizer=organizer))
        return reply(request, {"user": user, "emails": emails}, 202)


def _query(request: IRequest, name: bytes) -> str:
    values = (request.args or {}).get(name) or []
    if not values:
        return ""
    try:
        value = values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError("query parameter %s is not UTF-8" % name.decode())
    refuse_controls({name.decode(): value})
    return value
