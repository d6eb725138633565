"""The OpenAPI 3.1 description of mailhub's JSON endpoints, starting with the hooks.

:func:`openapi_document` builds the whole document; each surface adds its
own paths (and component schemas) through ``extra_paths`` and
``extra_schemas``, so the document served at ``/openapi.json`` is built in
one place. :func:`hook_paths` describes the GroupServer hooks from the same
:data:`~mailhub.web.hooks.HOOKS` table the handlers use, so the two cannot
drift apart.
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


def openapi_document(extra_paths: dict[str, Any] | None = None,
                     extra_schemas: dict[str, Any] | None = None,
                     title: str = "mailhub", version: str = __version__) -> dict[str, Any]:
    """The whole OpenAPI 3.1 document: the hooks' paths plus every surface's extras."""
    paths = hook_paths()
    paths.update(extra_paths or {})
    schemas = dict(HOOK_SCHEMAS)
    schemas.update(extra_schemas or {})
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "The JSON endpoints of mailhub."},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": schemas},
    }
