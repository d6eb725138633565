"""``/openapi.json``: a valid OpenAPI 3.1 document that says what the endpoints really do.

Three promises are checked: the document is valid OpenAPI 3.1 (with
openapi-spec-validator, plus a hand check of references, security schemes
and operation ids); every path the Root of ``twistd mailhub`` serves is
described (the Root comes from :func:`mailhub.tap.build`, so new mounts
without a description fail here); and for the push, event stream, MailStore,
calendar and operations endpoints every documented status is one the real
Klein resources give (driven through StubTreq with in-memory fakes), with
the documented media type, headers and JSON schema. The hooks are held to
their part of the document by tests/web/test_hooks_fuzz.py.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from typing import Any, AsyncIterator, Callable, Iterator

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailhub.auth import Auth, SiteToken
from mailhub.checks import Check, Status, fixed
from mailhub.config import CollectorSection, Config, MailhubSection, MailStoreSection, PushSection
from mailhub.directory.interfaces import IUserSource
from mailhub.directory.model import User
from mailhub.errors import Unavailable
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.tap import build
from mailhub.web.calendar import CalendarCollect
from mailhub.web.mailstore import MailStoreIntegration
from mailhub.web.openapi import site_document, surface_paths
from mailhub.web.ops import Operations
from mailhub.web.events import EventStream
from mailhub.web.push import PushReceiver
from mailhub.web.site import Root
from tests.push.fakes import FakeUserSource

HOST = "http://mailhub.test"
MAILSTORE_PATH = "/integration/mailstore"
PUSH = ("dovecot", "push-s3cret")
MAILSTORE = ("mailstore", "ms-s3cret")
TOKEN = "0123456789abcdefghijABCDEFGHIJkl"
ALICE = User(login="alice@example.org", name="Alice", emails=("alice@example.org",),
             id="aliceid")
ALICE_PASSWORD = "wonderland"
MAX_BODY = 4096

OX_BODY = {"user": "alice@example.org", "event": "messageNew", "folder": "INBOX",
           "imap-uidvalidity": 1700000000, "imap-uid": 7, "from": "Zoë <zoe@example.org>",
           "subject": "=?utf-8?q?Caf=C3=A9?=", "snippet": "Hello", "unseen": 1}
LUA_BODY = {"user": "alice@example.org", "events": [
    {"name": "MessageAppend", "mailbox": "Sent", "uid": 3.0, "uid_validity": 9.0,
     "to": "Bob <bob@example.org>", "flags": ["\\Seen"], "keywords": {}},
    {"name": "MailboxCreate", "mailbox": "Archive"}]}

ICS = """BEGIN:VCALENDAR\r
VERSION:2.0\r
PRODID:-//mailhub tests//EN\r
BEGIN:VEVENT\r
UID:lunch@example.org\r
DTSTAMP:20240101T100000Z\r
DTSTART:20240102T120000Z\r
SUMMARY:Lunch\r
ORGANIZER;CN=Alice:mailto:alice@example.org\r
ATTENDEE;CN=Zoë:mailto:zoe@example.org\r
ATTENDEE;CUTYPE=RESOURCE;CN=Room 1:mailto:room1@example.org\r
END:VEVENT\r
END:VCALENDAR\r
"""
ICS_ALONE = ICS.replace("ORGANIZER;CN=Alice:mailto:alice@example.org\r\n", "").replace(
    "ATTENDEE;CN=Zoë:mailto:zoe@example.org\r\n", "").replace(
    "ATTENDEE;CUTYPE=RESOURCE;CN=Room 1:mailto:room1@example.org\r\n", "")

#: The methods a path item may hold, as OpenAPI names them.
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _validator() -> Any:
    try:
        import openapi_spec_validator
    except ImportError:
        pytest.skip("openapi-spec-validator is not installed (pip install openapi-spec-validator)")
    return openapi_spec_validator


def _schema_validator(document: dict[str, Any], schema: dict[str, Any]) -> Any:
    """A JSON Schema 2020-12 validator for ``schema`` whose refs resolve in ``document``."""
    try:
        import jsonschema
    except ImportError:
        pytest.skip("jsonschema is not installed (it comes with openapi-spec-validator)")
    root = dict(schema, components=document["components"])
    return jsonschema.Draft202012Validator(root)


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def _root_of(service: Any) -> Root:
    """The Root resource of the web service somewhere in ``service``'s tree."""
    for child in service:
        if getattr(child, "name", None) == "web":
            return child.factory.resource  # type: ignore[no-any-return]
        if hasattr(child, "__iter__"):
            try:
                return _root_of(child)
            except LookupError:
                pass
    raise LookupError("no web service")


