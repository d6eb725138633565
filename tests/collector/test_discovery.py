"""RFC 6764 discovery: a CardDAV client given only the host finds the users' books.

A real ``twistd mailhub`` with the embedded store, and a real client
(vdirsyncer, from PyPI) configured with the bare host as its URL.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.support.process import Mailhub

VDIRSYNCER = str(Path(sys.executable).with_name("vdirsyncer"))
MAILHUB = str(Path(sys.executable).with_name("mailhub"))
LOGIN, PASSWORD = "ann@example.com", "correct horse battery"

MKCOL = b"""<?xml version="1.0" encoding="utf-8"?>
<mkcol xmlns="DAV:" xmlns:CR="urn:ietf:params:xml:ns:carddav">
  <set><prop>
    <resourcetype><collection/><CR:addressbook/></resourcetype>
    <displayname>Collected</displayname>
  </prop></set>
</mkcol>"""

CARD = b"""BEGIN:VCARD\r
VERSION:3.0\r
UID:bob-example-org\r
FN:Bob Example\r
N:Example;Bob;;;\r
EMAIL:bob@example.org\r
END:VCARD\r
"""


def _dav(mailhub: Mailhub, method: str, path: str, body: bytes, content_type: str) -> int:
    credentials = base64.b64encode(("%s:%s" % (LOGIN, PASSWORD)).encode()).decode()
    request = urllib.request.Request(mailhub.url + path, data=body, method=method, headers={
        "Authorization": "Basic " + credentials, "Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(response.status)


def test_vdirsyncer_discovers_the_books_from_the_bare_host(tmp_path: Path) -> None:
    config = "[mailhub]\ndata = %s\n" % (tmp_path / "data")
    (tmp_path / "mailhub.ini").write_text(config)
    subprocess.run([MAILHUB, "user", "add", LOGIN, "--name", "Ann", "--password-stdin",
                    "--config", str(tmp_path / "mailhub.ini")], input=PASSWORD + "\n",
                   text=True, check=True, capture_output=True, timeout=60)
    with Mailhub(tmp_path, config=config) as mailhub:
        book = "/dav/%s/collected/" % LOGIN
        assert _dav(mailhub, "MKCOL", book, MKCOL, "application/xml") == 201
        assert _dav(mailhub, "PUT", book + "bob-example-org.vcf", CARD, "text/vcard") == 201

        local = tmp_path / "local"
        (tmp_path / "vdirsyncer.conf").write_text(
            '[general]\nstatus_path = "%s"\n\n'
            '[pair contacts]\na = "site"\nb = "local"\ncollections = ["from a"]\n\n'
            '[storage site]\ntype = "carddav"\nurl = "%s"\n'
            'username = "%s"\npassword = "%s"\n\n'
            '[storage local]\ntype = "filesystem"\npath = "%s"\nfileext = ".vcf"\n'
            % (tmp_path / "status", mailhub.url, LOGIN, PASSWORD, local))
        run = [VDIRSYNCER, "-c", str(tmp_path / "vdirsyncer.conf")]
        discover = subprocess.run(run + ["discover"], input="y\n" * 5, text=True,
                                  capture_output=True, timeout=120)
        assert discover.returncode == 0, discover.stdout + discover.stderr
        sync = subprocess.run(run + ["sync"], text=True, capture_output=True, timeout=120)
        assert sync.returncode == 0, sync.stdout + sync.stderr
    cards = list((local / "collected").glob("*.vcf"))
    assert len(cards) == 1, discover.stdout + discover.stderr
    assert "bob@example.org" in cards[0].read_text()
