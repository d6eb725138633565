"""GroupServer's five web hooks, answered from the in-memory directory.

Each hook is a form (query string and body both count) with a ``token``, the
hook's fields, and an *action*: a parameter whose mere presence (``&search``,
``&search=``) says what to do. Without an action a hook describes itself.
Parameter names, action names, reply fields and status numbers are
GroupServer's (REFERENCE.md section 2); its bugs are fixed: ``id`` and
``name`` are strings, an invalid address or an unknown group is a validation
error, addresses match exactly (case-insensitive, no wildcards), the token is
compared in constant time and never echoed, and real HTTP codes are used:
200 success, 400 validation error, 403 bad token, 413 body too large. Every
error the hooks answer has one shape, GroupServer's ``{"status": N, "message":
[reasons]}`` (:func:`hook_error`): N is 100, GroupServer's validation error,
when the request's content is refused (400, 403, 413), else the HTTP status
(404, 405, 500, 503). The site answers unknown ``/gs-*`` paths and bodies too
large for any surface in that shape too (``Root.shape_errors``). With
``[hooks] status_codes = groupserver`` the refusals (400 and 403) are
answered 200 instead, as GroupServer answers them (:meth:`GroupHooks.refusal`).

The read path (``/gs-search-people.json``) is served from the
:class:`~mailhub.directory.service.Directory`'s memory on the reactor thread,
with each profile's JSON serialised once and reused until the profile object
changes; only a miss is checked against the database.
"""

from __future__ import annotations

import re
from typing import Any, Awaitable, Callable
from zoneinfo import ZoneInfo

import attrs
from cachetools import LRUCache
from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from mailhub.auth import Auth, Refused, SiteToken, client_of
from mailhub.config import Config
from mailhub.decoding import MAX_ADDRESS_TEXT, address_problem, sanitise_address
from mailhub.directory.model import Added, Left, Profile
from mailhub.directory.service import Directory
from mailhub.directory.table import DECODED
from mailhub.errors import Unavailable, ValidationError
from mailhub.metrics import Metrics
from mailhub.web.common import JSON_TYPE, HTTPError, form_fields, handle_errors, json_bytes
from mailhub.web.streaming import BATCH, StreamedBody, json_array, json_values

#: GroupServer's status for a validation error (and a refused token).
VALIDATION_ERROR = 100
#: GroupServer's status for "an unknown event occurred" in the add hook.
UNKNOWN_EVENT = 257
#: GroupServer's status numbers of the add hook, for what the directory did.
ADD_STATUS = {Added.NEW_PROFILE: 0, Added.EXISTING_PROFILE: 1, Added.ALREADY_MEMBER: 256}
#: GroupServer's status numbers of the leave hook.
LEAVE_STATUS = {Left.LEFT: 0, Left.NO_SUCH_GROUP: 1, Left.NO_SUCH_USER: 2,
                Left.NOT_A_MEMBER: 4}

TOKEN_MISMATCH = "The authentication token does not match the one in the database."
TOKEN_MISSING = "The authentication token (token) is required."
LOADING = ("The site is still starting (its database schema and its groups are being "
           "read); try again in a few seconds.")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

#: HTTP statuses whose hook answer carries GroupServer's validation error
#: (100): the request's content is refused and the client must change it.
REFUSED_CONTENT = frozenset([400, 403, 413])


def hook_error(status: int, messages: list[str] | str) -> dict[str, Any]:
    """The one shape of every error the hooks answer: GroupServer's.

    ``{"status": 100, "message": [...]}`` for a refused request (HTTP 400,
    403, 413), as GroupServer answers a validation error; the HTTP status
    itself in ``status`` for the rest (404, 405, 500, 503), which GroupServer
    had no number for. ``message`` is always a list of text.
    """
    if isinstance(messages, str):
        messages = [messages]
    return {"status": VALIDATION_ERROR if status in REFUSED_CONTENT else status,
            "message": list(messages)}


def hook_error_body(status: int, message: str) -> bytes:
    """:func:`hook_error` as the JSON bytes the site sends (``Root.shape_errors``)."""
    return json_bytes(hook_error(status, message))


def no_such_hook(path: bytes) -> str:
    """The reason of a 404 on a ``/gs-*`` path that is no hook."""
    return "no such hook: %s" % path.decode("utf-8", "replace")


def _is_hook_error(body: Any) -> bool:
    return isinstance(body, dict) and set(body) == {"status", "message"} \
        and isinstance(body["message"], list)


