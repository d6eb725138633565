"""Chunked request bodies at /dav/ reach the embedded Radicale whole, and stay bounded.

Real reactor, the real site request class (``[mailhub] max_body``), the real
embedded Radicale, and raw HTTP/1.1 written to a socket (treq would send a
Content-Length): what a client that streams its body sends.
"""

from __future__ import annotations

import base64
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailhub.collector.embedded import EmbeddedDAV
from mailhub.directory.model import User
from mailhub.web.site import MailhubSite
from tests.collector.fakes import FakeUsers
from tests.collector.test_radicale import _Root

ALICE = User(login="alice@example.org", emails=("alice@example.org",), id="A1")
AUTH = b"Basic " + base64.b64encode(b"alice@example.org:pw-a")
CARD = ("BEGIN:VCARD\r\nVERSION:3.0\r\nUID:chunked-1\r\nFN:Chunked Person\r\n"
        "EMAIL:chunked@x.org\r\nEND:VCARD\r\n").encode()
MKCOL = (b'<?xml version="1.0" encoding="utf-8"?><d:mkcol xmlns:d="DAV:" '
         b'xmlns:c="urn:ietf:params:xml:ns:carddav"><d:set><d:prop><d:resourcetype>'
         b"<d:collection/><c:addressbook/></d:resourcetype><d:displayname>Chunky</d:displayname>"
         b"</d:prop></d:set></d:mkcol>")
PROPFIND = (b'<?xml version="1.0" encoding="utf-8"?><d:propfind xmlns:d="DAV:"><d:prop>'
            b"<d:displayname/></d:prop></d:propfind>")


def chunked(body: bytes, size: int = 7) -> bytes:
    """``body`` in HTTP/1.1 chunks of ``size`` bytes, with the last-chunk."""
    out = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                   for i in range(0, len(body), size))
    return out + b"0\r\n\r\n"


def exchange(port: int, request: bytes) -> tuple[int, bytes]:
    """Send one raw request (blocking; run in a thread) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while True:
            part = s.recv(65536)
            if not part:
                break
            data += part
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


class ChunkedBodyTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        folder = Path(tempfile.mkdtemp(prefix="mailhub-dav-"))
        self.addCleanup(shutil.rmtree, folder, True)
        users = FakeUsers([ALICE], {"alice@example.org": "pw-a"})
        self.embedded = EmbeddedDAV(reactor, folder / "dav", users, threads=2)
        self.embedded.startService()
        self.addCleanup(self.embedded.stopService)
        site = MailhubSite(_Root(self.embedded), max_body=4096)
        self.listening = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.listening.stopListening)
        self.port = self.listening.getHost().port

    async def send(self, method: bytes, path: bytes, body: bytes | None,
                   headers: dict[bytes, bytes] | None = None) -> tuple[int, bytes]:
        """A request with ``body`` sent chunked (no Content-Length); None: no body."""
        lines = [b"%s /dav/%s HTTP/1.1" % (method, path), b"Host: 127.0.0.1",
                 b"Authorization: " + AUTH, b"Connection: close"]
        lines += [name + b": " + value for name, value in (headers or {}).items()]
        if body is not None:
            lines.append(b"Transfer-Encoding: chunked")
        raw = b"\r\n".join(lines) + b"\r\n\r\n" + (chunked(body) if body is not None else b"")
        code, answer = await deferToThread(exchange, self.port, raw)
        return code, answer

    async def make_book(self, name: bytes) -> int:
        """An extended MKCOL with a Content-Length (the way that always worked)."""
        lines = [b"MKCOL /dav/alice@example.org/%s/ HTTP/1.1" % name, b"Host: 127.0.0.1",
                 b"Authorization: " + AUTH, b"Connection: close",
                 b"Content-Type: application/xml", b"Content-Length: %d" % len(MKCOL)]
        code, _ = await deferToThread(exchange, self.port,
                                      b"\r\n".join(lines) + b"\r\n\r\n" + MKCOL)
        return code

    async def test_a_chunked_put_is_stored_whole(self) -> None:
        self.assertEqual(await self.make_book(b"book"), 201)
        code, _ = await self.send(b"PUT", b"alice@example.org/book/c1.vcf", CARD,
                                  {b"Content-Type": b"text/vcard"})
        self.assertEqual(code, 201)
        code, text = await self.send(b"GET", b"alice@example.org/book/c1.vcf", None)
        self.assertEqual(code, 200)
        self.assertIn(b"FN:Chunked Person", text)
        self.assertIn(b"chunked@x.org", text)

    async def test_a_chunked_extended_mkcol_makes_an_address_book(self) -> None:
        code, _ = await self.send(b"MKCOL", b"alice@example.org/book/", MKCOL,
                                  {b"Content-Type": b"application/xml"})
        self.assertEqual(code, 201)

    async def test_a_chunked_propfind_body_is_read(self) -> None:
        self.assertEqual(await self.make_book(b"book"), 201)
        code, text = await self.send(b"PROPFIND", b"alice@example.org/book/", PROPFIND,
                                     {b"Depth": b"0", b"Content-Type": b"application/xml"})
        self.assertEqual(code, 207)
        self.assertIn(b"Chunky", text)
        # Only what was asked: an ignored body would be an allprop answer.
        self.assertNotIn(b"getctag", text)
        self.assertNotIn(b"resourcetype", text)

    async def test_a_chunked_body_above_max_body_is_413(self) -> None:
        big = CARD.replace(b"FN:Chunked Person", b"NOTE:" + b"x" * 5000)
        code, text = await self.send(b"PUT", b"alice@example.org/book/c2.vcf", big,
                                     {b"Content-Type": b"text/vcard"})
        self.assertEqual(code, 413)
        self.assertIn(b"larger than 4096 bytes", text)
        code, _ = await self.send(b"GET", b"alice@example.org/book/c2.vcf", None)
        self.assertEqual(code, 404)

    async def test_a_body_with_content_length_is_unchanged(self) -> Any:
        self.assertEqual(await self.make_book(b"other"), 201)
