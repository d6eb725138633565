"""MailStore Server's Application Integration protocol, answered from the user sources.

MailStore POSTs a form to ``[mailstore] path`` (default ``/mailstore``) with
the Basic credentials its administrator entered:

- ``cmd=list``: a JSON array of ``{userName, distinguishedName, fullName,
  emailAddresses}``, one per user of every source (the site's users, then
  LDAP) who can log in (``[mailstore] list = can_login``, the default: a
  site profile without a password is left out), or every user
  (``list = all``). Answered as ``text/json``, as MailStore's own examples are. The array is streamed a page at a time as the sources hand pages
  over, with flow control from the HTTP connection, so memory stays flat
  however many users there are. If a source fails after the array has
  begun, the connection is cut without closing the array: MailStore sees
  invalid JSON and keeps its user list, instead of receiving a valid but
  truncated list (which would make it drop users).
- ``cmd=auth&user=U&pass=P``: ``{"succeeded": true}`` or ``false``; 503 with a
  JSON reason when the source that must decide cannot be asked. Each
  checked attempt is published on ``login:success`` or ``login:failure``
  (``{"user", "source": "mailstore", "client", "at"}``, never a password),
  counted, and repeated failures are slowed down: all of it by
  :mod:`mailhub.auth`, which checks MailStore's own Basic credentials too.

Anything else (no ``cmd``, an unknown one, a GET) is a 4xx with a JSON reason.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from zope.interface import implementer

from mailhub.auth import Auth, StaticBasic, Throttle, client_of, requires
from mailhub.config import Config
from mailhub.directory.interfaces import IUserSource
from mailhub.errors import Unavailable, ValidationError
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.steps import TurnBudget, hold_full_collections
from mailhub.web.common import (
    HTTPError,
    form_fields,
    handle_errors,
    json_bytes,
    json_routing_errors,
    reply,
)

REALM = "mailhub MailStore"
#: The content type of MailStore's own examples, the one its client is known
#: to take (see doc/mailstore.rst); errors stay application/json.
MAILSTORE_JSON = b"text/json; charset=utf-8"
#: Form bodies MailStore sends are tiny; a login and a password at most.
MAX_BODY = 64 * 1024


@implementer(IPushProducer)
class _Pacer:
    """Flow control for a streamed reply: waits while the transport is full."""

    def __init__(self) -> None:
        self._paused = False
        self._waiting: Deferred[None] | None = None
        self.stopped = False

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    def stopProducing(self) -> None:
        self.stopped = True
        self.resumeProducing()

    def ready(self) -> "Deferred[None]":
        """Fires when the consumer wants more (at once if it does)."""
        if not self._paused or self.stopped:
            return succeed(None)
        if self._waiting is None:
            self._waiting = Deferred()
        return self._waiting


class MailStoreIntegration:
    """The MailStore Application Integration surface (one Klein app).

    ``users`` is the chained user source; ``auth`` (:class:`mailhub.auth.Auth`)
    checks MailStore's Basic credentials and the users' passwords, counts,
    throttles and publishes (a private one on ``clock``, with ``throttle``,
    when not given); ``page_size`` defaults to ``[ldap] page_size``.
    """

    app = Klein()
    json_routing_errors(app)
    log = Logger()

    def __init__(self, config: Config, users: IUserSource, hub: Hub, metrics: Metrics,
                 clock: IReactorTime, throttle: Throttle | None = None,
                 page_size: int | None = None, auth: Auth | None = None) -> None:
        self._settings = config.mailstore
        self._users = users
        self._auth = auth if auth is not None else Auth(clock, metrics, hub, throttle)
        self._service = StaticBasic(self._auth, "mailstore-service", "service:mailstore",
                                    self._settings.username, self._settings.password, REALM)
        self._page_size = page_size or config.ldap.page_size
        self._clock = clock
        self._everyone = config.mailstore.list == "all"
        self._lists = metrics.counter(
            "mailhub_mailstore_list_total",
            "MailStore cmd=list answers by result (complete, failed, cancelled)", ["result"])
        self._listed = metrics.counter(
            "mailhub_mailstore_listed_users_total", "Users sent in MailStore cmd=list answers")

    def resource(self) -> IResource:
        """The Klein resource to mount at ``[mailstore] path``."""
        return self.app.resource()

    # -- routes -------------------------------------------------------------

    @app.route("/", methods=["POST"])
    @handle_errors
    @requires("_service")
    async def command(self, request: IRequest, _: None) -> Any:
        """One MailStore command: ``cmd=list`` or ``cmd=auth``."""
        fields = form_fields(request, MAX_BODY)
        cmd = fields.get("cmd")
        if cmd is None:
            raise ValidationError("cmd is missing: expected cmd=list or cmd=auth")
        if cmd == "list":
            return await self._list(request)
        if cmd == "auth":
            return await self._authenticate(request, fields)
        raise ValidationError("unknown cmd %r: expected list or auth" % cmd[:64])

    @app.route("/", methods=["GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    @handle_errors
    async def other_method(self, request: IRequest) -> Any:
        """MailStore only POSTs; anything else says so in JSON."""
        raise HTTPError(405, {"error": "use POST with cmd=list or cmd=auth"},
                        {b"allow": b"POST"})

    # -- pieces ---------------------------------------------------------------

    async def _authenticate(self, request: IRequest, fields: dict[str, str]) -> bytes:
        if "user" not in fields:
            raise ValidationError("user is missing")
        user = await self._auth.login("mailstore", self._users, fields["user"],
                                      fields.get("pass", ""), client_of(request))
        body = reply(request, {"succeeded": user is not None})
        request.setHeader(b"content-type", MAILSTORE_JSON)
        return body

    async def _list(self, request: Any) -> Any:
        pages = self._users.pages(self._page_size).__aiter__()
        started = False
        pacer = _Pacer()
        count = 0
        # A list of a million users lasts seconds: no full garbage
        # collection (which follows every container, the reactor waiting)
        # meanwhile.
        release = hold_full_collections()
        try:
            try:
                first = await pages.__anext__()
            except StopAsyncIteration:
                first = None
            # Nothing sent yet: a failure so far is an ordinary 503.
            request.setResponseCode(200)
            request.setHeader(b"content-type", MAILSTORE_JSON)
            request.setHeader(b"cache-control", b"no-store")
            request.registerProducer(pacer, True)
            started = True
            page = first
            opening = b"["
            budget = TurnBudget(self._clock)
            while page is not None:
                if page and not self._everyone:
                    page = [user for user in page if user.can_login]
                if page:
                    chunk = b",".join(json_bytes(user.mailstore()) for user in page)
                    request.write(opening + chunk if opening else b"," + chunk)
                    opening = b""
                    count += len(page)
                await pacer.ready()
                # Pages already at hand (the site's users) would otherwise
                # all be written in one reactor turn.
                await budget.check()
                if pacer.stopped:
                    self._lists.labels("cancelled").inc()
                    return None
                try:
                    page = await pages.__anext__()
                except StopAsyncIteration:
                    page = None
            request.write(opening + b"]" if opening else b"]")
            request.unregisterProducer()
            self._lists.labels("complete").inc()
            self._listed.inc(count)
            return None
        except CancelledError:
            # The client went away (Klein cancels the handler): nothing to answer.
            self._lists.labels("cancelled").inc()
            raise
        except Exception as e:
            if not started:
                self._lists.labels("failed").inc()
                raise
            if not isinstance(e, Unavailable):
                self.log.failure("MailStore user list failed after {count} users", count=count)
            else:
                self.log.warn("MailStore user list failed after {count} users ({reason}); "
                              "cutting the connection so the list is not taken as complete",
                              count=count, reason=str(e))
            self._lists.labels("failed").inc()
            await _abort(request)
            return None
        finally:
            release()
            close = getattr(pages, "aclose", None)
            if close is not None:
                await close()


async def _abort(request: Any) -> None:
    """Cut the connection mid-body and wait until twisted.web has noticed."""
    finished = request.notifyFinish()
    try:
        request.unregisterProducer()
    except Exception:
        pass
    transport = getattr(request.channel, "transport", None)
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
    else:
        request.loseConnection()
    try:
        await finished
    except Exception:
        pass
