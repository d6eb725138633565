"""``POST /collector/v1/calendar``: attendees of an iCalendar body become contacts.

For calendar systems without AMQP: the body is an iCalendar text (one or more
events; ``text/calendar``), the user whose collected book receives the
attendees is named by ``user`` (query string: a login, an address or an id),
and the caller proves itself with the site token (``Authorization: Bearer
TOKEN`` or ``token`` in the query string), checked by the ``check_token``
callable given in ``__init__`` (constant-time, read per request).

Answers: 202 ``{"user": ..., "emails": [...]}`` when a collector message was
submitted; 200 with ``"emails": []`` when the events had no attendees to
collect; 400 for a missing user or a body that is not iCalendar; 403 for a
missing or wrong token; 503 when the collector cannot take more now.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from klein import Klein
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from mailhub.collector.engine import message_body
from mailhub.collector.sources import ical_addresses
from mailhub.errors import ValidationError
from mailhub.web.common import (
    HTTPError, decode_text, handle_errors, json_routing_errors, read_body, refuse_controls, reply,
)

CheckToken = Callable[[str], Awaitable[bool]]


class CalendarCollect:
    """The calendar collector's HTTP surface."""

    app = Klein()
    json_routing_errors(app)

    def __init__(self, dispatcher: Any, check_token: Callable[[str], Any],
                 max_body: int = 1024 * 1024) -> None:
        self._dispatcher = dispatcher
        self._check_token = check_token
        self._max_body = max_body

    def resource(self) -> IResource:
        return self.app.resource()

    async def _authorise(self, request: IRequest) -> None:
        token = ""
        header = request.getHeader(b"authorization") or b""
        scheme, _, value = header.partition(b" ")
        if scheme.lower() == b"bearer":
            token = value.strip().decode("utf-8", "replace")
        else:
            token = _query(request, b"token")
        if not token or not await self._check_token(token):
            raise HTTPError(403, {"error": "a valid site token is required"})

    @app.route("/collector/v1/calendar", methods=["POST"])
    @handle_errors
    async def collect(self, request: IRequest) -> bytes:
        await self._authorise(request)
        user = _query(request, b"user").strip()
        if not user:
            raise ValidationError("the query parameter user is required")
        text = decode_text(read_body(request, self._max_body), "the request body")
        emails = ical_addresses(text)
        if not emails:
            return reply(request, {"user": user, "emails": []}, 200)
        await self._dispatcher.submit(message_body(emails, user_email=user))
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
