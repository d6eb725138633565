"""MailStore Server's Application Integration protocol, answered from the user sources.

MailStore POSTs a form to ``[mailstore] path`` (default ``/mailstore``) with
the Basic credentials its administrator entered:

- ``cmd=list``: a JSON array of ``{userName, distinguishedName, fullName,
  emailAddresses}``, one per user of every source (the site's users, then
  LDAP). The array is streamed a page at a time as the sources hand pages
  over, with flow control from the HTTP connection, so memory stays flat
  however many users there are. If a source fails after the array has
  begun, the connection is cut without closing the array: MailStore sees
  invalid JSON and keeps its user list, instead of receiving a valid but
  truncated list (which would make it drop users).
- ``cmd=auth&user=U&pass=P``: ``{"succeeded": true}`` or ``false``; 503 with a
  JSON reason when the source that must decide cannot be asked. Each
  checked attempt is published on ``login:success`` or ``login:failure``
  (``{"user", "source": "mailstore", "client", "at"}``, never a password),
  counted, and repeated failures are slowed down by
  :class:`~mailhub.directory.throttle.Throttle`.

Anything else (no ``cmd``, an unknown one, a GET) is a 4xx with a JSON reason.
"""

from __future__ import annotations

import datetime
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from zope.interface import implementer

from mailhub.config import Config
from mailhub.directory.interfaces import IUserSource
from mailhub.directory.throttle import Throttle
from mailhub.errors import Unavailable, ValidationError
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.web.common import (
    JSON_TYPE,
    HTTPError,
    basic_credentials,
    form_fields,
    handle_errors,
    json_bytes,
    json_routing_errors,
    reply,
    same_secret,
    unauthorized,
)

REALM = "mailhub MailStore"
#: Form bodies MailStore sends are tiny; a login and a password at most.
MAX_BODY = 64 * 1024
#: Longest user name published in a login event.
MAX_PUBLISHED_LOGIN = 256


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

    ``users`` is the chained user source; ``hub`` receives login events;
    ``clock`` drives the failure delays. ``throttle`` defaults to a
    :class:`Throttle` on ``clock``; ``page_size`` defaults to ``[ldap]
    page_size``.
    """

    app = Klein()
    json_routing_errors(app)
    log = Logger()

    def __init__(self, config: Config, users: IUserSource, hub: Hub, metrics: Metrics,
                 clock: IReactorTime, throttle: Throttle | None = None,
                 page_size: int | None = None) -> None:
        self._settings = config.mailstore
        self._users = users
        self._hub = hub
        self._clock = clock
        self._throttle = throttle if throttle is not None else Throttle(clock)
        self._page_size = page_size or config.ldap.page_size
        self._auth = metrics.counter(
            "mailhub_mailstore_auth_total",
            "MailStore cmd=auth answers by result (success, failure, throttled, unavailable)",
            ["result"])
        self._lists = metrics.counter(
            "mailhub_mailstore_list_total",
            "MailStore cmd=list answers by result (complete, failed, cancelled)", ["result"])
        self._listed = metrics.counter(
            "mailhub_mailstore_listed_users_total", "Users sent in MailStore cmd=list answers")
        self._refused = metrics.counter(
            "mailhub_mailstore_unauthorized_total",
            "MailStore requests refused for missing or wrong Basic credentials")
        self._warned_unconfigured = False

    def resource(self) -> IResource:
        """The Klein resource to mount at ``[mailstore] path``."""
        return self.app.resource()

    # -- routes -------------------------------------------------------------

    @app.route("/", methods=["POST"])
    @handle_errors
    async def command(self, request: IRequest) -> Any:
        """One MailStore command: ``cmd=list`` or ``cmd=auth``."""
        self._check_credentials(request)
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

    def _check_credentials(self, request: IRequest) -> None:
        expected_user = self._settings.username
        expected_password = self._settings.password
        if not expected_user or not expected_password:
            if not self._warned_unconfigured:
                self._warned_unconfigured = True
                self.log.warn("MailStore request refused: [mailstore] username and "
                              "password are not both set")
            self._refused.inc()
            raise unauthorized(REALM)
        given = basic_credentials(request)
        if given is None:
            self._refused.inc()
            raise unauthorized(REALM)
        user_ok = same_secret(given[0], expected_user)
        password_ok = same_secret(given[1], expected_password)
        if not (user_ok and password_ok):
            self._refused.inc()
            self.log.info("MailStore request with wrong Basic credentials from {client}",
                          client=_client(request))
            raise unauthorized(REALM)

    async def _authenticate(self, request: IRequest, fields: dict[str, str]) -> bytes:
        if "user" not in fields:
            raise ValidationError("user is missing")
        login = fields["user"]
        password = fields.get("pass", "")
        client = _client(request)
        if not login.strip() or not password:
            self._publish(False, login, client)
            self._auth.labels("failure").inc()
            return reply(request, {"succeeded": False})
        wait = self._throttle.before(login, client)
        if wait is None:
            self._auth.labels("throttled").inc()
            self.log.info("MailStore login for {user!r} from {client} refused: "
                          "too many failures", user=login[:MAX_PUBLISHED_LOGIN], client=client)
            self._publish(False, login, client)
            return reply(request, {"succeeded": False})
        if wait > 0:
            await deferLater(self._clock, wait, lambda: None)
        try:
            user = await self._users.authenticate(login, password)
        except Unavailable:
            self._auth.labels("unavailable").inc()
            raise
        succeeded = user is not None
        self._throttle.after(login, client, succeeded)
        self._auth.labels("success" if succeeded else "failure").inc()
        self._publish(succeeded, user.login if user is not None else login, client)
        if not succeeded:
            self.log.info("MailStore login failed for {user!r} from {client}",
                          user=login[:MAX_PUBLISHED_LOGIN], client=client)
        return reply(request, {"succeeded": succeeded})

    def _publish(self, succeeded: bool, login: str, client: str) -> None:
        """Publish login:success or login:failure without making the reply wait."""
        topic = "login:success" if succeeded else "login:failure"
        at = datetime.datetime.fromtimestamp(self._clock.seconds(), datetime.timezone.utc)
        payload = {"user": login[:MAX_PUBLISHED_LOGIN], "source": "mailstore",
                   "client": client, "at": at.isoformat().replace("+00:00", "Z")}
        d = self._hub.local.topic(topic).forward(self._hub.global_, payload)
        d.addErrback(lambda f: self.log.failure("publishing {topic} failed", f, topic=topic))

    async def _list(self, request: Any) -> Any:
        pages = self._users.pages(self._page_size).__aiter__()
        started = False
        pacer = _Pacer()
        count = 0
        try:
            try:
                first = await pages.__anext__()
            except StopAsyncIteration:
                first = None
            # Nothing sent yet: a failure so far is an ordinary 503.
            request.setResponseCode(200)
            request.setHeader(b"content-type", JSON_TYPE)
            request.setHeader(b"cache-control", b"no-store")
            request.registerProducer(pacer, True)
            started = True
            page = first
            opening = b"["
            while page is not None:
                if page:
                    chunk = b",".join(json_bytes(user.mailstore()) for user in page)
                    request.write(opening + chunk if opening else b"," + chunk)
                    opening = b""
                    count += len(page)
                await pacer.ready()
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


def _client(request: IRequest) -> str:
    address = request.getClientAddress()
    return str(getattr(address, "host", "") or "unknown")

