"""The OpenAPI 3.1 description of mailhub's HTTP endpoints.

:func:`site_document` is what ``/openapi.json`` serves: every endpoint of
the one Site (the GroupServer hooks, the two Dovecot push endpoints, the
event stream, MailStore at its configured path, the calendar collector,
``/healthz``, ``/metrics`` and ``/openapi.json`` itself), with their request
bodies, parameters, every status they answer with its JSON schema, and the
security schemes (Basic for push, MailStore and the event stream; the site
token for the hooks and the calendar collector). ``/dav/`` (the embedded
CardDAV server) speaks WebDAV, which OpenAPI cannot describe.

:func:`openapi_document` assembles a document from the hooks' paths plus
any ``extra_paths`` and ``extra_schemas``; :func:`hook_paths` describes the
hooks from the same :data:`~mailhub.web.hooks.HOOKS` table the handlers use,
so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from mailhub import __version__
from mailhub.web.hooks import HOOKS, HookSpec

_REF = "#/components/schemas/"

#: Component schemas the hooks' replies use.
HOOK_SCHEMAS: dict[str, Any] = {
    "GroupServerError": {
        "type": "object",
        "description": "GroupServer's error shape: status 100 and every reason.",
        "required": ["status", "message"],
        "properties": {
            "status": {"type": "integer", "const": 100},
            "message": {"type": "array", "items": {"type": "string"}},
        },
    },
    "SelfDescription": {
        "type": "object",
        "description": "What a hook answers when no action is given.",
        "required": ["message", "actions", "arguments"],
        "properties": {
            "message": {"type": "array", "items": {"type": "string"}},
            "actions": {"type": "object", "additionalProperties": {"type": "string"}},
            "arguments": {"type": "object", "additionalProperties": {
                "type": "object",
                "properties": {"Description": {"type": "string"},
                               "Required": {"type": "boolean"}},
            }},
        },
    },
    "ProfileData": {
        "type": "object",
        "required": ["id", "name", "url", "groups", "email"],
        "properties": {
            "id": {"type": "string", "description": "22 base62 characters"},
            "name": {"type": "string"},
            "url": {"type": "string", "format": "uri"},
            "groups": {"type": "array", "items": {"type": "string"}},
            "email": {
                "type": "object",
                "required": ["all", "preferred", "other", "unverified"],
                "properties": {k: {"type": "array", "items": {"type": "string"}}
                               for k in ("all", "preferred", "other", "unverified")},
            },
        },
    },
    "Group": {
        "type": "object",
        "required": ["id", "name", "url", "email", "type", "privacy"],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "url": {"type": "string", "format": "uri"},
            "email": {"type": "string"},
            "type": {"type": "string"},
            "privacy": {"type": "string", "enum": ["public", "site", "private", "secret"]},
        },
    },
    "AddReply": {
        "type": "object",
        "required": ["status", "message"],
        "properties": {
            "status": {"type": "integer", "enum": [0, 1, 256, 257],
                       "description": "0 new profile added, 1 existing profile added, "
                                      "256 already a member, 257 unknown event"},
            "message": {"type": "string"},
            "user": {"$ref": _REF + "ProfileData"},
        },
    },
    "LeaveReply": {
        "type": "object",
        "required": ["status", "message", "groupId", "userId"],
        "properties": {
            "status": {"type": "integer", "enum": [0, 1, 2, 4],
                       "description": "0 left, 1 no such group, 2 no such user, "
                                      "4 not a member"},
            "message": {"type": "string"},
            "groupId": {"type": "string"},
            "userId": {"type": "string"},
        },
    },
}

_SUCCESS: dict[str, Any] = {
    "/gs-group-groups.json": {"type": "array", "items": {"$ref": _REF + "Group"}},
    "/gs-group-member-add.json": {"$ref": _REF + "AddReply"},
    "/gs-search-people.json": {"oneOf": [
        {"$ref": _REF + "ProfileData"},
        {"type": "object", "maxProperties": 0, "description": "no such person"}]},
    "/gs-site-member-list.json": {"oneOf": [
        {"type": "array", "items": {"type": "string"}, "description": "action users"},
        {"type": "array", "items": {"$ref": _REF + "ProfileData"},
         "description": "action user_groups"}]},
    "/gs-group-member-leave.json": {"$ref": _REF + "LeaveReply"},
}
_SUCCESS["/gs-site-member.json"] = _SUCCESS["/gs-site-member-list.json"]


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": schema}}}


def _form_schema(spec: HookSpec) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for name, argument in spec.arguments:
        properties[name] = {"type": "string", "description": argument.description}
    for name, label in spec.actions:
        properties[name] = {"type": "string", "description":
                            "The action %r (%s): present, with any value or none" % (name, label)}
    return {"type": "object", "properties": properties}


def _operation(path: str, spec: HookSpec, method: str) -> dict[str, Any]:
    fields = _form_schema(spec)
    actions = ", ".join(name for name, _ in spec.actions)
    operation: dict[str, Any] = {
        "tags": ["GroupServer hooks"],
        # The self-description (no action) needs no token.
        "security": [{"siteToken": []}, {}],
        "summary": "%s (action %s)" % (spec.label, actions),
        "operationId": "%s_%s" % (path.strip("/").replace(".json", "").replace("-", "_"),
                                  method.lower()),
        "responses": {
            "200": {"description": "The action's answer, or the self-description "
                                   "when no action is given",
                    "content": {"application/json": {"schema": {"oneOf": [
                        _SUCCESS[path], {"$ref": _REF + "SelfDescription"}]}}}},
            "400": _json({"$ref": _REF + "GroupServerError"}, "Validation error"),
            "403": _json({"$ref": _REF + "GroupServerError"}, "Missing or wrong token"),
            "413": _json({"$ref": _REF + "GroupServerError"}, "Body too large"),
        },
    }
    if method == "GET":
        operation["parameters"] = [
            {"name": name, "in": "query", "required": False, "schema": schema,
             "allowEmptyValue": True}
            for name, schema in fields["properties"].items()]
    else:
        operation["requestBody"] = {"required": False, "content": {
            "application/x-www-form-urlencoded": {"schema": fields},
            "application/json": {"schema": fields},
        }}
    return operation


def hook_paths() -> dict[str, Any]:
    """The OpenAPI path items of the GroupServer hooks (POST, and GET too)."""
    return {path: {"post": _operation(path, spec, "POST"), "get": _operation(path, spec, "GET")}
            for path, spec in HOOKS.items()}


#: How callers prove who they are, referenced by each operation's ``security``.
SECURITY_SCHEMES: dict[str, Any] = {
    "siteToken": {
        "type": "apiKey", "in": "query", "name": "token",
        "description": "The site token (``mailhub token create``). The hooks read it as the "
                       "form field ``token``, from the query string or the form body; the "
                       "calendar collector from the query string.",
    },
    "siteTokenBearer": {
        "type": "http", "scheme": "bearer",
        "description": "The site token as ``Authorization: Bearer TOKEN``.",
    },
    "pushBasic": {
        "type": "http", "scheme": "basic",
        "description": "``[push] username`` and ``password``: the credentials in Dovecot's "
                       "push URL or the Lua script's settings. With neither set, only "
                       "loopback peers are accepted, and only with ``allow_loopback = yes``.",
    },
    "mailstoreBasic": {
        "type": "http", "scheme": "basic",
        "description": "``[mailstore] username`` and ``password``, as entered in MailStore's "
                       "Application Integration settings.",
    },
    "siteUserBasic": {
        "type": "http", "scheme": "basic",
        "description": "A user's own login and password: a site user (address or id) or "
                       "an LDAP user.",
    },
}

_TAGS = [
    {"name": "GroupServer hooks",
     "description": "GroupServer-compatible web hooks for profiles and groups."},
    {"name": "Dovecot push",
     "description": "Dovecot's push notifications: answered at once, published afterwards "
                    "on the ``mail:*`` and ``mailbox:*`` topics."},
    {"name": "Event stream", "description": "A user's own events as Server-Sent Events."},
    {"name": "MailStore", "description": "MailStore Server's Application Integration."},
    {"name": "Contact collector", "description": "Calendar attendees become contacts."},
    {"name": "Operations", "description": "Liveness, metrics and this description."},
]

_UINT32 = 2**32 - 1
_NUMBER_OR_DIGITS: dict[str, Any] = {
    "oneOf": [{"type": "integer", "minimum": 0, "maximum": _UINT32},
              {"type": "string", "pattern": r"^\s*\+?\d+(\.0*)?\s*$"}]}
_NAMES: dict[str, Any] = {
    "description": "A list of names, a space- or comma-separated string, or (flags only) "
                   "Dovecot's flag bitmask",
    "oneOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"},
              {"type": "integer", "minimum": 0, "maximum": 0xFFFF},
              {"type": "object", "maxProperties": 0, "description": "an empty Lua table"}]}
_TEXT: dict[str, Any] = {"type": "string"}
_NULLABLE_TEXT: dict[str, Any] = {"type": ["string", "null"]}
_NULLABLE_INT: dict[str, Any] = {"type": ["integer", "null"]}

#: Component schemas of every surface but the hooks.
SURFACE_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "description": "What went wrong, for any status but 2xx.",
        "required": ["error"],
        "properties": {"error": {"type": "string"},
                       "messages": {"type": "array", "items": {"type": "string"}}},
    },
    "ValidationFailure": {
        "type": "object",
        "description": "Bad input: the first reason in ``error``, every reason in ``messages``.",
        "required": ["error", "messages"],
        "properties": {"error": {"type": "string"},
                       "messages": {"type": "array", "items": {"type": "string"},
                                    "minItems": 1}},
    },
    "OXNotification": {
        "type": "object",
        "description": "What Dovecot's OX driver PUTs for each message delivered into INBOX.",
        "required": ["user", "event", "folder", "imap-uidvalidity", "imap-uid"],
        "properties": {
            "user": {"type": "string", "minLength": 1,
                     "description": "The login, or the METADATA value with "
                                    "``user_from_metadata``"},
            "event": {"type": "string", "description": "``messageNew`` (in any case)"},
            "folder": {"type": "string", "minLength": 1},
            "imap-uidvalidity": _NUMBER_OR_DIGITS,
            "imap-uid": {"oneOf": [_NUMBER_OR_DIGITS,
                                   {"type": "array", "minItems": 1, "items": _NUMBER_OR_DIGITS}]},
            "from": {"type": "string", "description": "Raw header: MIME encoded-words decoded"},
            "subject": {"type": "string",
                        "description": "Raw header: MIME encoded-words decoded"},
            "snippet": {"type": "string"},
            "unseen": _NUMBER_OR_DIGITS,
        },
    },
    "OXAnswer": {
        "type": "object", "description": "OX App Suite's answer.",
        "required": ["success"], "properties": {"success": {"const": True}},
    },
    "LuaEvent": {
        "type": "object",
        "description": "One event of Dovecot's Lua push driver, as mailhub's script "
                       "(contrib/dovecot/mailhub-push.lua) sends it. Numbers may also come "
                       "as strings of digits.",
        "properties": {
            "name": {"type": "string",
                     "description": "Dovecot's event: MessageNew, MessageAppend, MessageRead, "
                                    "MessageTrash, MessageExpunge, FlagsSet, FlagsClear, "
                                    "MailboxCreate, MailboxDelete, MailboxRename, "
                                    "MailboxSubscribe, MailboxUnsubscribe (or message_new... "
                                    "in any case); ``event`` is read when ``name`` is absent"},
            "user": {"type": "string", "description": "Overrides the transaction's user"},
            "mailbox": _TEXT, "mailbox_old": _TEXT,
            "uid": _NUMBER_OR_DIGITS, "uid_validity": _NUMBER_OR_DIGITS,
            "unseen": _NUMBER_OR_DIGITS,
            "date": {"type": ["integer", "string"], "description": "Seconds since the epoch"},
            "tz": {"type": ["integer", "string"], "description": "Offset in minutes"},
            "from": _TEXT, "to": _TEXT, "from_address": _TEXT, "from_display_name": _TEXT,
            "to_address": _TEXT, "to_display_name": _TEXT, "subject": _TEXT, "snippet": _TEXT,
            "message_id": _TEXT,
            "flags": _NAMES, "keywords": _NAMES, "flags_old": _NAMES, "keywords_old": _NAMES,
        },
    },
    "LuaTransaction": {
        "type": "object",
        "description": "One transaction's events, as mailhub's Lua script POSTs them "
                       "(an event may name its own ``user``).",
        "required": ["events"],
        "properties": {
            "user": {"type": "string", "minLength": 1},
            "events": {"oneOf": [{"type": "array", "items": {"$ref": _REF + "LuaEvent"}},
                                 {"type": "object", "maxProperties": 0,
                                  "description": "an empty Lua table"}]},
        },
    },
    "LuaAnswer": {
        "type": "object",
        "required": ["success", "events"],
        "properties": {"success": {"const": True},
                       "events": {"type": "integer", "minimum": 0,
                                  "description": "Events accepted for publication"}},
    },
    "PushEvent": {
        "type": "object",
        "description": "The payload of a push topic (``mail:new``, ``mail:append``, "
                       "``mail:flags``, ``mail:expunge``, ``mailbox:*``), as published and "
                       "streamed; see doc/push.rst for each topic's fields.",
        "required": ["user", "event", "driver"],
        "properties": {
            "user": _TEXT,
            "event": {"type": "string", "enum": [
                "message_new", "message_append", "message_read", "flags_set", "flags_clear",
                "message_trash", "message_expunge", "mailbox_create", "mailbox_delete",
                "mailbox_rename", "mailbox_subscribe", "mailbox_unsubscribe"]},
            "driver": {"type": "string", "enum": ["ox", "lua"]},
            "mailbox": _NULLABLE_TEXT, "mailbox_old": _NULLABLE_TEXT,
            "uid": _NULLABLE_INT, "uid_validity": _NULLABLE_INT, "unseen": _NULLABLE_INT,
            "date": _NULLABLE_INT, "tz": _NULLABLE_INT,
            "from": _NULLABLE_TEXT, "to": _NULLABLE_TEXT, "from_address": _NULLABLE_TEXT,
            "from_display_name": _NULLABLE_TEXT, "to_address": _NULLABLE_TEXT,
            "to_display_name": _NULLABLE_TEXT, "subject": _NULLABLE_TEXT,
            "snippet": _NULLABLE_TEXT, "message_id": _NULLABLE_TEXT,
            "flags": {"type": ["array", "null"], "items": {"type": "string"}},
            "keywords": {"type": ["array", "null"], "items": {"type": "string"}},
            "flags_old": {"type": ["array", "null"], "items": {"type": "string"}},
            "keywords_old": {"type": ["array", "null"], "items": {"type": "string"}},
        },
    },
    "MailStoreCommand": {
        "type": "object",
        "description": "MailStore's form (the query string counts too; a JSON object is "
                       "accepted as well).",
        "required": ["cmd"],
        "properties": {
            "cmd": {"type": "string", "enum": ["list", "auth"]},
            "user": {"type": "string", "description": "cmd=auth: the login"},
            "pass": {"type": "string", "format": "password",
                     "description": "cmd=auth: the password (empty always fails)"},
        },
    },
    "MailStoreUser": {
        "type": "object",
        "required": ["userName"],
        "properties": {
            "userName": {"type": "string"},
            "distinguishedName": {"type": "string"},
            "fullName": {"type": "string"},
            "emailAddresses": {"type": "array", "items": {"type": "string"}},
        },
    },
    "MailStoreAuth": {
        "type": "object",
        "required": ["succeeded"],
        "properties": {"succeeded": {"type": "boolean"}},
    },
    "CalendarCollected": {
        "type": "object",
        "required": ["user", "emails"],
        "properties": {
            "user": {"type": "string"},
            "emails": {"type": "array", "items": {"type": "string"},
                       "description": "Attendees and organizers, ``Name <address>``, "
                                      "submitted to the collector"},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "version", "dependencies"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "degraded"]},
            "version": {"type": "string"},
            "dependencies": {"type": "object", "additionalProperties": {
                "type": "object", "required": ["ok", "detail"],
                "properties": {"ok": {"type": "boolean"}, "detail": {"type": "string"}},
            }},
        },
    },
}


def _answer(description: str, schema: dict[str, Any],
            headers: dict[str, Any] | None = None,
            media: str = "application/json") -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {media: {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


_ERROR = {"$ref": _REF + "Error"}
_WWW_AUTHENTICATE = {"WWW-Authenticate": {
    "description": "``Basic realm=\"...\", charset=\"UTF-8\"``", "required": True,
    "schema": {"type": "string"}}}
_RETRY_AFTER = {"Retry-After": {
    "description": "Seconds to wait before trying again", "required": True,
    "schema": {"type": "integer", "minimum": 0}}}


def _bad_input(what: str = "Bad input") -> dict[str, Any]:
    return _answer(what + "; every reason is listed", {"$ref": _REF + "ValidationFailure"})


def _unauthorized() -> dict[str, Any]:
    return _answer("Missing or wrong Basic credentials", _ERROR, _WWW_AUTHENTICATE)


def _too_large() -> dict[str, Any]:
    return _answer("The body is larger than the limit", _ERROR)


def _push_operation(driver: str, method: str) -> dict[str, Any]:
    body: dict[str, Any]
    if driver == "ox":
        summary = "Dovecot's OX driver: one delivered message (PUT, as Dovecot sends it)"
        body = {"application/json": {"schema": {"$ref": _REF + "OXNotification"}}}
        success = _answer("Accepted; published on ``mail:new`` afterwards",
                          {"$ref": _REF + "OXAnswer"})
    else:
        summary = "mailhub's Lua script: every event of one Dovecot transaction"
        body = {
            "application/json": {"schema": {"anyOf": [
                {"$ref": _REF + "LuaTransaction"},
                {"allOf": [{"$ref": _REF + "LuaEvent"}, {"required": ["user"]}],
                 "description": "a single event"}]}},
            "application/x-www-form-urlencoded": {"schema": {
                "allOf": [{"$ref": _REF + "LuaEvent"}, {"required": ["user"]}],
                "description": "other scripts' form bodies (a missing name means "
                               "MessageNew); read as such whatever the Content-Type"}},
        }
        success = _answer("Accepted; each event is published on its topic afterwards",
                          {"$ref": _REF + "LuaAnswer"})
    return {
        "tags": ["Dovecot push"],
        "summary": summary,
        "description": "Answers at once and publishes afterwards (``hub.local``, then the "
                       "global pubsub), so delivery never waits on the broker.",
        "operationId": "push_%s_%s" % (driver, method),
        "security": [{"pushBasic": []}],
        "requestBody": {"required": True, "content": body},
        "responses": {
            "200": success,
            "400": _bad_input("The body is not a notification"),
            "401": _unauthorized(),
            "413": _too_large(),
            "503": _answer("Too many notifications waiting to be published; Dovecot retries "
                           "after Retry-After", _ERROR, _RETRY_AFTER),
        },
    }


_EVENT_STREAM_EXAMPLE = (
    "retry: 5000\n: connected\n\n"
    "id: 3f9a0c1d-7\nevent: mail:new\n"
    'data: {"user":"alice@example.org","event":"message_new","driver":"ox",'
    '"mailbox":"INBOX","uid":7,...}\n\n'
    ": keepalive\n\n")


def _events_path() -> dict[str, Any]:
    return {"get": {
        "tags": ["Event stream"],
        "summary": "The authenticated user's own mail and contact events",
        "description": "Server-Sent Events: one frame per event (``id``, ``event`` = the "
                       "topic, ``data`` = its JSON payload) for ``mail:*``, ``mailbox:*`` "
                       "(schema PushEvent) and ``contacts:contact:add`` (ESN's payload), "
                       "keep-alive comments, and ``event: reset`` when ``Last-Event-ID`` "
                       "cannot be resumed from. The stream lasts until the client leaves.",
        "operationId": "events_get",
        "security": [{"siteUserBasic": []}],
        "parameters": [{
            "name": "Last-Event-ID", "in": "header", "required": False,
            "description": "The last id received: the events since are replayed from this "
                           "process's buffer",
            "schema": {"type": "string"}}],
        "responses": {
            "200": _answer("The event stream", {"type": "string",
                                                "examples": [_EVENT_STREAM_EXAMPLE]},
                           media="text/event-stream"),
            "401": _unauthorized(),
            "503": _answer("The user source (e.g. LDAP) cannot be asked now", _ERROR,
                           _RETRY_AFTER),
        },
    }}


def _mailstore_path() -> dict[str, Any]:
    return {"post": {
        "tags": ["MailStore"],
        "summary": "MailStore's Application Integration: cmd=list, cmd=auth",
        "description": "``cmd=list`` streams every user of the configured sources (site "
                       "users, then LDAP); if a source fails once the array has begun, the "
                       "connection is cut so MailStore never takes a truncated list as "
                       "complete. ``cmd=auth`` checks one login. Other methods are answered "
                       "405 in JSON.",
        "operationId": "mailstore_post",
        "security": [{"mailstoreBasic": []}],
        "requestBody": {"required": True, "content": {
            "application/x-www-form-urlencoded": {"schema": {"$ref": _REF + "MailStoreCommand"}},
            "application/json": {"schema": {"$ref": _REF + "MailStoreCommand"}},
        }},
        "responses": {
            "200": _answer("cmd=list: every user; cmd=auth: whether the password is right",
                           {"oneOf": [{"type": "array",
                                       "items": {"$ref": _REF + "MailStoreUser"}},
                                      {"$ref": _REF + "MailStoreAuth"}]},
                           media="text/json"),  # as MailStore's own examples (issue 12)
            "400": _bad_input("No cmd, an unknown one, no user for cmd=auth, or a bad form"),
            "401": _unauthorized(),
            "413": _too_large(),
            "503": _answer("The user source that must answer cannot be asked now", _ERROR,
                           _RETRY_AFTER),
        },
    }}


def _calendar_path() -> dict[str, Any]:
    collected = {"$ref": _REF + "CalendarCollected"}
    return {"post": {
        "tags": ["Contact collector"],
        "summary": "Collect an iCalendar body's attendees and organizers",
        "description": "For calendar systems without AMQP: resources are dropped, CN kept "
                       "as the display name; the addresses go to the collector as one "
                       "message for ``user``.",
        "operationId": "collector_calendar_post",
        "security": [{"siteTokenBearer": []}, {"siteToken": []}],
        "parameters": [{
            "name": "user", "in": "query", "required": True,
            "description": "Whose collected address book: a login, an address or an id",
            "schema": {"type": "string", "minLength": 1}}],
        "requestBody": {"required": True, "content": {
            "text/calendar": {"schema": {"type": "string"}}}},
        "responses": {
            "200": _answer("Nothing to collect (``emails`` is empty)", collected),
            "202": _answer("Submitted to the collector", collected),
            "400": _bad_input("No user, or the body is not iCalendar (or not UTF-8)"),
            "403": _answer("Missing or wrong site token", _ERROR),
            "413": _too_large(),
            "503": _answer("The collector cannot take more now", _ERROR, _RETRY_AFTER),
        },
    }}


def _operations_paths() -> dict[str, Any]:
    health = {"$ref": _REF + "Health"}
    return {
        "/healthz": {"get": {
            "tags": ["Operations"],
            "summary": "Liveness, and each dependency's state (HEAD too)",
            "operationId": "healthz_get",
            "security": [],
            "parameters": [{
                "name": "ready", "in": "query", "required": False, "allowEmptyValue": True,
                "description": "Present: answer 503 when a dependency is down (readiness)",
                "schema": {"type": "string"}}],
            "responses": {
                "200": _answer("Alive (``status`` says whether every dependency is up)",
                               health),
                "503": _answer("With ``ready``: a dependency is down", health),
            },
        }},
        "/metrics": {"get": {
            "tags": ["Operations"],
            "summary": "Prometheus metrics",
            "operationId": "metrics_get",
            "security": [],
            "responses": {"200": _answer("The text exposition format 0.0.4",
                                         {"type": "string"}, media="text/plain")},
        }},
        "/openapi.json": {"get": {
            "tags": ["Operations"],
            "summary": "This description",
            "operationId": "openapi_get",
            "security": [],
            "responses": {"200": _answer("The OpenAPI 3.1 document", {
                "type": "object", "required": ["openapi", "info", "paths"]})},
        }},
    }


def surface_paths(mailstore_path: str = "/mailstore",
                  calendar: bool = True) -> dict[str, Any]:
    """The path items of every endpoint but the hooks.

    ``mailstore_path`` is ``[mailstore] path``; ``calendar`` says whether the
    collector (and so ``/collector/v1/calendar``) is enabled.
    """
    paths: dict[str, Any] = {
        "/preliminary/http-notify/v1/notify": {
            "put": _push_operation("ox", "put"), "post": _push_operation("ox", "post")},
        "/push/v1/notify": {
            "post": _push_operation("lua", "post"), "put": _push_operation("lua", "put")},
        "/api/v1/events": _events_path(),
        "/" + mailstore_path.strip("/"): _mailstore_path(),
    }
    if calendar:
        paths["/collector/v1/calendar"] = _calendar_path()
    paths.update(_operations_paths())
    return paths


def site_document(mailstore_path: str = "/mailstore", calendar: bool = True,
                  title: str = "mailhub", version: str = __version__) -> dict[str, Any]:
    """What ``/openapi.json`` serves: every endpoint of the site, hooks included.

    Give it the configuration: ``[mailstore] path`` and ``[collector]
    enabled``.
    """
    document = openapi_document(surface_paths(mailstore_path, calendar), SURFACE_SCHEMAS,
                                title, version)
    document["info"]["description"] = (
        "Every HTTP endpoint of mailhub: the GroupServer hooks, Dovecot's push "
        "notifications, the event stream, MailStore's Application Integration, the "
        "calendar collector and the operations endpoints. The embedded CardDAV server "
        "at /dav/ speaks WebDAV (RFC 6352) and is not described here.")
    return document


def openapi_document(extra_paths: dict[str, Any] | None = None,
                     extra_schemas: dict[str, Any] | None = None,
                     title: str = "mailhub", version: str = __version__) -> dict[str, Any]:
    """An OpenAPI 3.1 document of the hooks' paths plus ``extra_paths``.

    The building block of :func:`site_document`, which is the whole site's.
    """
    paths = hook_paths()
    paths.update(extra_paths or {})
    schemas = dict(HOOK_SCHEMAS)
    schemas.update(extra_schemas or {})
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "The JSON endpoints of mailhub."},
        "tags": list(_TAGS),
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": schemas, "securitySchemes": dict(SECURITY_SCHEMES)},
    }