# -- fakes ------------------------------------------------------------------------


@implementer(IUserSource)
class UnreachableUsers:
    """A user source whose server is down: every question is Unavailable."""

    name = "down"

    def find(self, login: str) -> "Deferred[User | None]":
        return fail(Unavailable("LDAP is unavailable: connection refused"))

    def authenticate(self, login: str, password: str) -> "Deferred[User | None]":
        return fail(Unavailable("LDAP is unavailable: connection refused"))

    def catch_up(self) -> "Deferred[None]":
        return fail(Unavailable("LDAP is unavailable: connection refused"))

    async def _pages(self, page_size: int) -> AsyncIterator[list[User]]:
        raise Unavailable("LDAP is unavailable: connection refused")
        yield []  # pragma: no cover (makes this an async generator)

    def pages(self, page_size: int) -> Any:
        return self._pages(page_size)


class Dispatcher:
    """The collector's dispatcher: keeps what is submitted, or is full."""

    def __init__(self, full: bool = False) -> None:
        self.full = full
        self.submitted: list[bytes] = []

    def publish(self, body: bytes) -> "Deferred[None]":
        if self.full:
            raise Unavailable("collector is holding 1000 messages already")
        self.submitted.append(body)
        return succeed(None)


class Surfaces:
    """Every surface but the hooks, with in-memory fakes, mounted as tap.build mounts them."""

    def __init__(self, push_queue: int = 1000, users: Any = None,
                 dispatcher: Dispatcher | None = None,
                 checks: list[Check] | None = None) -> None:
        self.clock, self.hub, metrics = Clock(), Hub(), Metrics()
        config = Config(
            push=PushSection(username=PUSH[0], password=PUSH[1], queue=push_queue,
                             max_body=MAX_BODY),
            mailstore=MailStoreSection(path=MAILSTORE_PATH, username=MAILSTORE[0],
                                       password=MAILSTORE[1]))
        if users is None:
            users = FakeUserSource()
            users.add(ALICE, ALICE_PASSWORD)
        self.receiver = PushReceiver(config, self.hub, metrics, self.clock)
        self.events = EventStream(config, self.hub, metrics, users, self.clock)
        mailstore = MailStoreIntegration(config, users, self.hub, metrics, self.clock)
        calendar = CalendarCollect(dispatcher or Dispatcher(), SiteToken(
            Auth(self.clock, metrics), "calendar", lambda token: succeed(token == TOKEN)),
            MAX_BODY)
        ops = Operations(metrics, checks or [fixed("database", Status.OK, "sqlite")],
                         lambda: site_document(MAILSTORE_PATH), self.clock)
        root = Root(metrics)
        root.mount(b"preliminary", self.receiver.resource())
        root.mount(b"push", self.receiver.resource())
        root.mount(b"api", self.events.resource())
        root.mount_at(MAILSTORE_PATH, mailstore.resource())
        root.mount(b"collector", calendar.resource())
        for name in (b"healthz", b"metrics", b"openapi.json"):
            root.mount(name, ops.resource())
        self.stub: Any = StubTreq(root)  # its verbs are made at run time

    def close(self) -> None:
        self.events.close()
        self.stub.flush()


class Body(Protocol):
    """A streamed body, as far as it has come."""

    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        self.data += data


# -- the document itself ---------------------------------------------------------


