"""A small RFC 6352 CardDAV client: exactly what the collector needs, over treq.

The HTTP client is given to :class:`CardDAVClient` (a pooled
``treq.HTTPClient`` in production, ``StubTreq`` in tests, the in-process
client of :mod:`mailhub.collector.embedded` for the embedded store). Every
response body is read, so connections go back to the pool.

Operations: list a user's address books (PROPFIND Depth 1 on the home),
find cards by exact email (addressbook-query REPORT, ``equals`` with
``i;unicode-casemap``), read what changed in a book since a sync token
(sync-collection REPORT, RFC 6578), create the ``collected`` book (extended
MKCOL, RFC 5689), create a card only if absent (PUT ``If-None-Match: *``),
and GET / PUT ``If-Match`` to fill in a missing name.

Errors: connection failures, timeouts ([carddav] timeout), 5xx, 429 and
401/403 (a credential problem an operator fixes; retrying loses nothing)
raise :class:`mailhub.errors.Unavailable`; any other unexpected status raises
:class:`CardDAVError`. At most [carddav] concurrency requests are in flight.
"""

from __future__ import annotations

import base64
import time
from collections import deque
from typing import Any, Iterable
from urllib.parse import quote, unquote, urljoin, urlsplit
from xml.etree import ElementTree as ET

import attrs
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import client as web_client
from twisted.web.http_headers import Headers

from mailhub.directory.model import User
from mailhub.errors import MailhubError, Unavailable
from mailhub.metrics import Metrics

DAV = "DAV:"
CARD = "urn:ietf:params:xml:ns:carddav"
XML_TYPE = b"application/xml; charset=utf-8"
VCARD_TYPE = b"text/vcard; charset=utf-8"
#: Addresses per addressbook-query: keeps request bodies and server work bounded.
QUERY_BATCH = 50

_TRANSIENT = (
    error.ConnectError, error.ConnectionLost, error.ConnectionClosed, error.TimeoutError,
    defer.TimeoutError, defer.CancelledError, web_client.ResponseFailed,
    web_client.ResponseNeverReceived, web_client.RequestTransmissionFailed, OSError,
)


def _closed_connection(e: Any) -> bool:
    """Whether a request failed only because its connection was closed under it."""
    reasons = getattr(e, "reasons", None) or []
    return bool(reasons) and all(
        r.check(error.ConnectionDone, error.ConnectionLost) for r in reasons)


class Lanes:
    """A concurrency limit with two queues: reads that gate whole batches go first.

    A lookup (PROPFIND, REPORT) holds back every message of its batch, while a
    PUT holds back only its own: when both wait for a slot, the lookup gets it,
    so the next batch is known while the current one's PUTs still keep the
    server busy. Within each lane, first come first served.
    """

    def __init__(self, size: int) -> None:
        self.size = self.free = max(1, size)
        self._waiting: tuple[deque[Deferred[None]], deque[Deferred[None]]] = (deque(), deque())
        self._short: list[Deferred[None]] = []

    def when_short(self) -> Deferred[None]:
        """Fires when fewer requests wait than one round of slots (at once if so now)."""
        if len(self._waiting[1]) < self.size:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._short.append(d)
        return d

    def acquire(self, urgent: bool) -> Deferred[None]:
        """A Deferred that fires when a slot is this caller's."""
        if self.free > 0:
            self.free -= 1
            return defer.succeed(None)
        d: Deferred[None] = Deferred(canceller=self._cancelled)
        self._waiting[0 if urgent else 1].append(d)
        return d

    def _cancelled(self, d: Deferred[None]) -> None:
        for lane in self._waiting:
            if d in lane:
                lane.remove(d)

    def release(self) -> None:
        """Give the slot to the first urgent waiter, else the first other one."""
        for lane in self._waiting:
            if lane:
                lane.popleft().callback(None)
                break
        else:
            self.free += 1
        if self._short and len(self._waiting[1]) < self.size:
            short, self._short = self._short, []
            for d in short:
                d.callback(None)

    def run(self, urgent: bool, f: Any, *args: Any) -> Deferred[Any]:
        """Call ``f(*args)`` (returning a Deferred) holding a slot."""
        def call(_: None) -> Any:
            return defer.maybeDeferred(f, *args).addBoth(done)

        def done(result: Any) -> Any:
            self.release()
            return result

        return self.acquire(urgent).addCallback(call)


