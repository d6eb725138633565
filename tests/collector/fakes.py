"""In-memory fakes for the collector's unit tests: a CardDAV server and a user source.

:class:`FakeCardDAV` is a twisted.web resource answering the part of RFC 6352
the collector uses (PROPFIND Depth 1, addressbook-query with text-match
``equals``, sync-collection, extended MKCOL, conditional PUT, GET), so the real
:class:`~mailhub.collector.carddav.CardDAVClient` can be driven through
``StubTreq`` with no socket.
"""

from __future__ import annotations

import hashlib
from typing import Any, Awaitable, Callable
from urllib.parse import unquote
from xml.etree import ElementTree as ET

from twisted.internet.defer import ensureDeferred, fail, succeed
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from mailhub.collector.vcard import parse_vcard
from mailhub.directory.interfaces import IUserSource
from mailhub.directory.model import User
from mailhub.errors import Unavailable

DAV = "{DAV:}"
CARD = "{urn:ietf:params:xml:ns:carddav}"


def _etag(text: str) -> str:
    return '"%s"' % hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


class FakeCardDAV(Resource):
    """A CardDAV server in a dict: ``books[path] = {name: text}``; ``homes`` a set."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.homes: set[str] = set()
        self.books: dict[str, dict[str, str]] = {}
        self.log: list[tuple[str, str]] = []
        self.fail_next: list[int] = []
        self.auth: list[bytes | None] = []
        #: Methods whose requests wait (unanswered) until :meth:`release`.
        self.hold: set[str] = set()
        self.held: list[tuple[Any, str, str, bytes]] = []
        #: Whether sync-collection (RFC 6578) is answered (a 403 otherwise, as
        #: Radicale answers it on a collection that is not a book).
        self.sync = True
        #: Sync tokens: token -> (book, {name: etag}) as the book was then.
        self.tokens: dict[str, tuple[str, dict[str, str]]] = {}
        #: At most this many changes per sync-collection answer (then a 507).
        self.sync_page: int | None = None
        #: The vCard versions each book's supported-address-data lists (as
        #: SabreDAV and Nextcloud: 3.0 and 4.0); None: the property is not
        #: answered (RFC 6352: then only 3.0 is accepted).
        self.vcard_versions: tuple[str, ...] | None = ("3.0", "4.0")

    # -- test helpers --
    def add_card(self, book: str, name: str, text: str) -> None:
        self.books.setdefault(book, {})[name] = text

    def cards(self, book: str) -> dict[str, str]:
        return self.books.get(book, {})

    def methods(self) -> list[str]:
        return [m for m, _ in self.log]

    def release(self) -> None:
        """Answer every held request, in order (then flush the StubTreq)."""
        held, self.held = self.held, []
        for request, method, path, body in held:
            answer = self._answer(request, method, path, body)
            request.write(answer)
            request.finish()

    # -- the server --
    def render(self, request: Any) -> bytes:
        method = request.method.decode()
        path = unquote(request.path.decode())
        self.log.append((method, path))
        self.auth.append(request.getHeader(b"authorization"))
        body = request.content.read() if request.content else b""
        if method in self.hold:
            self.held.append((request, method, path, body))
            return NOT_DONE_YET  # type: ignore[return-value]
        return self._answer(request, method, path, body)

    def _answer(self, request: Any, method: str, path: str, body: bytes) -> bytes:
        if self.fail_next:
            request.setResponseCode(self.fail_next.pop(0))
            return b"injected failure"
        handler = getattr(self, "do_" + method, None)
        if handler is None:
            request.setResponseCode(405)
            return b""
        return handler(request, path, body)

    def _multistatus(self, request: Any, responses: list[str]) -> bytes:
        request.setResponseCode(207)
        request.setHeader(b"content-type", b"application/xml; charset=utf-8")
        return ('<?xml version="1.0"?><d:multistatus xmlns:d="DAV:" '
                'xmlns:c="urn:ietf:params:xml:ns:carddav">%s</d:multistatus>'
                % "".join(responses)).encode("utf-8")

    def _book_response(self, book: str) -> str:
        supported = ""
        if self.vcard_versions is not None:
            supported = "<c:supported-address-data>%s</c:supported-address-data>" % "".join(
                '<c:address-data-type content-type="text/vcard" version="%s"/>' % v
                for v in self.vcard_versions)
        return ("<d:response><d:href>%s</d:href><d:propstat><d:prop><d:resourcetype>"
                "<d:collection/><c:addressbook/></d:resourcetype>%s</d:prop><d:status>"
                "HTTP/1.1 200 OK</d:status></d:propstat></d:response>" % (book, supported))

    def do_PROPFIND(self, request: Any, path: str, body: bytes) -> bytes:
        if path in self.books and request.getHeader(b"depth") == b"0":
            return self._multistatus(request, [self._book_response(path)])
        if path not in self.homes:
            request.setResponseCode(404)
            return b""
        items = ['<d:response><d:href>%s</d:href><d:propstat><d:prop><d:resourcetype>'
                 "<d:collection/></d:resourcetype></d:prop><d:status>HTTP/1.1 200 OK"
                 "</d:status></d:propstat></d:response>" % path]
        for book in sorted(self.books):
            if book.startswith(path) and book.count("/") == path.count("/") + 1:
                items.append(self._book_response(book))
        return self._multistatus(request, items)

    def forget_tokens(self) -> None:
        """Forget every sync token handed out (as a server that expired them)."""
        self.tokens.clear()

    def _card_response(self, path: str, name: str, text: str) -> str:
        return ("<d:response><d:href>%s%s</d:href><d:propstat><d:prop>"
                "<d:getetag>%s</d:getetag><c:address-data>%s</c:address-data></d:prop>"
                "<d:status>HTTP/1.1 200 OK</d:status></d:propstat></d:response>"
                % (path, name, _etag(text).replace('"', "&quot;"),
                   text.replace("&", "&amp;").replace("<", "&lt;")))

    def _sync(self, request: Any, path: str, root: ET.Element) -> bytes:
        if not self.sync:
            request.setResponseCode(403)
            return b'<d:error xmlns:d="DAV:"><d:supported-report/></d:error>'
        assert request.getHeader(b"depth") == b"0"
        old = (root.findtext(DAV + "sync-token") or "").strip()
        if old and (old not in self.tokens or self.tokens[old][0] != path):
            request.setResponseCode(403)
            return b'<d:error xmlns:d="DAV:"><d:valid-sync-token/></d:error>'
        before = self.tokens[old][1] if old else {}
        now = {name: _etag(text) for name, text in self.books[path].items()}
        changed = sorted(name for name in now if before.get(name) != now[name])
        removed = sorted(name for name in before if name not in now)
        more = self.sync_page is not None and len(changed) + len(removed) > self.sync_page
        if more:
            # Truncated (RFC 6578 3.6): the token is for the part sent.
            sent = (changed + removed)[:self.sync_page]
            changed = [n for n in sent if n in now]
            removed = [n for n in sent if n not in now]
            now = {**{n: e for n, e in before.items() if n not in removed},
                   **{n: now[n] for n in changed}}
        token = next((k for k, (book, state) in self.tokens.items()
                      if book == path and state == now), None)
        if token is None:
            token = "http://fake/sync/%d" % len(self.tokens)
            self.tokens[token] = (path, now)
        items = [self._card_response(path, name, self.books[path][name]) for name in changed]
        items += ["<d:response><d:href>%s%s</d:href><d:status>HTTP/1.1 404 Not Found"
                  "</d:status></d:response>" % (path, name) for name in removed]
        if more:
            items.append("<d:response><d:href>%s</d:href><d:status>HTTP/1.1 507 "
                         "Insufficient Storage</d:status></d:response>" % path)
        return self._multistatus(request, items + ["<d:sync-token>%s</d:sync-token>" % token])

    def do_REPORT(self, request: Any, path: str, body: bytes) -> bytes:
        if path not in self.books:
            request.setResponseCode(404)
            return b""
        root = ET.fromstring(body)
        if root.tag == DAV + "sync-collection":
            return self._sync(request, path, root)
        assert root.tag == CARD + "addressbook-query", root.tag
        wanted = {(m.text or "").casefold() for m in root.iter(CARD + "text-match")}
        for m in root.iter(CARD + "text-match"):
            assert m.get("match-type") == "equals"
            assert m.get("collation") == "i;unicode-casemap"
        # A bare prop-filter (no text-match): every card having the property.
        every = not wanted and root.find(".//" + CARD + "prop-filter") is not None
        items = [self._card_response(path, name, text)
                 for name, text in sorted(self.books[path].items())
                 if any(every or e.casefold() in wanted for e in parse_vcard(text).emails)]
        return self._multistatus(request, items)

    def do_MKCOL(self, request: Any, path: str, body: bytes) -> bytes:
        if path in self.books or path in self.homes:
            request.setResponseCode(405)
            return b""
        if body:
            root = ET.fromstring(body)
            assert root.find(".//" + CARD + "addressbook") is not None
            parent = path.rstrip("/").rsplit("/", 1)[0] + "/"
            if parent not in self.homes:
                request.setResponseCode(409)
                return b""
            self.books[path] = {}
        else:
            self.homes.add(path)
        request.setResponseCode(201)
        return b""

    def _split(self, path: str) -> tuple[str, str]:
        book, _, name = path.rpartition("/")
        return book + "/", name

    def do_PUT(self, request: Any, path: str, body: bytes) -> bytes:
        book, name = self._split(path)
        if book not in self.books:
            request.setResponseCode(409)
            return b""
        existing = self.books[book].get(name)
        if request.getHeader(b"if-none-match") == b"*" and existing is not None:
            request.setResponseCode(412)
            return b""
        match = request.getHeader(b"if-match")
        if match is not None and (existing is None or _etag(existing).encode() != match):
            request.setResponseCode(412)
            return b""
        self.books[book][name] = body.decode("utf-8")
        request.setResponseCode(204 if existing is not None else 201)
        request.setHeader(b"etag", _etag(body.decode("utf-8")).encode())
        return b""

    def do_DELETE(self, request: Any, path: str, body: bytes) -> bytes:
        book, name = self._split(path)
        existing = self.books.get(book, {}).get(name)
        if existing is None:
            request.setResponseCode(404)
            return b""
        match = request.getHeader(b"if-match")
        if match is not None and _etag(existing).encode() != match:
            request.setResponseCode(412)
            return b""
        del self.books[book][name]
        request.setResponseCode(204)
        return b""

    def do_GET(self, request: Any, path: str, body: bytes) -> bytes:
        book, name = self._split(path)
        text = self.books.get(book, {}).get(name)
        if text is None:
            request.setResponseCode(404)
            return b""
        request.setHeader(b"etag", _etag(text).encode())
        request.setHeader(b"content-type", b"text/vcard; charset=utf-8")
        return text.encode("utf-8")


class CountingTokens(FakeCardDAV):
    """Sync tokens as SabreDAV and Nextcloud make them: a counter per book.

    A book made anew (after :meth:`delete_book`) counts from 0 again, and a
    token above the book's current one is answered with no change at all,
    not with ``valid-sync-token``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.states: dict[str, list[dict[str, str]]] = {}

    def delete_book(self, book: str) -> None:
        del self.books[book]
        self.states.pop(book, None)

    def _sync(self, request: Any, path: str, root: ET.Element) -> bytes:
        states = self.states.setdefault(path, [{}])
        now = {name: _etag(text) for name, text in self.books[path].items()}
        if states[-1] != now:
            states.append(now)
        current = len(states) - 1
        old = (root.findtext(DAV + "sync-token") or "").strip()
        number = int(old.rsplit("/", 1)[-1]) if old else 0
        before = states[number] if number <= current else now
        items = [self._card_response(path, name, self.books[path][name])
                 for name in sorted(now) if before.get(name) != now[name]]
        items += ["<d:response><d:href>%s%s</d:href><d:status>HTTP/1.1 404 Not Found"
                  "</d:status></d:response>" % (path, name)
                  for name in sorted(before) if name not in now]
        token = "<d:sync-token>http://sabre.io/ns/sync/%d</d:sync-token>" % current
        return self._multistatus(request, items + [token])


