"""What every HTTP surface shares: JSON replies, bounded bodies, errors, Basic auth.

Handlers raise :mod:`mailhub.errors` (or :class:`HTTPError` for a status of
their own); :func:`handle_errors` turns each into a status and a JSON body in
one place, so no handler formats an error reply itself and nothing a client
sends can produce a 500.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import json
import re
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import parse_qsl

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from mailhub.decoding import decode_json_object, decode_utf8
from mailhub.errors import NotFound, Unavailable, ValidationError

log = Logger(namespace="mailhub.web")

JSON_TYPE = b"application/json; charset=utf-8"

T = TypeVar("T")


class HTTPError(Exception):
    """An error reply with its own status, JSON body and headers."""

    def __init__(self, status: int, body: Any,
                 headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body
        self.headers = headers or {}


class BodyTooLarge(HTTPError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, {"error": "request body larger than %d bytes" % limit})


def json_bytes(body: Any) -> bytes:
    """Compact UTF-8 JSON, as every surface answers."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def reply(request: IRequest, body: Any, status: int = 200,
          headers: dict[bytes, bytes] | None = None) -> bytes:
    """Set status and headers for a JSON reply and return its bytes."""
    return reply_encoded(request, json_bytes(body), status, headers)


def reply_encoded(request: IRequest, encoded: bytes, status: int = 200,
                  headers: dict[bytes, bytes] | None = None) -> bytes:
    """:func:`reply` for a body already encoded with :func:`json_bytes`."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    if headers:
        for name, value in headers.items():
            request.setHeader(name, value)
    return encoded


def read_body(request: IRequest, limit: int) -> bytes:
    """The request body, or BodyTooLarge when it exceeds ``limit`` bytes.

    twisted.web has already buffered the body (the root resource refuses
    bodies far above the limit before that, see ``LimitedSite``); this checks
    the precise per-surface limit.
    """
    content = request.content
    if content is None:
        return b""
    content.seek(0, 2)
    size = content.tell()
    if size > limit:
        raise BodyTooLarge(limit)
    content.seek(0)
    return content.read()


def form_fields(request: IRequest, limit: int) -> dict[str, str]:
    """Query string and form body as one dict of text, as GroupServer reads them.

    Bare names (``&add``) count with an empty value. A JSON body (an object)
    is accepted too, for clients that send one. Later values win. A name or
    value holding a control character (see :func:`refuse_controls`) is a
    ValidationError.
    """
    fields: dict[str, str] = {}
    query = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
    _merge_form(fields, decode_utf8(query, "the query string"), "the query string")
    body = read_body(request, limit)
    if body:
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        text = "" if ctype == b"multipart/form-data" else decode_utf8(body, "the request body")
        if ctype == b"application/json":
            data = decode_json_object(text, "the request body", limit)
            for key, value in data.items():
                if isinstance(value, bool) or value is None:
                    value = "" if value in (None, True) else "false"
                if not isinstance(value, (str, int, float)):
                    raise ValidationError("field %r must be text" % key)
                fields[str(key)] = str(value)
        elif ctype == b"multipart/form-data":
            fields.update(_multipart(request.getHeader(b"content-type") or b"", body))
        else:
            _merge_form(fields, text, "the request body")
    refuse_controls(fields)
    return fields


#: C0 controls but tab, line feed and carriage return (a biography may hold
#: lines), and DEL. PostgreSQL refuses NUL in text outright; none of them
#: belongs in a name, an address, an id or a token.
_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def refuse_controls(fields: dict[str, str]) -> None:
    """Raise ValidationError naming every field whose name or value holds a control character.

    Checked on decoded values (after percent- and JSON-decoding), so ``%00``
    and ``\\u0000`` are refused alike, at the edge, before any store sees them.
    """
    bad = [key for key, value in fields.items()
           if _CONTROLS.search(key) or _CONTROLS.search(value)]
    if bad:
        raise ValidationError(["field %s holds a control character (NUL or another "
                               "character below U+0020 but tab and line ends)"
                               % ascii(key)[1:-1][:64] for key in bad])


def _multipart(content_type: bytes, body: bytes) -> dict[str, str]:
    """The text fields of a multipart/form-data body (twisted.web's own
    parsing is off: it answers malformed bodies with an empty 400)."""
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type + b"\r\n\r\n" + body)
    if not message.is_multipart() or message.defects:
        raise ValidationError("the multipart/form-data body is malformed")
    fields: dict[str, str] = {}
    for part in message.iter_parts():  # type: ignore[attr-defined]
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise ValidationError("a multipart/form-data part has no name")
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            raise ValidationError("field %r is not a simple value" % str(name))
        fields[str(name)] = decode_utf8(payload, "field %r" % str(name))
    return fields


def _merge_form(fields: dict[str, str], text: str, what: str) -> None:
    if not text:
        return
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False,
                          errors="strict", max_num_fields=1000)
    except ValueError as e:
        raise ValidationError("%s is not a valid form: %s" % (what, e))
    except UnicodeDecodeError:
        raise ValidationError("%s is not valid UTF-8 after percent-decoding" % what)
    for key, value in pairs:
        fields[key] = value


def basic_credentials(request: IRequest) -> tuple[str, str] | None:
    """(user, password) from an ``Authorization: Basic`` header, or None."""
    header = request.getHeader(b"authorization")
    return parse_basic(header) if header else None


def parse_basic(header: bytes) -> tuple[str, str] | None:
    """(user, password) of an ``Authorization`` header value, if Basic and well formed."""
    scheme, _, encoded = header.partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison of two secrets."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def unauthorized(realm: str) -> HTTPError:
    return HTTPError(401, {"error": "authentication required"},
                     {b"www-authenticate": b'Basic realm="%s", charset="UTF-8"'
                      % realm.encode("ascii")})


def handle_errors(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Map the domain's errors to status + JSON body, for one Klein handler.

    ValidationError: 400 with ``{"error": ..., "messages": [...]}``;
    NotFound: 404; Unavailable: 503 with Retry-After; HTTPError: its own.
    Anything else is a bug: logged with its traceback, answered 500 in JSON.
    """

    @functools.wraps(handler)
    async def wrapper(self: Any, request: IRequest, *args: Any, **kw: Any) -> Any:
        try:
            return await handler(self, request, *args, **kw)
        except HTTPError as e:
            return reply(request, e.body, e.status, e.headers)
        except ValidationError as e:
            return reply(request, {"error": e.messages[0], "messages": e.messages}, 400)
        except NotFound as e:
            return reply(request, {"error": str(e) or "not found"}, 404)
        except Unavailable as e:
            return reply(request, {"error": str(e) or "temporarily unavailable"}, 503,
                         {b"retry-after": b"5"})
        except CancelledError:
            # The client hung up while the handler waited: expected, and
            # Klein drops it quietly once the request is gone.
            raise
        except Exception:
            log.failure("unhandled error in {path}", path=request.path)
            return reply(request, {"error": "internal error"}, 500)

    return wrapper


def json_routing_errors(app: Any) -> None:
    """Answer a Klein app's unknown paths (404) and methods (405) in JSON.

    Klein's defaults are HTML pages; every mailhub surface speaks JSON.
    """
    from werkzeug.exceptions import MethodNotAllowed, NotFound as RouteNotFound

    # Class-bound Klein apps pass the instance first: take the last two.
    @app.handle_errors(RouteNotFound)
    def not_found(*args: Any) -> bytes:
        request, failure = args[-2:]
        return reply(request, {"error": "no such resource: %s"
                               % request.path.decode("utf-8", "replace")}, 404)

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(*args: Any) -> bytes:
        request, failure = args[-2:]
        allowed = sorted(getattr(failure.value, "valid_methods", None) or [])
        headers = {b"allow": ", ".join(allowed).encode("ascii")} if allowed else {}
        return reply(request, {"error": "method %s not allowed here"
                               % request.method.decode("ascii", "replace")}, 405, headers)