class CardDAVError(MailhubError):
    """The CardDAV server answered something this client cannot use."""


class SyncRefused(CardDAVError):
    """The server does not answer sync-collection (RFC 6578) for this book."""


class TokenExpired(CardDAVError):
    """The server no longer knows the sync token (``DAV:valid-sync-token``)."""


class BookMissing(CardDAVError):
    """A PUT found no address book to write into (404 or 409): it was deleted."""


def _q(tag: str, ns: str = DAV) -> str:
    return "{%s}%s" % (ns, tag)


def _xml_text(value: str) -> str:
    return (value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def same_collection(a: str, b: str) -> bool:
    """Two collection URLs or paths name the same collection (slash, quoting)."""
    def norm(u: str) -> str:
        return unquote(urlsplit(u).path).rstrip("/")
    return norm(a) == norm(b)


@attrs.frozen
class BookLayout:
    """Where a user's collected book lives, from the [carddav] templates.

    ``template`` is an absolute URL with ``{user}`` (the user's login, URL
    quoted) and optionally ``{id}`` (the user's id); the home (where the
    user's books are listed) is its parent collection. Examples:
    ``https://dav.example.org/radicale/{user}/collected/`` (Radicale),
    ``https://cloud.example.org/remote.php/dav/addressbooks/users/{user}/collected/``
    (Nextcloud), ``https://dav.example.org/addressbooks/{user}/collected/``
    (SabreDAV).
    """

    template: str

    @classmethod
    def from_config(cls, url: str, addressbook: str) -> "BookLayout":
        """[carddav] addressbook, or ``{url}/{user}/collected/`` when empty."""
        if addressbook:
            template = addressbook
        else:
            template = url.rstrip("/") + "/{user}/collected/"
        if "{user}" not in template and "{id}" not in template:
            raise ValueError("the addressbook template needs {user} or {id}")
        if not template.endswith("/"):
            template += "/"
        return cls(template)

    def book(self, user: User) -> str:
        """The URL of the user's collected book (ends with a slash)."""
        return self.template.replace("{user}", quote(user.login, safe="@+")).replace(
            "{id}", quote(user.id or user.login, safe="@+"))

    def home(self, user: User) -> str:
        """The URL of the user's address-book home: the book's parent."""
        return urljoin(self.book(user), "..")

    @property
    def book_name(self) -> str:
        """The last path segment of the template (``collected``)."""
        return self.template.rstrip("/").rsplit("/", 1)[-1]


@attrs.frozen
class Book:
    """An address book: its absolute URL, and the ``text/vcard`` versions its
    ``supported-address-data`` lists (empty: the server does not say)."""

    url: str
    versions: tuple[str, ...] = ()


_BOOK_PROPS = ('<?xml version="1.0" encoding="utf-8"?>'
               '<d:propfind xmlns:d="DAV:" xmlns:c="%s"><d:prop><d:resourcetype/>'
               "<c:supported-address-data/></d:prop></d:propfind>" % CARD).encode("utf-8")


def _books(body: bytes, base: str) -> list[Book]:
    """The address books of a PROPFIND answer asking for :data:`_BOOK_PROPS`."""
    books = []
    for href, prop in _responses(body, base):
        kind = prop.find(_q("resourcetype"))
        if kind is None or kind.find(_q("addressbook", CARD)) is None:
            continue
        versions: list[str] = []
        supported = prop.find(_q("supported-address-data", CARD))
        if supported is not None:
            for data_type in supported.iter(_q("address-data-type", CARD)):
                media = (data_type.get("content-type") or "text/vcard").strip().lower()
                if media == "text/vcard":
                    versions.append((data_type.get("version") or "3.0").strip())
        books.append(Book(href, tuple(versions)))
    return books


@attrs.frozen
class Card:
    """A card as the server holds it: absolute URL, ETag (may be empty), text."""

    url: str
    etag: str
    text: str


@attrs.frozen
class Answer:
    code: int
    headers: Headers
    body: bytes


@attrs.frozen
class Changes:
    """What a sync-collection said: the new token, the cards added or changed,
    the hrefs removed, and whether the server has more to tell (507)."""

    token: str
    changed: list[Card]
    removed: list[str]
    more: bool = False


class CardDAVClient:
    """CardDAV operations of the collector, over a treq-like client."""

    log = Logger()

    def __init__(self, http: Any, clock: IReactorTime, *,
                 credentials: tuple[str, str] | None = None,
                 timeout: float = 30.0, concurrency: int = 8,
                 metrics: Metrics | None = None) -> None:
        self._http = http
        self._clock = clock
        self._timeout = timeout
        self._limit = Lanes(concurrency)
        # The production pool keeps at most ``concurrency`` idle connections
        # per host (tap.py), so this many attempts always reach a fresh one.
        self._stale_attempts = concurrency + 2
        self._auth: bytes | None = None
        if credentials and credentials[0]:
            pair = ("%s:%s" % credentials).encode("utf-8")
            self._auth = b"Basic " + base64.b64encode(pair)
        metrics = metrics or Metrics()
        self._seconds = metrics.histogram(
            "mailhub_collector_carddav_seconds",
            "CardDAV request latency (PUT is the write of a contact)", ["method"])

    @property
    def concurrency(self) -> int:
        """Requests in flight at most ([carddav] concurrency)."""
        return self._limit.size

    def when_short(self) -> Deferred[None]:
        """Fires when fewer requests wait for a slot than can run at once."""
        return self._limit.when_short()

    # -- the wire ---------------------------------------------------------

    def request(self, method: str, url: str, headers: dict[bytes, bytes] | None = None,
                body: bytes | None = None, depth: str | None = None,
                urgent: bool = False) -> Deferred[Answer]:
        """One request, bounded by the concurrency limit and the timeout; body always read.

        ``urgent`` requests (the lookups every message of a batch waits for)
        take the next free slot before the others.
        """
        return self._limit.run(urgent, self._timed, method, url, headers or {}, body, depth)

    def _timed(self, method: str, url: str, headers: dict[bytes, bytes],
               body: bytes | None, depth: str | None) -> Deferred[Answer]:
        all_headers = {b"user-agent": [b"mailhub-collector"]}
        for name, value in headers.items():
            all_headers[name] = [value]
        if self._auth:
            all_headers[b"authorization"] = [self._auth]
        if depth is not None:
            all_headers[b"depth"] = [depth.encode("ascii")]
        started = time.monotonic()
        d = Deferred.fromCoroutine(self._exchange(method, url, Headers(all_headers), body))
        d.addTimeout(self._timeout, self._clock)

        def done(result: Any) -> Any:
            self._seconds.labels(method=method).observe(time.monotonic() - started)
            return result

        def failed(failure: Any) -> Any:
            if failure.check(*_TRANSIENT):
                raise Unavailable("CardDAV server unreachable (%s %s): %s"
                                  % (method, url, failure.getErrorMessage() or
                                     failure.type.__name__))
            return failure

        return d.addBoth(done).addErrback(failed)

    async def _exchange(self, method: str, url: str, headers: Headers,
                        body: bytes | None) -> Answer:
        attempts = self._stale_attempts
        while True:
            try:
                response = await self._http.request(method, url, headers=headers, data=body)
                break
            except (web_client.ResponseNeverReceived,
                    web_client.RequestTransmissionFailed) as e:
                # A pooled connection that the server had already closed.
                # Radicale's own server answers HTTP/1.0 and closes after
                # every response, without "Connection: close"; Twisted's pool
                # keeps such connections all the same, so the next requests
                # can meet one closed connection per idle pooled one. Twisted
                # retries only GET and friends without a body. Every request
                # here is idempotent or conditional, so trying again is safe;
                # each failure drops one stale connection, so after as many
                # attempts as the pool can hold a fresh connection is made.
                attempts -= 1
                if attempts <= 0 or not _closed_connection(e):
                    raise
        content = await response.content()
        return Answer(response.code, response.headers, content)

    @staticmethod
    def _check(answer: Answer, method: str, url: str, ok: Iterable[int]) -> Answer:
        if answer.code in ok:
            return answer
        if answer.code >= 500 or answer.code in (408, 429):
            raise Unavailable("CardDAV server error %d on %s %s" % (answer.code, method, url))
        if answer.code in (401, 403):
            raise Unavailable("CardDAV server refused the collector's credentials "
                              "(%d on %s %s)" % (answer.code, method, url))
        raise CardDAVError("unexpected %d on %s %s" % (answer.code, method, url))

    # -- operations -------------------------------------------------------

    async def list_books(self, home: str) -> list[str]:
        """Absolute URLs of the address books in a home (empty when it does not exist)."""
        return [book.url for book in await self.books(home)]

    async def books(self, home: str) -> list["Book"]:
        """The address books in a home, with the vCard versions each accepts
        (one PROPFIND Depth 1; empty when the home does not exist)."""
        answer = self._check(
            await self.request("PROPFIND", home, {b"content-type": XML_TYPE},
                               _BOOK_PROPS, depth="1", urgent=True),
            "PROPFIND", home, (207, 404))
        if answer.code == 404:
            return []
        return [book for book in _books(answer.body, home)
                if not same_collection(book.url, home)]

    async def book(self, url: str) -> "Book | None":
        """The address book at ``url`` with the vCard versions it accepts, or None
        (one PROPFIND Depth 0)."""
        answer = self._check(
            await self.request("PROPFIND", url, {b"content-type": XML_TYPE},
                               _BOOK_PROPS, depth="0", urgent=True),
            "PROPFIND", url, (207, 404))
        if answer.code == 404:
            return None
        return next(iter(_books(answer.body, url)), None)

    async def find_emails(self, book: str, spellings: Iterable[str]) -> list[Card]:
        """Cards of a book having an EMAIL equal (case-insensitively) to any spelling."""
        spellings = list(dict.fromkeys(spellings))
        found: list[Card] = []
        for start in range(0, len(spellings), QUERY_BATCH):
            found.extend(await self._query(book, spellings[start:start + QUERY_BATCH]))
        return found

    async def _query(self, book: str, spellings: list[str]) -> list[Card]:
        matches = "".join(
            '<c:text-match collation="i;unicode-casemap" match-type="equals">%s'
            "</c:text-match>" % _xml_text(s) for s in spellings)
        body = ('<?xml version="1.0" encoding="utf-8"?>'
                '<c:addressbook-query xmlns:d="DAV:" xmlns:c="%s">'
                "<d:prop><d:getetag/><c:address-data/></d:prop>"
                '<c:filter test="anyof"><c:prop-filter name="EMAIL" test="anyof">%s'
                "</c:prop-filter></c:filter></c:addressbook-query>" % (CARD, matches))
        answer = self._check(
            await self.request("REPORT", book, {b"content-type": XML_TYPE},
                               body.encode("utf-8"), depth="1", urgent=True),
            "REPORT", book, (207, 404))
        if answer.code == 404:
            return []
        return await self._cards_of(answer.body, book)

    async def changes(self, book: str, token: str, urgent: bool = True) -> Changes | None:
        """The cards of ``book`` added, changed and removed since ``token``
        (every card for the empty token); None when the book is not there.

        Raises :class:`TokenExpired` when the server forgot the token and
        :class:`SyncRefused` when it does not do sync-collection here.
        ``urgent``: ahead of the PUTs (a lookup waits for it), or behind them.
        """
        body = ('<?xml version="1.0" encoding="utf-8"?>'
                '<d:sync-collection xmlns:d="DAV:" xmlns:c="%s">'
                "<d:sync-token>%s</d:sync-token><d:sync-level>1</d:sync-level>"
                "<d:prop><d:getetag/><c:address-data/></d:prop></d:sync-collection>"
                % (CARD, _xml_text(token)))
        answer = await self.request("REPORT", book, {b"content-type": XML_TYPE},
                                    body.encode("utf-8"), depth="0", urgent=urgent)
        if answer.code == 404:
            return None
        if answer.code in (403, 409) and b"valid-sync-token" in answer.body:
            raise TokenExpired("the CardDAV server no longer knows the sync token of %s"
                               % book)
        if answer.code in (400, 403, 405, 415, 422, 501):
            raise SyncRefused("%d on sync-collection of %s" % (answer.code, book))
        self._check(answer, "REPORT", book, (207,))
        try:
            root = ET.fromstring(answer.body)
        except ET.ParseError as e:
            raise CardDAVError("the CardDAV server sent XML that cannot be parsed: %s" % e)
        new_token = (root.findtext(_q("sync-token")) or "").strip()
        if not new_token:
            raise SyncRefused("no sync-token in the sync-collection answer for %s" % book)
        changed: list[Card] = []
        removed: list[str] = []
        more = False
        for href, status, prop in _statuses(root, book):
            if same_collection(href, book):
                more = more or status == 507  # truncated: ask again from the new token
            elif status == 404:
                removed.append(href)
            elif prop is not None:
                etag = (prop.findtext(_q("getetag")) or "").strip()
                text = prop.findtext(_q("address-data", CARD)) or ""
                if text.strip():
                    changed.append(Card(href, etag, text))
                else:
                    # A server that gives only ETags here: read the card.
                    fetched = await self.get(href)
                    if fetched is None:
                        removed.append(href)
                    else:
                        changed.append(fetched)
        return Changes(new_token, changed, removed, more)

    async def create_book(self, url: str, display_name: str) -> bool:
        """Extended MKCOL of an address book: True if made, False if it was there.

        When the home itself is missing (409), it is made with a plain MKCOL
        first, as servers that create homes lazily need.
        """
        body = ('<?xml version="1.0" encoding="utf-8"?>'
                '<d:mkcol xmlns:d="DAV:" xmlns:c="%s"><d:set><d:prop>'
                "<d:resourcetype><d:collection/><c:addressbook/></d:resourcetype>"
                "<d:displayname>%s</d:displayname>"
                "</d:prop></d:set></d:mkcol>" % (CARD, _xml_text(display_name)))
        for attempt in range(2):
            answer = self._check(
                await self.request("MKCOL", url, {b"content-type": XML_TYPE},
                                   body.encode("utf-8")),
                "MKCOL", url, (200, 201, 204, 405, 409))
            if answer.code == 405:
                return False
            if answer.code != 409:
                return True
            if attempt == 0:
                parent = urljoin(url, "..")
                self._check(await self.request("MKCOL", parent), "MKCOL", parent,
                            (200, 201, 204, 405))
        raise CardDAVError("cannot create the address book %s (409 Conflict)" % url)

    async def put_new(self, url: str, text: str) -> bool:
        """PUT only if absent: True when created, False when it already existed (412).

        Raises :class:`BookMissing` when the book is not there (404, 409).
        """
        answer = self._check(
            await self.request("PUT", url, {b"content-type": VCARD_TYPE,
                                            b"if-none-match": b"*"}, text.encode("utf-8")),
            "PUT", url, (200, 201, 204, 404, 409, 412))
        if answer.code in (404, 409):
            raise BookMissing("no address book to PUT %s into (%d)" % (url, answer.code))
        return answer.code != 412

    async def put_if_match(self, url: str, text: str, etag: str) -> bool:
        """PUT over the version with this ETag: False when it changed meanwhile (412)."""
        headers = {b"content-type": VCARD_TYPE}
        if etag:
            headers[b"if-match"] = etag.encode("latin-1")
        answer = self._check(
            await self.request("PUT", url, headers, text.encode("utf-8")),
            "PUT", url, (200, 201, 204, 412))
        return answer.code != 412

    async def all_cards(self, book: str) -> list[Card] | None:
        """Every card of ``book`` that has an EMAIL (None when the book is not there).

        An addressbook-query (RFC 6352 8.6, which every CardDAV server answers)
        with a bare ``prop-filter`` on EMAIL ("is defined"); not urgent, so the
        collector's own lookups go first (the retention pass reads with it).
        """
        body = ('<?xml version="1.0" encoding="utf-8"?>'
                '<c:addressbook-query xmlns:d="DAV:" xmlns:c="%s">'
                "<d:prop><d:getetag/><c:address-data/></d:prop>"
                '<c:filter><c:prop-filter name="EMAIL"/></c:filter>'
                "</c:addressbook-query>" % CARD)
        answer = self._check(
            await self.request("REPORT", book, {b"content-type": XML_TYPE},
                               body.encode("utf-8"), depth="1"),
            "REPORT", book, (207, 404))
        if answer.code == 404:
            return None
        return await self._cards_of(answer.body, book)

    async def _cards_of(self, body: bytes, book: str) -> list[Card]:
        """The cards of a multistatus answer about ``book``'s members; a card
        answered without its data (some servers) is fetched by GET."""
        cards = []
        for href, prop in _responses(body, book):
            if same_collection(href, book):
                continue
            etag = (prop.findtext(_q("getetag")) or "").strip()
            text = prop.findtext(_q("address-data", CARD)) or ""
            if not text.strip():
                fetched = await self.get(href)
                if fetched is None:
                    continue
                cards.append(fetched)
            else:
                cards.append(Card(href, etag, text))
        return cards

    async def delete_if_match(self, url: str, etag: str) -> bool:
        """DELETE the card if it is still the version with this ETag.

        True when it is gone (deleted now, or already: 404, 410); False when
        it changed meanwhile (412: someone edited it, keep it).
        """
        headers = {b"if-match": etag.encode("latin-1")} if etag else {}
        answer = self._check(await self.request("DELETE", url, headers),
                             "DELETE", url, (200, 202, 204, 404, 410, 412))
        return answer.code != 412

    async def get(self, url: str) -> Card | None:
        """The card at ``url`` with its ETag, or None when there is none."""
        answer = self._check(await self.request("GET", url), "GET", url, (200, 404, 410))
        if answer.code != 200:
            return None
        etag = (answer.headers.getRawHeaders(b"etag") or [b""])[0].decode("latin-1")
        return Card(url, etag, answer.body.decode("utf-8", "replace"))


def _responses(body: bytes, base: str) -> list[tuple[str, ET.Element]]:
    """(absolute href, merged 200 prop element) of each response of a multistatus."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as e:
        raise CardDAVError("the CardDAV server sent XML that cannot be parsed: %s" % e)
    return [(href, ET.Element(_q("prop")) if prop is None else prop)
            for href, _, prop in _statuses(root, base)]


def _status_code(line: str | None) -> int | None:
    """The code of an ``HTTP/1.1 404 Not Found`` status line."""
    parts = (line or "").split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def _statuses(root: ET.Element, base: str) -> list[tuple[str, int | None, ET.Element | None]]:
    """(absolute href, status, merged 200 prop) of each response of a multistatus.

    ``status`` is the response's own status line (a removed member in a
    sync-collection, a truncated answer), None where it has only propstats;
    ``prop`` is None where the response has no 200 propstat.
    """
    out = []
    for response in root.iter(_q("response")):
        href = (response.findtext(_q("href")) or "").strip()
        if not href:
            continue
        merged: ET.Element | None = None
        for propstat in response.findall(_q("propstat")):
            if _status_code(propstat.findtext(_q("status"))) != 200:
                continue
            prop = propstat.find(_q("prop"))
            if prop is not None:
                if merged is None:
                    merged = ET.Element(_q("prop"))
                merged.extend(list(prop))
        out.append((urljoin(base, href), _status_code(response.findtext(_q("status"))),
                    merged))
    return out
