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

The document is exact: a request its schemas accept is one the server
carries out, one they refuse is answered 4xx, and every answer matches its
schema (tests/web/test_openapi_conformance.py runs schemathesis with every
check against a real ``twistd mailhub``). Two things JSON Schema cannot say
are approximated and said in the descriptions: which addresses mailhub's
validator takes (``format: email``) and which iCalendar texts vobject reads
(the pattern of the simplest one).
"""

from __future__ import annotations

from typing import Any
from zoneinfo import available_timezones

from mailhub import __version__
from mailhub.web.hooks import (GROUPS, HOOKS, MAX_BIOGRAPHY, MAX_NAME, MAX_USER, SITE_MEMBERS,
                                HookSpec)

_REF = "#/components/schemas/"

#: Time zone names ``tz`` accepts: empty, or a name zoneinfo knows.
_ZONES = sorted(available_timezones())


#: Component schemas the hooks' replies use.
HOOK_SCHEMAS: dict[str, Any] = {
    "TimeZone": {"type": "string", "enum": [""] + _ZONES,
                 "description": "Empty, or a time zone name the server's zoneinfo knows"},
    "GroupServerError": {
        "type": "object",
        "description": "GroupServer's error shape, the one shape of every error the hooks "
                       "answer: status 100 (a validation error) and every reason, for a "
                       "refused request (HTTP 400, 403, 413).",
        "required": ["status", "message"],
        "additionalProperties": False,
        "properties": {
            "status": {"type": "integer", "const": 100},
            "message": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        },
    },
    "HookError": {
        "type": "object",
        "description": "GroupServer's error shape for the hooks' other errors (HTTP 404, "
                       "405, 500, 503): status is the HTTP status.",
        "required": ["status", "message"],
        "additionalProperties": False,
        "properties": {
            "status": {"type": "integer", "enum": [404, 405, 500, 503]},
            "message": {"type": "array", "items": {"type": "string"}, "minItems": 1},
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
    # anyOf, not oneOf: an empty list is an answer to either action.
    "/gs-site-member-list.json": {"anyOf": [
        {"type": "array", "items": {"type": "string"}, "description": "action users"},
        {"type": "array", "items": {"$ref": _REF + "ProfileData"},
         "description": "action user_groups"}]},
    "/gs-group-member-leave.json": {"$ref": _REF + "LeaveReply"},
}
_SUCCESS["/gs-site-member.json"] = _SUCCESS["/gs-site-member-list.json"]

#: Characters no field may hold (mailhub.web.common.refuse_controls): C0
#: controls but tab and line ends, and DEL.
_CONTROLS = "\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f"
#: Any text without those characters.
_FORM_TEXT: dict[str, Any] = {"type": "string", "pattern": "^[^%s]*$" % _CONTROLS}
#: Such text holding something besides white space (what "required" means).
_FORM_FILLED: dict[str, Any] = {
    "type": "string", "pattern": "^[^%s]*[^%s\\s][^%s]*$" % (_CONTROLS, _CONTROLS, _CONTROLS)}
#: A JSON body's value: text, or a number or boolean or null read as text
#: (``true`` and ``null`` as empty, ``false`` as "false").
_JSON_SCALAR: dict[str, Any] = {"type": ["string", "number", "boolean", "null"],
                                "pattern": _FORM_TEXT["pattern"]}


def _field_schema(name: str, filled: bool, json: bool, query: bool = False,
                  ) -> dict[str, Any]:
    """What the server accepts in field ``name`` once the action is given.

    In a JSON body a number is read as its text, ``false`` as "false",
    ``true`` and ``null`` as empty.
    """
    text: dict[str, Any]
    if name == "email" and filled:
        return {"type": "string", "format": "email", "maxLength": 254,
                "description": "One local@domain address (no display name)"}
    if name == "tz":
        zones: dict[str, Any] = {"$ref": _REF + "TimeZone"}
        return {"anyOf": [zones, {"enum": [True, None]}]} if json else zones
    if name == "fn" and filled:
        text = dict(_FORM_FILLED, maxLength=MAX_NAME)
    elif name == "user" and filled:
        text = dict(_FORM_FILLED, maxLength=MAX_USER)
    elif name == "biography":
        # In a query string the request line's limit (16 KiB) comes first.
        return dict(_JSON_SCALAR if json else _FORM_TEXT,
                    **({} if query else {"maxLength": MAX_BIOGRAPHY}))
    elif filled:
        text = _FORM_FILLED
    else:
        return _JSON_SCALAR if json else _FORM_TEXT
    if json:
        return {"anyOf": [text, {"type": "number"}, {"const": False}]}
    return text


def _form_schema(spec: HookSpec, json: bool = False, query: bool = False) -> dict[str, Any]:
    """The hook's form: fields are checked only when an action is present.

    Without an action the hook describes itself whatever else is sent; with
    one, the hook's required arguments must hold more than white space. No
    field name or value may hold a control character (but tab and line ends).
    """
    loose = _JSON_SCALAR if json else _FORM_TEXT
    described: dict[str, Any] = {}
    for name, argument in spec.arguments:
        described[name] = dict(loose, description=argument.description)
    for name, label in spec.actions:
        described[name] = dict(loose, description="The action %r (%s): present, with any "
                                                  "value or none" % (name, label))
    required = [name for name, argument in spec.arguments
                if argument.required and name != "token"]
    action_names = [name for name, _ in spec.actions]
    checked = {name: _field_schema(name, name in required, json, query)
               for name, _ in spec.arguments if name != "token"}
    present = [{"required": [name]} for name in action_names]
    common: dict[str, Any] = {
        "type": "object",
        "propertyNames": {"pattern": _FORM_TEXT["pattern"]},
        "additionalProperties": loose,
    }
    with_action: dict[str, Any] = {
        "description": "An action (the token is checked first)",
        "required": required, "properties": checked}
    if len(present) > 1:
        with_action["anyOf"] = present
    else:
        with_action["required"] = action_names + required
    return dict(common, properties=described, anyOf=[
        {"description": "No action: the self-description", "not": {"anyOf": present}},
        with_action])


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": schema}}}


def _operation(path: str, spec: HookSpec, method: str,
               status_codes: str = "http") -> dict[str, Any]:
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
                    "content": {"application/json": {"schema": {"anyOf": [
                        _SUCCESS[path], {"$ref": _REF + "SelfDescription"}]}}}},
            "400": _json({"$ref": _REF + "GroupServerError"}, "Validation error"),
            "403": _json({"$ref": _REF + "GroupServerError"}, "Missing or wrong token"),
            # Refused before the hooks see the request (mailhub.web.site.LimitedRequest),
            # in the hooks' shape all the same (Root.shape_errors).
            "413": _json({"$ref": _REF + "GroupServerError"},
                         "The body is larger than [mailhub] max_body"),
        },
    }
    if spec in (GROUPS, SITE_MEMBERS):
        # Never a partial list: 503 until the groups are read after a start.
        operation["responses"]["503"] = dict(
            _json({"allOf": [{"$ref": _REF + "HookError"},
                             {"properties": {"status": {"const": 503}}}]},
                  "The site is still starting (before its groups are read)"),
            headers={"Retry-After": {
                "description": "Seconds to wait before trying again", "required": True,
                "schema": {"type": "integer", "minimum": 0}}})
    if status_codes == "groupserver":
        # [hooks] status_codes = groupserver: refusals are answered 200, as
        # GroupServer answers them (mailhub.web.hooks.GroupHooks.refusal).
        responses = operation["responses"]
        del responses["400"], responses["403"]
        responses["200"] = {
            "description": "The action's answer, the self-description when no action is "
                           "given, or (with [hooks] status_codes = groupserver) a "
                           "validation error or a missing or wrong token, in GroupServer's "
                           "error shape",
            "content": {"application/json": {"schema": {"anyOf": [
                _SUCCESS[path], {"$ref": _REF + "SelfDescription"},
                {"$ref": _REF + "GroupServerError"}]}}}}
    if method == "GET":
        # One exploded object: each property is a query parameter, and the
        # fields a hook requires depend on the action present.
        operation["parameters"] = [
            {"name": "form", "in": "query", "required": False, "style": "form",
             "explode": True, "schema": _form_schema(spec, query=True),
             "description": "The form in the query string. twisted.web takes a request "
                            "line and headers of at most 16 KiB together: a longer one is "
                            "answered 400 without a body and the connection closed. Send "
                            "long fields (a biography) in a POST body."}]
    else:
        operation["requestBody"] = {"required": False, "content": {
            "application/x-www-form-urlencoded": {"schema": _form_schema(spec)},
            "application/json": {"schema": _form_schema(spec, json=True)},
        }}
    return operation


def hook_paths(status_codes: str = "http") -> dict[str, Any]:
    """The OpenAPI path items of the GroupServer hooks (POST, and GET too).

    ``status_codes`` is ``[hooks] status_codes``: ``http`` (400 and 403 for
    refusals) or ``groupserver`` (200 for everything, as GroupServer answers).
    """
    return {path: {"post": _operation(path, spec, "POST", status_codes),
                   "get": _operation(path, spec, "GET", status_codes)}
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
    "opsBasic": {
        "type": "http", "scheme": "basic",
        "description": "``[mailhub] ops_user`` and ``ops_password``, when set: the "
                       "operations endpoints' credentials (``/healthz`` needs none).",
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
#: 0 to 2**32 - 1 written in at most 20 digits (leading zeros included).
_UINT32_DIGITS = ("(0{0,11}[0-9]{1,9}|0{0,10}([1-3][0-9]{9}|4[01][0-9]{8}|42[0-8][0-9]{7}"
                  "|429[0-3][0-9]{6}|4294[0-8][0-9]{5}|42949[0-5][0-9]{4}|429496[0-6][0-9]{3}"
                  "|4294967[01][0-9]{2}|42949672[0-8][0-9]|429496729[0-5]))")
#: How mailhub.push.decode reads a whole number written as text: a sign,
#: at most 20 digits, an optional ".0...", white space around.
_WS = "[ \\t\\n\\r\\f\\v]*"


def _digits(unsigned: str) -> dict[str, Any]:
    return {"type": "string",
            "pattern": "^%s(\\+?%s|-0{1,20})(\\.0*)?%s$" % (_WS, unsigned, _WS)}


def _whole(low: int, high: int, digits: str, required: bool = False) -> dict[str, Any]:
    """A whole number from ``low`` to ``high``: a JSON number or its digits.

    Where it is not ``required``, ``null`` and ``""`` mean absent.
    """
    forms: list[dict[str, Any]] = [{"type": "integer", "minimum": low, "maximum": high},
                                   _digits(digits)]
    if low < 0:
        forms[1] = {"type": "string", "pattern": "^%s[+-]?%s(\\.0*)?%s$" % (_WS, digits, _WS)}
    if not required:
        forms.append({"enum": [None, ""]})
    return {"anyOf": forms}


_NUMBER_OR_DIGITS = _whole(0, _UINT32, _UINT32_DIGITS)
_REQUIRED_NUMBER = _whole(0, _UINT32, _UINT32_DIGITS, required=True)


def _names(bitmask: bool) -> dict[str, Any]:
    forms: list[dict[str, Any]] = [
        {"type": "array", "items": {"type": "string"}}, {"type": "string"},
        {"type": "object", "maxProperties": 0, "description": "an empty Lua table"},
        {"type": "null"}]
    if bitmask:
        forms.append({"type": "integer", "minimum": 0, "maximum": 0xFFFF,
                      "description": "Dovecot's flag bitmask"})
    return {"description": "A list of names or a space- or comma-separated string"
                           + (", or Dovecot's flag bitmask" if bitmask else ""),
            "anyOf": forms}


_FLAGS = _names(bitmask=True)
_KEYWORDS = _names(bitmask=False)
_TEXT: dict[str, Any] = {"type": ["string", "null"]}
#: Text that holds more than white space.
_FILLED_TEXT: dict[str, Any] = {"type": "string", "pattern": "[^\\s\\x1c-\\x1f]"}


def _event_pattern(*names: str) -> str:
    """A pattern for Dovecot event names in any case, with ``_`` or ``-`` anywhere
    (what :func:`mailhub.push.events.canonical_event` reads)."""
    def one(name: str) -> str:
        return "".join("[%s%s][_-]*" % (c.lower(), c.upper())
                       for c in name.replace("_", ""))
    return "^\\s*[_-]*(%s)\\s*$" % "|".join(one(n) for n in names)


_EVENT_NAMES = ("message_new", "message_append", "message_read", "message_trash",
                "message_expunge", "flags_set", "flags_clear", "mailbox_create",
                "mailbox_delete", "mailbox_rename", "mailbox_subscribe",
                "mailbox_unsubscribe")
_NULLABLE_TEXT: dict[str, Any] = {"type": ["string", "null"]}
_NULLABLE_INT: dict[str, Any] = {"type": ["integer", "null"]}

#: Dovecot's events, by the fields mailhub reads for them
#: (mailhub.push.decode._lua_event): a field an event does not read may hold
#: anything.
_MESSAGE_FIELDS: dict[str, Any] = {
    "uid": _NUMBER_OR_DIGITS, "uid_validity": _NUMBER_OR_DIGITS, "unseen": _NUMBER_OR_DIGITS,
    "mailbox": _TEXT}
_CONTENT_FIELDS: dict[str, Any] = dict(
    _MESSAGE_FIELDS,
    date=dict(_whole(-(2**53), 2**53, "0{0,5}[0-9]{1,15}"), description="Seconds since the epoch"),
    tz=dict(_whole(-100000, 100000, "0{0,15}([0-9]{1,5}|100000)"), description="Minutes east of UTC"),
    flags=_FLAGS, keywords=_KEYWORDS,
    **{key: _TEXT for key in ("from", "to", "from_address", "from_display_name", "to_address",
                              "to_display_name", "subject", "snippet", "message_id")})
_FLAG_FIELDS: dict[str, Any] = dict(_MESSAGE_FIELDS, flags=_FLAGS, keywords=_KEYWORDS,
                                    flags_old=_FLAGS, keywords_old=_KEYWORDS)
_EVENT_GROUPS: list[tuple[tuple[str, ...], dict[str, Any], list[str]]] = [
    (("message_new", "message_append"), _CONTENT_FIELDS, []),
    (("message_read", "flags_set", "flags_clear"), _FLAG_FIELDS, []),
    (("message_trash", "message_expunge"), _MESSAGE_FIELDS, []),
    (("mailbox_create", "mailbox_delete", "mailbox_subscribe", "mailbox_unsubscribe"),
     {"mailbox": _FILLED_TEXT}, ["mailbox"]),
    (("mailbox_rename",), {"mailbox": _FILLED_TEXT, "mailbox_old": _TEXT}, ["mailbox"]),
]


def _as_form_value(schema: dict[str, Any]) -> dict[str, Any]:
    """The text forms of a field's schema: what it accepts in a form body."""
    texts = [form for form in schema.get("anyOf", [schema])
             if form.get("type") == "string" and "pattern" in form]
    if texts and "anyOf" in schema:  # a number: its digits, or "" for absent
        return {"anyOf": texts + [{"const": ""}]}
    if texts:
        return texts[0]
    return {"type": "string"}