@attrs.frozen
class Argument:
    """One field of a hook, as its self-description shows it."""

    description: str
    required: bool


@attrs.frozen
class HookSpec:
    """What a hook is called, does and takes: its self-description."""

    path: str
    label: str
    actions: tuple[tuple[str, str], ...]
    arguments: tuple[tuple[str, Argument], ...]

    def description(self) -> dict[str, Any]:
        """GroupServer's answer when no action is given."""
        return {
            "message": ["", self.label],
            "actions": {name: label for name, label in self.actions},
            "arguments": {name: {"Description": a.description, "Required": a.required}
                          for name, a in self.arguments},
        }

    def action(self, fields: dict[str, str]) -> str | None:
        """The first of this hook's actions present in the form, as zope.formlib picks."""
        for name, _ in self.actions:
            if name in fields:
                return name
        return None


TOKEN = ("token", Argument("The authentication token", True))

GROUPS = HookSpec(
    "/gs-group-groups.json", "Get the groups on the site",
    (("get", "Get"),), (TOKEN,))
MEMBER_ADD = HookSpec(
    "/gs-group-member-add.json", "Add hook",
    (("add", "Add"),),
    (TOKEN,
     ("groupId", Argument("The group to add the person to", True)),
     ("email", Argument("The email address of the new member", True)),
     ("fn", Argument("The name of the new member", True)),
     ("biography", Argument("The HTML-formatted biography of the new member", False)),
     ("tz", Argument("The timezone", False))))
SEARCH = HookSpec(
    "/gs-search-people.json", "Profile exists",
    (("search", "Search"),),
    (("user", Argument("The person that is being searched: a user identifier or an "
                       "email address", True)),
     TOKEN))
SITE_MEMBERS = HookSpec(
    "/gs-site-member-list.json", "List the site members",
    (("users", "Users"), ("user_groups", "User groups")), (TOKEN,))
LEAVE = HookSpec(
    "/gs-group-member-leave.json", "Remove someone from the group",
    (("leave", "Leave"),),
    (("userId", Argument("The identifier of the person who is leaving the group", True)),
     ("groupId", Argument("The identifier of the group that the user is leaving", True)),
     TOKEN))

#: Every hook, by the path it answers on (the alias included).
HOOKS: dict[str, HookSpec] = {
    GROUPS.path: GROUPS,
    MEMBER_ADD.path: MEMBER_ADD,
    SEARCH.path: SEARCH,
    SITE_MEMBERS.path: SITE_MEMBERS,
    "/gs-site-member.json": SITE_MEMBERS,
    LEAVE.path: LEAVE,
}

MAX_NAME = 200
MAX_BIOGRAPHY = 64 * 1024
MAX_USER = 320


class _Refusal(HTTPError):
    """A hook's refusal, already counted in ``mailhub_hook_requests_total``."""


Handler = Callable[[IRequest, str, dict[str, str]], Awaitable[bytes]]


