"""The embedded Radicale checks its item cache by each card's size and time (issue 14).

Radicale answers a PUT of a new card (and a sync-collection) by going over
every card of the book: in its default mode it reads and hashes each card's
file to check its cache entry, so each write read the whole book from disk.
mailhub's embedded store has ``use_mtime_and_size_for_item_cache`` on: the
cache entry is checked by the file's size and modification time. These
tests drive the real Radicale application synchronously through the
collector's in-process client (no thread, no socket), count the card files
Radicale opens, and check that a card changed on disk behind Radicale's
back is still read afresh.
"""

from __future__ import annotations

import builtins
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import radicale.storage.multifilesystem.get as radicale_get
from twisted.web.http_headers import Headers

from mailhub.collector.embedded import InProcessHTTP, radicale_app

USER = "alice@example.org"
BOOK = "/dav/%s/collected/" % USER
MKCOL = (b'<?xml version="1.0" encoding="utf-8"?><d:mkcol xmlns:d="DAV:" '
         b'xmlns:c="urn:ietf:params:xml:ns:carddav"><d:set><d:prop><d:resourcetype>'
         b"<d:collection/><c:addressbook/></d:resourcetype></d:prop></d:set></d:mkcol>")
QUERY = (b'<?xml version="1.0" encoding="utf-8"?><c:addressbook-query xmlns:d="DAV:" '
         b'xmlns:c="urn:ietf:params:xml:ns:carddav"><d:prop><c:address-data/></d:prop>'
         b"</c:addressbook-query>")


def card(uid: str, name: str) -> bytes:
    return ("BEGIN:VCARD\r\nVERSION:3.0\r\nUID:%s\r\nFN:%s\r\nEMAIL:%s@x.org\r\nEND:VCARD\r\n"
            % (uid, name, uid)).encode()


class Store:
    """The embedded Radicale, called synchronously as the collector's client calls it."""

    def __init__(self, folder: Path) -> None:
        self.app = radicale_app(folder)
        self.client = InProcessHTTP(self.app, pool=None, reactor=None)  # type: ignore[arg-type]

    def call(self, method: str, path: str, body: bytes = b"",
             **headers: str) -> tuple[int, bytes]:
        raw = Headers()
        for name, value in headers.items():
            raw.addRawHeader(name.replace("_", "-").encode(), value.encode())
        answer = self.client._call(method, "http://mailhub.embedded" + path, raw, body)
        return answer.code, answer.body

    def put_new(self, uid: str, name: str = "Somebody") -> int:
        return self.call("PUT", BOOK + uid + ".vcf", card(uid, name),
                         content_type="text/vcard", if_none_match="*")[0]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "dav")
    assert s.call("MKCOL", BOOK, MKCOL, content_type="application/xml")[0] == 201
    return s


def opened_cards(monkeypatch: pytest.MonkeyPatch, folder: Path) -> list[str]:
    """Names of the card files Radicale's item reader opens from now on."""
    seen: list[str] = []
    real: Callable[..., Any] = builtins.open

    def spy(file: Any, *args: Any, **kw: Any) -> Any:
        path = os.fspath(file) if isinstance(file, (str, os.PathLike)) else ""
        if isinstance(path, str) and path.endswith(".vcf") and ".Radicale" not in path:
            seen.append(os.path.basename(path))
        return real(file, *args, **kw)

    monkeypatch.setattr(radicale_get, "open", spy, raising=False)
    return seen


def test_a_new_card_is_written_without_reading_the_others(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(30):
        assert store.put_new("old-%d" % i) == 201
    # Every card is in Radicale's item cache now (each PUT stored its entry).
    opened = opened_cards(monkeypatch, tmp_path)
    assert store.put_new("new-1") == 201
    assert opened == []  # 30 before the cache was checked by size and time
    code, answer = store.call("REPORT", BOOK, QUERY, content_type="application/xml", depth="1")
    assert code == 207 and answer.count(b"BEGIN:VCARD") == 31
    assert opened == []


def test_a_card_changed_behind_radicales_back_is_read_afresh(
        store: Store, tmp_path: Path) -> None:
    assert store.put_new("someone", "Before") == 201
    code, answer = store.call("REPORT", BOOK, QUERY, content_type="application/xml", depth="1")
    assert code == 207 and b"FN:Before" in answer
    path = tmp_path / "dav" / "collection-root" / USER / "collected" / "someone.vcf"
    stat = path.stat()
    path.write_bytes(card("someone", "Changed on disk"))
    # Even with the old modification time, the size tells the change.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    code, answer = store.call("REPORT", BOOK, QUERY, content_type="application/xml", depth="1")
    assert code == 207
    assert b"FN:Changed on disk" in answer and b"FN:Before" not in answer