def _lua_event(form: bool = False) -> dict[str, Any]:
    """One Lua event: which fields are read, and how, depends on the event.

    The event is ``name``, else ``event``; in a form body (``form``), where
    every value is text, neither means MessageNew.
    """
    branches: list[dict[str, Any]] = []
    for names, fields, required in _EVENT_GROUPS:
        pattern = {"type": "string", "pattern": _event_pattern(*names)}
        if form:
            fields = {key: _as_form_value(schema) for key, schema in fields.items()}
        named: list[dict[str, Any]] = [
            {"required": ["name"], "properties": {"name": pattern}},
            {"required": ["event"], "not": {"required": ["name"]},
             "properties": {"event": pattern}}]
        if form and "message_new" in names:
            named.append({"not": {"anyOf": [{"required": ["name"]},
                                            {"required": ["event"]}]}})
        branches.append({"anyOf": named, "required": required, "properties": fields})
    return {
        "type": "object",
        "description": "One event of Dovecot's Lua push driver, as mailhub's script "
                       "(contrib/dovecot/mailhub-push.lua) sends it. ``name`` is Dovecot's "
                       "event: MessageNew, MessageAppend, MessageRead, MessageTrash, "
                       "MessageExpunge, FlagsSet, FlagsClear, MailboxCreate, MailboxDelete, "
                       "MailboxRename, MailboxSubscribe, MailboxUnsubscribe (or "
                       "message_new... in any case); ``event`` is read when ``name`` is "
                       "absent. Numbers may also come as strings of digits; ``null`` and "
                       "``\"\"`` mean absent.",
        "properties": {
            "name": {"type": "string"}, "event": {},
            "user": dict(_FILLED_TEXT, type=["string", "null"],
                         description="Overrides the transaction's user"),
        },
        "anyOf": branches,
    }