class GroupHooks:
    """The GroupServer web hooks of one site.

    ``hub`` is the :class:`mailhub.pubsub.Hub`: changes are published on
    ``hub.local`` and forwarded to ``hub.global_`` as ``member:added``,
    ``member:left`` and ``profile:created``.
    """

    app = Klein()
    log = Logger()

    #: First path segments this surface answers, for the root resource.
    paths: tuple[bytes, ...] = tuple(p.lstrip("/").encode("ascii") for p in HOOKS)

    def __init__(self, directory: Directory, config: Config, metrics: Metrics, hub: Any,
                 clock: IReactorTime | None = None, auth: Auth | None = None) -> None:
        self.directory = directory
        self.hub = hub
        self.site_url = config.mailhub.site_url.rstrip("/")
        self.max_body = config.mailhub.max_body
        #: ``[hooks] status_codes = groupserver``: refusals are answered 200.
        self.groupserver_codes = config.hooks.status_codes == "groupserver"
        self.clock = clock if clock is not None else directory.clock
        auth = auth if auth is not None else Auth(self.clock, metrics, hub)
        self._token = SiteToken(auth, "hooks", directory.check_token,
                                directory.check_token_cached)
        self._answers = metrics.counter(
            "mailhub_hook_requests_total", "Group hook requests answered, by hook and status",
            ["hook", "status"])
        self._answer_children: dict[tuple[str, int], Any] = {}
        #: profile id -> (the Profile object it was made from, its JSON bytes),
        #: as many as the directory keeps profiles made from their records
        #: (beyond those, the directory makes a new object, so the JSON is
        #: made again anyway): a cache the size of the site's would hold a
        #: Profile object per profile, what the compact directory avoids.
        self._json: LRUCache[str, tuple[Profile, bytes]] = LRUCache(maxsize=DECODED)

    def resource(self) -> IResource:
        """The Klein resource; it expects to see the whole request path."""
        return self.app.resource()  # type: ignore[no-any-return]

    # -- replies --------------------------------------------------------------

    def _send(self, request: IRequest, hook: HookSpec, body: bytes, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", JSON_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        self._count(hook, status)
        return body

    def profile_json(self, profile: Profile) -> bytes:
        """GroupServer's profile data as JSON, made once per profile version."""
        cached = self._json.get(profile.id)
        if cached is not None and cached[0] is profile:
            return cached[1]
        body = json_bytes(profile.data(self.site_url))
        self._json[profile.id] = (profile, body)
        return body

    def _publish(self, topic: str, data: dict[str, Any]) -> None:
        d = self.hub.local.topic(topic).forward(self.hub.global_, data)
        d.addErrback(lambda f: self.log.failure("cannot publish {topic}", f, topic=topic))

    # -- the common path of every hook ------------------------------------------

    async def _serve(self, request: IRequest, hook: HookSpec, handler: Handler) -> bytes:
        try:
            return await self._answer(request, hook, handler)
        except ValidationError as e:
            raise self.refusal(hook, 400, e.messages)
        except HTTPError as e:
            if not isinstance(e, _Refusal):  # a refusal is counted where it is made
                self._count(hook, e.status)
            if _is_hook_error(e.body):
                raise
            # An error made by shared code (common, auth) in the site's shape:
            # answered in the hooks' one shape, with its own status and headers.
            message = e.body.get("error") if isinstance(e.body, dict) else None
            raise HTTPError(e.status, hook_error(e.status, str(message or e.body)), e.headers)
        except Unavailable as e:
            self._count(hook, 503)
            raise HTTPError(503, hook_error(503, str(e) or "temporarily unavailable"),
                            {b"retry-after": b"5"})
        except CancelledError:
            raise
        except Exception:
            # A bug: logged with its traceback, answered in the hooks' shape.
            self.log.failure("unhandled error in {path}", path=hook.path)
            self._count(hook, 500)
            raise HTTPError(500, hook_error(500, "internal error"))

    def refusal(self, hook: HookSpec, status: int, messages: list[str]) -> HTTPError:
        """A refusal of ``hook`` (400 validation error, 403 token), counted, to raise.

        The body is GroupServer's ``{"status": 100, "message": [...]}``; the
        HTTP status is ``status``, or 200 with ``[hooks] status_codes =
        groupserver``, as GroupServer answers every refusal. The metric
        counts ``status`` in both modes, so dashboards read the same.
        """
        self._count(hook, status)
        return _Refusal(200 if self.groupserver_codes else status, hook_error(status, messages))

    async def _answer(self, request: IRequest, hook: HookSpec, handler: Handler) -> bytes:
        try:
            fields = form_fields(request, self.max_body)
        except HTTPError as e:
            message = e.body.get("error", "bad request") if isinstance(e.body, dict) else str(e.body)
            if e.status == 400:
                raise self.refusal(hook, 400, [message])
            raise HTTPError(e.status, hook_error(e.status, message), e.headers)
        action = hook.action(fields)
        if action is None:
            return self._send(request, hook, json_bytes(hook.description()))
        client = client_of(request)
        try:
            # Counted, logged and slowed down by mailhub.auth.
            await self._token.check(fields.get("token"), client, hook.path)
        except Refused as refused:
            await self._refuse(hook, client, refused.reason)
        return await handler(request, action, fields)

    async def _refuse(self, hook: HookSpec, client: str, reason: str) -> None:
        """Audit a refused token (never the token itself); then answer 403 (or 200)."""
        try:
            await self.directory.audit("token-mismatch", client,
                                       "hook=%s token=%s" % (hook.path, reason))
        except Exception:
            self.log.failure("cannot write the audit log")
        message = TOKEN_MISSING if reason == "missing" else TOKEN_MISMATCH
        raise self.refusal(hook, 403, [message])

    def _count(self, hook: HookSpec, status: int) -> None:
        key = (hook.path, status)
        child = self._answer_children.get(key)
        if child is None:
            child = self._answer_children[key] = self._answers.labels(
                hook=hook.path, status=str(status))
        child.inc()

    # -- routes -----------------------------------------------------------------

    @app.route("/gs-group-groups.json", methods=["POST", "GET"])
    @handle_errors
    async def groups_hook(self, request: IRequest) -> bytes:
        """The site's groups (action ``get``)."""
        return await self._serve(request, GROUPS, self._groups)

    @app.route("/gs-group-member-add.json", methods=["POST", "GET"])
    @handle_errors
    async def member_add_hook(self, request: IRequest) -> bytes:
        """Add someone to a group, making their profile if needed (action ``add``)."""
        return await self._serve(request, MEMBER_ADD, self._add)

    @app.route("/gs-search-people.json", methods=["POST", "GET"])
    @handle_errors
    async def search_hook(self, request: IRequest) -> bytes:
        """One profile by id or address, or ``{}`` (action ``search``)."""
        return await self._serve(request, SEARCH, self._search)

    @app.route("/gs-site-member-list.json", methods=["POST", "GET"])
    @app.route("/gs-site-member.json", methods=["POST", "GET"])
    @handle_errors
    async def site_members_hook(self, request: IRequest) -> bytes:
        """The site's members (actions ``users`` and ``user_groups``)."""
        return await self._serve(request, SITE_MEMBERS, self._site_members)

    @app.route("/gs-group-member-leave.json", methods=["POST", "GET"])
    @handle_errors
    async def leave_hook(self, request: IRequest) -> bytes:
        """Take someone out of a group (action ``leave``)."""
        return await self._serve(request, LEAVE, self._leave)

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Any) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", JSON_TYPE)
        return json_bytes(hook_error(404, no_such_hook(request.path)))

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(self, request: IRequest, failure: Any) -> bytes:
        request.setResponseCode(405)
        request.setHeader(b"content-type", JSON_TYPE)
        request.setHeader(b"allow", b"GET, POST")
        return json_bytes(hook_error(405, "the hooks answer GET and POST, not %s"
                                     % request.method.decode("ascii", "replace")))

    # -- actions ------------------------------------------------------------------

    async def _groups(self, request: IRequest, action: str, fields: dict[str, str]) -> bytes:
        # Lists are rare: follow the change log first, so a group made a
        # moment ago by the CLI or another instance is listed.
        self._need_directory()
        await self.directory.refresh()
        body = [g.data(self.site_url) for g in self.directory.groups()]
        return self._send(request, GROUPS, json_bytes(body))

    async def _search(self, request: IRequest, action: str, fields: dict[str, str]) -> bytes:
        user = fields.get("user", "").strip()
        if not user:
            raise ValidationError("user: Required input is missing.")
        profile = self.directory.lookup(user)
        if profile is None:
            if len(user) > MAX_USER:
                raise ValidationError("user: must be a user identifier or an email address "
                                      "(at most %d characters)" % MAX_USER)
            if "<" in user:  # "Name <address>", as GroupServer's parseaddr allowed
                from email.utils import parseaddr
                user = parseaddr(user)[1] or user
            profile = await self.directory.find(user)
            if profile is None:
                return self._send(request, SEARCH, b"{}")
        return self._send(request, SEARCH, self.profile_json(profile))

    async def _site_members(self, request: IRequest, action: str,
                            fields: dict[str, str]) -> bytes:
        self._need_directory()
        await self.directory.refresh()
        # A million members is 200 MB of JSON: streamed, a chunk per reactor
        # turn (see mailhub.web.streaming), read from the directory in id
        # order a batch at a time (from the database while it loads): no
        # snapshot, each batch resumed after the last profile written.
        if action == "users":
            pieces = json_array(self.directory.members(BATCH, ids=True), json_values)
        else:
            # One json.dumps per batch, and no million entries pushed through
            # the search path's cache (each a tracked object to collect).
            pieces = json_array(self.directory.members(BATCH), lambda batch: json_values(
                [p.data(self.site_url) for p in batch]))
        self._send(request, SITE_MEMBERS, b"")
        await StreamedBody(request, pieces, self.clock).start()
        return b""

    def _need_directory(self) -> None:
        """503 with Retry-After until the directory has read the groups (at
        start-up, once the schema is migrated): never a partial list."""
        if not self.directory.answering:
            raise HTTPError(503, hook_error(503, LOADING),
                            {b"retry-after": b"5"})

    async def _add(self, request: IRequest, action: str, fields: dict[str, str]) -> bytes:
        errors = []
        group_id = fields.get("groupId", "").strip()
        given = fields.get("email", "").strip()
        # GroupServer's forms: "Name <a@x>", "<a@x>", "a@x," all mean a@x.
        email = sanitise_address(given) if given else ""
        name = " ".join(fields.get("fn", "").split())
        if not group_id:
            errors.append("groupId: Required input is missing.")
        if not given:
            errors.append("email: Required input is missing.")
        else:
            if len(given) > MAX_ADDRESS_TEXT:
                given = given[:40] + "..."
                wrong: str | None = "is longer than %d characters" % MAX_ADDRESS_TEXT
            elif "\n" in given or "\r" in given:  # GroupServer's field is one line too
                wrong = "holds a line break"
            elif not email:
                wrong = "is not an email address (local@domain)"
            else:
                wrong = address_problem(email)
            if wrong:
                errors.append("email: %r %s." % (given, wrong))
        if not name:
            errors.append("fn: Required input is missing.")
        elif len(name) > MAX_NAME:
            errors.append("fn: the name is longer than %d characters." % MAX_NAME)
        elif _CONTROL.search(fields.get("fn", "").replace("\t", " ")):
            errors.append("fn: the name holds control characters.")
        biography = fields.get("biography", "")
        if len(biography) > MAX_BIOGRAPHY:
            errors.append("biography: longer than %d characters." % MAX_BIOGRAPHY)
        tz = fields.get("tz", "").strip()
        if tz:
            try:
                ZoneInfo(tz)
            except (ValueError, OSError, KeyError):
                errors.append("tz: %r is not a known time zone." % tz)
        if group_id and self.directory.group(group_id) is None and errors:
            # The directory checks the store before refusing; with other
            # errors already found, memory is enough to report this one too.
            errors.append("groupId: there is no group %r on this site." % group_id)
        if errors:
            raise ValidationError(errors)
        try:
            added, profile = await self.directory.add_member(group_id, email, name)
        except ValidationError as e:
            if self.directory.group(group_id) is None:
                raise ValidationError("groupId: there is no group %r on this site." % group_id)
            raise ValidationError(e.messages)
        group = self.directory.group(group_id)
        group_name = group.name if group is not None else group_id
        status = ADD_STATUS.get(added, UNKNOWN_EVENT)
        if added is Added.NEW_PROFILE:
            message = "Created a new profile for {0} and added {0} to {1}".format(
                profile.name, group_name)
        elif added is Added.EXISTING_PROFILE:
            message = "Added {0} to {1}".format(profile.name, group_name)
        elif added is Added.ALREADY_MEMBER:
            message = "{0} is already a member of {1}".format(profile.name, group_name)
        else:  # pragma: no cover - Added has only the three above
            body = {"status": UNKNOWN_EVENT, "message": "An unknown event occurred."}
            return self._send(request, MEMBER_ADD, json_bytes(body))
        if added is Added.NEW_PROFILE:
            self._publish("profile:created", {"userId": profile.id, "name": profile.name,
                                              "email": email})
        if added in (Added.NEW_PROFILE, Added.EXISTING_PROFILE):
            self._publish("member:added", {"groupId": group_id, "userId": profile.id,
                                           "email": email, "status": status})
        body = {"status": status, "message": message, "user": profile.data(self.site_url)}
        return self._send(request, MEMBER_ADD, json_bytes(body))

    async def _leave(self, request: IRequest, action: str, fields: dict[str, str]) -> bytes:
        group_id = fields.get("groupId", "").strip()
        user_id = fields.get("userId", "").strip()
        errors = []
        if not user_id:
            errors.append("userId: Required input is missing.")
        if not group_id:
            errors.append("groupId: Required input is missing.")
        if errors:
            raise ValidationError(errors)
        profile = self.directory.lookup(user_id)
        left = await self.directory.leave(group_id, user_id)
        group = self.directory.group(group_id)
        if profile is None:
            profile = self.directory.lookup(user_id)
        if left is Left.NO_SUCH_GROUP:
            message = 'No such group "{0}"'.format(group_id)
        elif left is Left.NO_SUCH_USER:
            message = 'No such user "{0}"'.format(user_id)
        else:
            who = profile.name if profile is not None else user_id
            where = group.name if group is not None else group_id
            if left is Left.LEFT:
                message = "{0} has left {1}".format(who, where)
                self._publish("member:left", {"groupId": group_id,
                                              "userId": profile.id if profile else user_id})
            else:  # NOT_A_MEMBER
                message = "{0} is not a member of {1}".format(who, where)
        body = {"status": LEAVE_STATUS[left], "message": message, "groupId": group_id,
                "userId": user_id}
        return self._send(request, LEAVE, json_bytes(body))


__all__ = ["GroupHooks", "HOOKS", "HookSpec", "hook_error", "hook_error_body"]