class DocumentTests(SynchronousTestCase):
    """The document is valid OpenAPI 3.1 and covers every path the site serves."""

    def test_the_site_document_is_valid_openapi_3_1(self) -> None:
        validator = _validator()
        for document in (site_document(), site_document("/apps/mailstore/", calendar=False)):
            self.assertEqual(document["openapi"], "3.1.0")
            validator.validate(document)  # raises with the first error it finds
            json.dumps(document)  # served as JSON

    def test_references_security_schemes_and_operation_ids_are_consistent(self) -> None:
        document = site_document()
        schemas = document["components"]["schemas"]
        schemes = document["components"]["securitySchemes"]
        for node in _walk(document):
            if isinstance(node, dict) and "$ref" in node:
                prefix, _, name = node["$ref"].rpartition("/")
                self.assertEqual(prefix, "#/components/schemas")
                self.assertIn(name, schemas)
        ids = []
        for path, method, operation in _operations(document):
            ids.append(operation["operationId"])
            self.assertIn("security", operation, (path, method))
            for requirement in operation["security"]:
                self.assertTrue(set(requirement) <= set(schemes), (path, method, requirement))
            self.assertTrue(operation["responses"], (path, method))
            for status, response in operation["responses"].items():
                self.assertTrue(response["description"], (path, method, status))
        self.assertEqual(len(ids), len(set(ids)))

    def test_each_surface_names_its_security_scheme(self) -> None:
        document = site_document()

        def security(path: str, method: str) -> list[dict[str, list[str]]]:
            return document["paths"][path][method]["security"]  # type: ignore[no-any-return]

        for method in ("put", "post"):
            self.assertEqual(security("/preliminary/http-notify/v1/notify", method),
                             [{"pushBasic": []}])
            self.assertEqual(security("/push/v1/notify", method), [{"pushBasic": []}])
        self.assertEqual(security("/api/v1/events", "get"), [{"siteUserBasic": []}])
        self.assertEqual(security("/mailstore", "post"), [{"mailstoreBasic": []}])
        self.assertEqual(security("/collector/v1/calendar", "post"),
                         [{"siteTokenBearer": []}, {"siteToken": []}])
        self.assertIn({"siteToken": []}, security("/gs-search-people.json", "post"))
        self.assertEqual(security("/healthz", "get"), [])
        schemes = document["components"]["securitySchemes"]
        self.assertEqual({schemes[n]["scheme"] for n in
                          ("pushBasic", "mailstoreBasic", "siteUserBasic")}, {"basic"})
        self.assertEqual((schemes["siteToken"]["in"], schemes["siteToken"]["name"]),
                         ("query", "token"))

    def test_the_mailstore_path_follows_the_configuration(self) -> None:
        for configured, documented in (("/mailstore", "/mailstore"),
                                       ("/apps/mailstore/", "/apps/mailstore"),
                                       ("/x", "/x")):
            paths = surface_paths(configured)
            self.assertIn(documented, paths)
            self.assertEqual(paths[documented]["post"]["operationId"], "mailstore_post")
            others = {p for p in paths if paths[p].get("post", {}).get("operationId")
                      == "mailstore_post"}
            self.assertEqual(others, {documented})

    def test_the_calendar_path_is_described_only_with_the_collector(self) -> None:
        self.assertIn("/collector/v1/calendar", site_document()["paths"])
        self.assertNotIn("/collector/v1/calendar", site_document(calendar=False)["paths"])

    def built_root(self, **sections: Any) -> tuple[Config, Root]:
        data = tempfile.mkdtemp(prefix="mailhub-openapi-")
        self.addCleanup(shutil.rmtree, data, True)
        config = Config(mailhub=MailhubSection(data=data), **sections)
        top = build(config, "tcp:0:interface=127.0.0.1", MemoryReactorClock())
        return config, _root_of(top)

    def test_every_path_the_root_of_twistd_mailhub_serves_is_described(self) -> None:
        for sections in ({}, {"mailstore": MailStoreSection(path="/apps/mailstore"),
                              "collector": CollectorSection(enabled=False)}):
            config, root = self.built_root(**sections)
            document = site_document(config.mailstore.path, config.collector.enabled)
            documented = set(document["paths"])
            first_segments = {p.strip("/").split("/")[0].encode() for p in documented}
            for segment in root.routes:
                if segment in (b"dav", b".well-known"):
                    # the embedded CardDAV server and its RFC 6764 redirect:
                    # WebDAV, not describable
                    continue
                self.assertIn(segment, first_segments, (sections, segment))
            for segment, (rest, _) in root.mounted.items():
                path = "/" + b"/".join([segment, *rest]).decode()
                self.assertIn(path, documented, sections)
            # and nothing is described that the Root does not serve
            served = set(root.routes) | set(root.mounted)
            self.assertEqual(first_segments - served, set(), sections)

    def test_openapi_json_serves_the_whole_site_at_the_configured_mailstore_path(self) -> None:
        """Needs tap.py to hand Operations ``site_document`` with the configuration."""
        config, root = self.built_root(mailstore=MailStoreSection(path="/apps/mailstore"))
        stub: Any = StubTreq(root)
        response = self.successResultOf(stub.get(HOST + "/openapi.json"))
        self.assertEqual(response.code, 200)
        served = json.loads(self.successResultOf(response.content()))
        self.assertEqual(served, json.loads(json.dumps(site_document("/apps/mailstore"))))