@implementer(IUserSource)
class FakeUsers:
    """An IUserSource over a list of users; ``down`` makes every call Unavailable."""

    name = "fake"

    def __init__(self, users: list[User], passwords: dict[str, str] | None = None) -> None:
        self.users = users
        self.passwords = passwords or {}
        self.down = False
        self.finds: list[str] = []
        self.authentications = 0
        self.on_catch_up: Callable[[], Awaitable[None]] | None = None

    def find(self, login: str) -> Any:
        self.finds.append(login)
        if self.down:
            return fail(Unavailable("user source down"))
        for user in self.users:
            if user.login == login or user.id == login or user.owns(login):
                return succeed(user)
        return succeed(None)

    def catch_up(self) -> Any:
        """Run ``on_catch_up`` (a test's stand-in for a directory that follows its store)."""
        if self.on_catch_up is not None:
            return ensureDeferred(self.on_catch_up())
        return succeed(None)

    def authenticate(self, login: str, password: str) -> Any:
        self.authentications += 1
        if self.down:
            return fail(Unavailable("user source down"))
        for user in self.users:
            if (user.login == login or user.owns(login)) and password and \
                    self.passwords.get(user.login) == password:
                return succeed(user)
        return succeed(None)

    async def pages(self, page_size: int) -> Any:
        yield list(self.users)
