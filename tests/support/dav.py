"""A blocking CardDAV client for end-to-end tests: what an ordinary client would do.

It reads address books back (PROPFIND Depth 1, then GET of each card) and
sets up books and cards directly on the server, independent of mailhub's own
CardDAV client, so the tests check what is really stored.
"""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
from typing import NamedTuple
from urllib.parse import unquote, urljoin
from xml.etree import ElementTree as ET

import vobject

DAV = "{DAV:}"
CARD = "{urn:ietf:params:xml:ns:carddav}"

PROPFIND = (b'<?xml version="1.0" encoding="utf-8"?>'
            b'<D:propfind xmlns:D="DAV:"><D:prop><D:resourcetype/><D:getetag/>'
            b'</D:prop></D:propfind>')

MKCOL_BOOK = ('<?xml version="1.0" encoding="utf-8"?>'
              '<D:mkcol xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:carddav">'
              '<D:set><D:prop><D:resourcetype><D:collection/><C:addressbook/>'
              '</D:resourcetype><D:displayname>%s</D:displayname></D:prop></D:set>'
              '</D:mkcol>')


class Answer(NamedTuple):
    status: int
    body: bytes


class StoredCard(NamedTuple):
    """One card as the server holds it: where, UID, FN and its EMAIL values."""

    href: str
    uid: str
    fn: str
    emails: tuple[str, ...]


def request(method: str, url: str, auth: tuple[str, str] | None = None,
            body: bytes | None = None, headers: dict[str, str] | None = None) -> Answer:
    """One HTTP request; any status is an Answer (no exception for 4xx/5xx)."""
    headers = dict(headers or {})
    if auth is not None:
        token = base64.b64encode(("%s:%s" % auth).encode("utf-8")).decode("ascii")
        headers["Authorization"] = "Basic " + token
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return Answer(response.status, response.read())
    except urllib.error.HTTPError as e:
        return Answer(e.code, e.read())


def hrefs(book: str, auth: tuple[str, str] | None) -> list[str]:
    """Absolute URLs of the members of a collection (PROPFIND Depth 1); [] when missing."""
    answer = request("PROPFIND", book, auth, PROPFIND,
                     {"Depth": "1", "Content-Type": "application/xml; charset=utf-8"})
    if answer.status == 404:
        return []
    assert answer.status == 207, "PROPFIND %s: %d %r" % (book, answer.status, answer.body)
    found = []
    for response in ET.fromstring(answer.body).iter(DAV + "response"):
        href = response.findtext(DAV + "href") or ""
        url = urljoin(book, href)
        if unquote(url).rstrip("/") != unquote(book).rstrip("/"):
            found.append(url)
    return found


def cards(book: str, auth: tuple[str, str] | None) -> list[StoredCard]:
    """Every vCard in a book, read with PROPFIND and one GET each."""
    out = []
    for url in hrefs(book, auth):
        answer = request("GET", url, auth)
        assert answer.status == 200, "GET %s: %d" % (url, answer.status)
        card = vobject.readOne(answer.body.decode("utf-8"))
        emails = tuple(e.value for e in card.contents.get("email", []))
        uid = card.uid.value if hasattr(card, "uid") else ""
        fn = card.fn.value if hasattr(card, "fn") else ""
        out.append(StoredCard(url, uid, fn, emails))
    return out


def make_book(url: str, auth: tuple[str, str], name: str) -> None:
    """Create an address book with an extended MKCOL (its parent must exist)."""
    answer = request("MKCOL", url, auth, (MKCOL_BOOK % name).encode("utf-8"),
                     {"Content-Type": "application/xml; charset=utf-8"})
    assert answer.status == 201, "MKCOL %s: %d %r" % (url, answer.status, answer.body)


def put_card(url: str, auth: tuple[str, str], text: str) -> None:
    """Store a new vCard."""
    answer = request("PUT", url, auth, text.encode("utf-8"),
                     {"Content-Type": "text/vcard; charset=utf-8", "If-None-Match": "*"})
    assert answer.status in (201, 204), "PUT %s: %d %r" % (url, answer.status, answer.body)