# -- what the endpoints really answer ------------------------------------------

Request = Callable[["StatusTests"], tuple[Any, bytes | None]]


def _push_requests(path: str, method: str, body: Any) -> dict[int, list[Request]]:
    data = json.dumps(body).encode("utf-8")
    json_type = {"Content-Type": "application/json; charset=utf-8"}

    def call(surfaces: Surfaces, payload: bytes, auth: Any = PUSH,
             headers: dict[str, str] | None = None) -> Deferred[Any]:
        return surfaces.stub.request(method, HOST + path, data=payload,
                                     headers=headers or json_type, auth=auth)

    def ok(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(call(t.surfaces(), data))

    def form(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(call(t.surfaces(), b"user=alice%40example.org&from=zoe%40example.org",
                             headers={"Content-Type": "application/x-www-form-urlencoded"}))

    def bad(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(call(t.surfaces(), b'{"user": "alice", "event": '))

    def wrong_shape(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(call(t.surfaces(), b'{"user": "alice", "imap-uid": "x"}'))

    def no_auth(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(call(t.surfaces(), data, auth=None))

    def wrong_auth(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(call(t.surfaces(), data, auth=(PUSH[0], "wrong")))

    def large(t: "StatusTests") -> tuple[Any, bytes | None]:
        padded = dict(body, snippet="x" * (MAX_BODY + 1))
        return t.answer(call(t.surfaces(), json.dumps(padded).encode()))

    def full(t: "StatusTests") -> tuple[Any, bytes | None]:
        surfaces = t.surfaces(push_queue=1)
        t.answer(call(surfaces, data))  # queued, not yet published: the queue is full
        return t.answer(call(surfaces, data))

    lua = path == "/push/v1/notify"
    return {200: [ok, form] if lua else [ok], 400: [bad, wrong_shape],
            401: [no_auth, wrong_auth], 413: [large], 503: [full]}


def _event_requests() -> dict[int, list[Request]]:
    def ok(t: "StatusTests") -> tuple[Any, bytes | None]:
        surfaces = t.surfaces()
        response = t.answer(surfaces.stub.get(HOST + "/api/v1/events",
                                              auth=(ALICE.login, ALICE_PASSWORD)),
                            read=False)[0]
        body = Body()
        response.deliverBody(body)
        surfaces.hub.global_.topic("mail:new").publish(  # type: ignore[attr-defined]
            dict(OX_BODY, event="message_new", driver="ox"))
        surfaces.stub.flush()
        t.assertTrue(body.data.startswith(b"retry: 5000\n: connected\n\n"), body.data)
        t.assertIn(b"event: mail:new\n", body.data)
        surfaces.close()
        return response, None

    def no_auth(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(t.surfaces().stub.get(HOST + "/api/v1/events"))

    def wrong_auth(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(t.surfaces().stub.get(HOST + "/api/v1/events",
                                              auth=(ALICE.login, "wrong")))

    def source_down(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(t.surfaces(users=UnreachableUsers()).stub.get(
            HOST + "/api/v1/events", auth=(ALICE.login, ALICE_PASSWORD)))

    return {200: [ok], 401: [no_auth, wrong_auth], 503: [source_down]}


def _mailstore_requests() -> dict[int, list[Request]]:
    form_type = {"Content-Type": "application/x-www-form-urlencoded"}

    def post(surfaces: Surfaces, form: bytes, auth: Any = MAILSTORE) -> Deferred[Any]:
        return surfaces.stub.post(HOST + MAILSTORE_PATH, data=form, headers=form_type,
                                  auth=auth)

    def listed(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(post(t.surfaces(), b"cmd=list"))

    def auth(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(post(t.surfaces(), b"cmd=auth&user=alice%40example.org&pass="
                             + ALICE_PASSWORD.encode()))

    def refused(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(post(t.surfaces(), b"cmd=auth&user=alice%40example.org&pass=nope"))

    def unknown_cmd(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(post(t.surfaces(), b"cmd=delete"))

    def no_cmd(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(post(t.surfaces(), b"user=alice"))

    def no_auth(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(post(t.surfaces(), b"cmd=list", auth=None))

    def large(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(post(t.surfaces(), b"cmd=auth&user=a&pass=" + b"x" * 70000))

    def source_down(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(post(t.surfaces(users=UnreachableUsers()),
                             b"cmd=auth&user=alice%40example.org&pass=x"))

    def list_down(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(post(t.surfaces(users=UnreachableUsers()), b"cmd=list"))

    return {200: [listed, auth, refused], 400: [unknown_cmd, no_cmd], 401: [no_auth],
            413: [large], 503: [source_down, list_down]}


def _calendar_requests() -> dict[int, list[Request]]:
    calendar_type = {"Content-Type": "text/calendar; charset=utf-8"}

    def post(surfaces: Surfaces, query: str, body: str,
             headers: dict[str, str] | None = None) -> Deferred[Any]:
        return surfaces.stub.post(HOST + "/collector/v1/calendar" + query,
                                  data=body.encode("utf-8"),
                                  headers={**calendar_type, **(headers or {})})

    bearer = {"Authorization": "Bearer " + TOKEN}

    def nothing(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(post(t.surfaces(), "?user=alice%40example.org", ICS_ALONE, bearer))

    def collected(t: "StatusTests") -> tuple[Any, bytes | None]:
        dispatcher = Dispatcher()
        answer = t.answer(post(t.surfaces(dispatcher=dispatcher),
                               "?user=alice%40example.org&token=" + TOKEN, ICS))
        t.assertEqual(len(dispatcher.submitted), 1)
        return answer

    def no_user(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(post(t.surfaces(), "", ICS, bearer))

    def not_ical(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(post(t.surfaces(), "?user=alice", "hello", bearer))

    def no_token(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(post(t.surfaces(), "?user=alice", ICS))

    def wrong_token(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(post(t.surfaces(), "?user=alice", ICS,
                             {"Authorization": "Bearer nope"}))

    def large(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(post(t.surfaces(), "?user=alice", ICS + "x" * MAX_BODY, bearer))

    def full(t: "StatusTests") -> tuple[Any, bytes | None]:
        return t.answer(post(t.surfaces(dispatcher=Dispatcher(full=True)), "?user=alice",
                             ICS, bearer))

    return {200: [nothing], 202: [collected], 400: [no_user, not_ical],
            403: [no_token, wrong_token], 413: [large], 503: [full]}


def _operations_requests() -> dict[tuple[str, str, int], list[Request]]:
    def get(path: str, **kw: Any) -> Request:
        def request(t: "StatusTests") -> tuple[Any, bytes | None]:
            return t.answer(t.surfaces(**kw).stub.get(HOST + path))
        return request

    down = [fixed("database", Status.OK, "sqlite"),
            fixed("ldap", Status.FAIL, "no server answered")]
    return {
        ("/healthz", "get", 200): [get("/healthz"), get("/healthz", checks=down)],
        ("/healthz", "get", 503): [get("/healthz?ready", checks=down)],
        ("/metrics", "get", 200): [get("/metrics")],
        ("/openapi.json", "get", 200): [get("/openapi.json")],
    }


def scenarios() -> dict[tuple[str, str, int], list[Request]]:
    """(path, method, status) -> requests that make the endpoint answer that status."""
    table: dict[tuple[str, str, int], list[Request]] = {}
    for path, body in (("/preliminary/http-notify/v1/notify", OX_BODY),
                       ("/push/v1/notify", LUA_BODY)):
        for method in ("put", "post"):
            for status, requests in _push_requests(path, method.upper(), body).items():
                table[(path, method, status)] = requests
    for status, requests in _event_requests().items():
        table[("/api/v1/events", "get", status)] = requests
    for status, requests in _mailstore_requests().items():
        table[(MAILSTORE_PATH, "post", status)] = requests
    for status, requests in _calendar_requests().items():
        table[("/collector/v1/calendar", "post", status)] = requests
    table.update(_operations_requests())
    return table


class StatusTests(SynchronousTestCase):
    """Every status documented for these endpoints is one they really answer, as described."""

    def setUp(self) -> None:
        self.document = site_document(MAILSTORE_PATH)
        self.opened: list[Surfaces] = []

    def tearDown(self) -> None:
        for surfaces in self.opened:
            surfaces.close()

    def surfaces(self, **kw: Any) -> Surfaces:
        surfaces = Surfaces(**kw)
        self.opened.append(surfaces)
        return surfaces

    def answer(self, d: "Deferred[Any]", read: bool = True) -> tuple[Any, bytes | None]:
        for surfaces in self.opened:
            surfaces.stub.flush()
        response = self.successResultOf(d)
        if not read:
            return response, None
        content = response.content()
        for surfaces in self.opened:
            surfaces.stub.flush()
        return response, self.successResultOf(content)

    def test_fakes_provide_the_user_source_interface(self) -> None:
        self.assertTrue(verifyObject(IUserSource, UnreachableUsers()))
        self.assertTrue(verifyObject(IUserSource, FakeUserSource()))

    def test_every_documented_status_has_a_scenario_and_no_other_status_is_given(self) -> None:
        described = set()
        for path, method, operation in _operations(self.document):
            if path.startswith("/gs-"):
                continue  # the hooks: tests/web/test_hooks_fuzz.py
            for status in operation["responses"]:
                described.add((path, method, int(status)))
        self.assertEqual(set(scenarios()), described)

    def test_each_endpoint_answers_every_documented_status_as_described(self) -> None:
        for (path, method, status), requests in sorted(scenarios().items()):
            documented = self.document["paths"][path][method]["responses"][str(status)]
            for request in requests:
                where = (path, method, status, request.__name__)
                response, body = request(self)
                self.assertEqual(response.code, status, (where, body))
                self.check_media(documented, response, body, where)
                for name, header in documented.get("headers", {}).items():
                    if header.get("required"):
                        self.assertTrue(response.headers.getRawHeaders(name), (where, name))

    def check_media(self, documented: dict[str, Any], response: Any, body: bytes | None,
                    where: Any) -> None:
        [ctype] = response.headers.getRawHeaders("content-type")
        media = ctype.split(";")[0].strip()
        self.assertIn(media, documented["content"], where)
        if media not in ("application/json", "text/json"):
            return
        assert body is not None
        schema = documented["content"][media]["schema"]
        validator = _schema_validator(self.document, schema)
        errors = [e.message for e in validator.iter_errors(json.loads(body))]
        self.assertEqual(errors, [], (where, body))

    def test_schemas_refuse_what_the_endpoints_never_send(self) -> None:
        """The response schemas are not vacuous: wrong shapes fail them."""
        responses = self.document["paths"][MAILSTORE_PATH]["post"]["responses"]
        # MailStore's answers are text/json, as its own examples (issue 12).
        schema = responses["200"]["content"]["text/json"]["schema"]
        validator = _schema_validator(self.document, schema)
        self.assertFalse(validator.is_valid({"succeeded": "yes"}))
        self.assertFalse(validator.is_valid([{"fullName": "no userName"}]))
        self.assertTrue(validator.is_valid([{"userName": "alice"}]))
        ox = self.document["paths"]["/preliminary/http-notify/v1/notify"]["put"]
        request_schema = ox["requestBody"]["content"]["application/json"]["schema"]
        validator = _schema_validator(self.document, request_schema)
        self.assertTrue(validator.is_valid(OX_BODY))
        self.assertFalse(validator.is_valid({"user": "alice"}))
        lua = self.document["paths"]["/push/v1/notify"]["post"]
        validator = _schema_validator(
            self.document, lua["requestBody"]["content"]["application/json"]["schema"])
        self.assertTrue(validator.is_valid(LUA_BODY))


class HookFormTests(SynchronousTestCase):
    """The hooks' part of the document, checked without a server: the two faults
    schemathesis found first (tests/web/test_openapi_conformance.py runs it)."""

    def setUp(self) -> None:
        self.document = site_document()

    def _valid(self, schema: dict[str, Any], value: Any) -> bool:
        return bool(_schema_validator(self.document, schema).is_valid(value))

    def _form(self, path: str, media: str = "application/x-www-form-urlencoded") -> Any:
        return self.document["paths"][path]["post"]["requestBody"]["content"][media]["schema"]

    def test_an_empty_member_list_matches_the_answer_of_either_action(self) -> None:
        for path in ("/gs-site-member-list.json", "/gs-site-member.json"):
            for method in ("get", "post"):
                answer = self.document["paths"][path][method]["responses"]["200"]
                schema = answer["content"]["application/json"]["schema"]
                self.assertTrue(self._valid(schema, []), (path, method))
                self.assertTrue(self._valid(schema, ["aliceid"]))
                self.assertFalse(self._valid(schema, [1]))

    def test_an_action_requires_the_fields_the_hook_requires(self) -> None:
        add = self._form("/gs-group-member-add.json")
        self.assertTrue(self._valid(add, {}), "no action: the self-description")
        self.assertFalse(self._valid(add, {"add": ""}))
        self.assertFalse(self._valid(add, {"add": "", "groupId": "team",
                                           "email": "a@example.org", "fn": "  "}))
        self.assertTrue(self._valid(add, {"add": "", "groupId": "team",
                                          "email": "a@example.org", "fn": "Ann"}))
        self.assertFalse(self._valid(add, {"add": "", "groupId": "team",
                                           "email": "a@example.org", "fn": "Ann",
                                           "tz": "Mars/Olympus"}))
        leave = self._form("/gs-group-member-leave.json", "application/json")
        self.assertFalse(self._valid(leave, {"leave": None, "groupId": "team"}))
        self.assertTrue(self._valid(leave, {"leave": None, "groupId": "team", "userId": 7}))
        search = self._form("/gs-search-people.json")
        self.assertFalse(self._valid(search, {"search": "", "user": "a\x00b"}))

    def test_a_get_form_is_one_exploded_query_object(self) -> None:
        (form,) = self.document["paths"]["/gs-search-people.json"]["get"]["parameters"]
        self.assertEqual((form["in"], form["style"], form["explode"]), ("query", "form", True))
        self.assertFalse(self._valid(form["schema"], {"search": ""}))
        self.assertTrue(self._valid(form["schema"], {"search": "", "user": "a@b.example"}))