def _mailstore_command(json: bool = False) -> dict[str, Any]:
    """MailStore's form: ``cmd=list``, or ``cmd=auth`` with ``user`` (and ``pass``)."""
    loose = _JSON_SCALAR if json else _FORM_TEXT
    return {
        "type": "object",
        "description": "MailStore's form (the query string counts too; a JSON object is "
                       "accepted as well, its numbers and booleans read as text). No name "
                       "or value may hold a control character but tab and line ends.",
        "required": ["cmd"],
        "propertyNames": {"pattern": _FORM_TEXT["pattern"]},
        "additionalProperties": loose,
        "properties": {
            "cmd": {"type": "string", "enum": ["list", "auth"]},
            "user": dict(loose, description="cmd=auth: the login"),
            "pass": dict(loose, format="password",
                         description="cmd=auth: the password (empty always fails)"),
        },
        "anyOf": [{"properties": {"cmd": {"const": "list"}}},
                  {"properties": {"cmd": {"const": "auth"}}, "required": ["user"]}],
    }


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
            "user": dict(_FILLED_TEXT, description="The login, or the METADATA value "
                                                   "with ``user_from_metadata``"),
            "event": {"type": "string", "pattern": _event_pattern("message_new"),
                      "description": "``messageNew`` (in any case)"},
            "folder": _FILLED_TEXT,
            "imap-uidvalidity": _REQUIRED_NUMBER,
            "imap-uid": {"anyOf": [_REQUIRED_NUMBER,
                                   {"type": "array", "minItems": 1, "items": _REQUIRED_NUMBER}]},
            "from": dict(_TEXT, description="Raw header: MIME encoded-words decoded"),
            "subject": dict(_TEXT, description="Raw header: MIME encoded-words decoded"),
            "snippet": _TEXT,
            "unseen": _NUMBER_OR_DIGITS,
        },
    },
    "OXAnswer": {
        "type": "object", "description": "OX App Suite's answer.",
        "required": ["success"], "properties": {"success": {"const": True}},
    },
    "LuaEvent": _lua_event(),
    "LuaTransaction": {
        "type": "object",
        "description": "One transaction's events, as mailhub's Lua script POSTs them. "
                       "``user`` is whom the events are about, unless an event names its "
                       "own; an empty Lua table may stand for an empty list.",
        "required": ["events"],
        "properties": {
            "user": {"description": "Required (non-blank text) unless every event has its "
                                    "own ``user``"},
            "events": {"anyOf": [{"type": "array", "items": {"$ref": _REF + "LuaEvent"}},
                                 {"type": "object", "maxProperties": 0}]},
        },
        "anyOf": [
            {"required": ["user"], "properties": {"user": _FILLED_TEXT}},
            {"properties": {"events": {"anyOf": [
                {"type": "array", "items": {"required": ["user"],
                                            "properties": {"user": _FILLED_TEXT}}},
                {"type": "object", "maxProperties": 0}]}}},
        ],
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
    "MailStoreCommand": _mailstore_command(),
    "MailStoreCommandJSON": _mailstore_command(json=True),
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
                "properties": {
                    "ok": {"type": "boolean"}, "detail": {"type": "string"},
                    "outbox": {"type": "integer", "minimum": 0,
                               "description": "amqp, with a broker: publications waiting "
                                              "to be sent or confirmed"},
                    "outbox_limit": {"type": "integer", "minimum": 0,
                                     "description": "amqp, with a broker: [amqp] outbox"},
                },
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
                {"allOf": [{"$ref": _REF + "LuaEvent"},
                           {"required": ["user"], "not": {"required": ["events"]},
                            "properties": {"user": _FILLED_TEXT}}],
                 "description": "a single event"}]}},
            "application/x-www-form-urlencoded": {"schema": {
                "allOf": [_lua_event(form=True),
                          {"required": ["user"], "properties": {"user": _FILLED_TEXT}}],
                "description": "other scripts' form bodies (no name means MessageNew); "
                               "read as such whatever the Content-Type"}},
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
            "application/json": {"schema": {"$ref": _REF + "MailStoreCommandJSON"}},
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


#: The simplest iCalendar bodies: a VCALENDAR with extension properties.
_ICALENDAR = "^BEGIN:VCALENDAR\\r\\n(X-[A-Z0-9-]{1,20}:[ -~]*\\r\\n)*END:VCALENDAR\\r\\n$"


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
            "schema": _FORM_FILLED}],
        "requestBody": {"required": True, "content": {
            "text/calendar": {"schema": {
                "type": "string",
                "description": "An iCalendar object (RFC 5545) in UTF-8. The pattern is the "
                               "simplest such body; any VCALENDAR vobject reads is accepted.",
                "pattern": _ICALENDAR}}}},
        "responses": {
            "200": _answer("Nothing to collect (``emails`` is empty)", collected),
            "202": _answer("Submitted to the collector", collected),
            "400": _bad_input("No user, or the body is not iCalendar (or not UTF-8)"),
            "403": _answer("Missing or wrong site token", _ERROR),
            "413": _too_large(),
            "503": _answer("The collector cannot take more now", _ERROR, _RETRY_AFTER),
        },
    }}


def _operations_paths(credentials: bool = False) -> dict[str, Any]:
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
        "/metrics": {"get": _operations_endpoint(
            "Prometheus metrics", "metrics_get",
            _answer("The text exposition format 0.0.4", {"type": "string"},
                    media="text/plain"), credentials)},
        "/openapi.json": {"get": _operations_endpoint(
            "This description", "openapi_get",
            _answer("The OpenAPI 3.1 document", {
                "type": "object", "required": ["openapi", "info", "paths"]}), credentials)},
    }


def _operations_endpoint(summary: str, operation: str, success: dict[str, Any],
                         credentials: bool) -> dict[str, Any]:
    """``/metrics`` or ``/openapi.json``: open, or behind ``[mailhub] ops_user``'s
    Basic credentials (a 401 without them)."""
    found: dict[str, Any] = {"tags": ["Operations"], "summary": summary,
                             "operationId": operation, "security": [],
                             "responses": {"200": success}}
    if credentials:
        found["security"] = [{"opsBasic": []}]
        found["responses"]["401"] = _unauthorized()
    return found


def surface_paths(mailstore_path: str = "/mailstore",
                  calendar: bool = True, ops_credentials: bool = False) -> dict[str, Any]:
    """The path items of every endpoint but the hooks.

    ``mailstore_path`` is ``[mailstore] path``; ``calendar`` says whether the
    collector (and so ``/collector/v1/calendar``) is enabled;
    ``ops_credentials`` whether ``[mailhub] ops_user`` guards the operations
    endpoints.
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
    paths.update(_operations_paths(ops_credentials))
    return paths


def site_document(mailstore_path: str = "/mailstore", calendar: bool = True,
                  title: str = "mailhub", version: str = __version__,
                  status_codes: str = "http", ops_credentials: bool = False) -> dict[str, Any]:
    """What ``/openapi.json`` serves: every endpoint of the site, hooks included.

    Give it the configuration: ``[mailstore] path``, ``[collector] enabled``,
    ``[hooks] status_codes`` and whether ``[mailhub] ops_user`` is set.
    """
    document = openapi_document(surface_paths(mailstore_path, calendar, ops_credentials),
                                SURFACE_SCHEMAS, title, version, status_codes)
    document["info"]["description"] = (
        "Every HTTP endpoint of mailhub: the GroupServer hooks, Dovecot's push "
        "notifications, the event stream, MailStore's Application Integration, the "
        "calendar collector and the operations endpoints. The embedded CardDAV server "
        "at /dav/ speaks WebDAV (RFC 6352) and is not described here.")
    return document


def openapi_document(extra_paths: dict[str, Any] | None = None,
                     extra_schemas: dict[str, Any] | None = None,
                     title: str = "mailhub", version: str = __version__,
                     status_codes: str = "http") -> dict[str, Any]:
    """An OpenAPI 3.1 document of the hooks' paths plus ``extra_paths``.

    The building block of :func:`site_document`, which is the whole site's.
    """
    paths = hook_paths(status_codes)
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
