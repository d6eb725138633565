"""Issue 13 (forget, opt-out) end to end: the real ``twistd mailhub``, the real
Radicale (embedded, and external: tests.support.radicale), and a real CardDAV
client, vdirsyncer from PyPI, doing what the user does.

Collector messages come in as a user's client sends them: calendar events Alice
organises, POSTed to ``/collector/v1/calendar`` (then the spool and the engine).
vdirsyncer syncs Alice's books to a folder; deleting a file there and syncing
deletes the card on the server, as Thunderbird or DAVx5 would. Deleting the
collected book is the DELETE a client's "delete address book" sends (vdirsyncer
never deletes collections).
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import pytest

from tests.support.wait import wait_until
from tests.support import dav
from tests.support.metrics import total
from tests.support.process import TWISTD, Mailhub
from tests.support.radicale import RadicaleServer

VDIRSYNCER = str(Path(sys.executable).with_name("vdirsyncer"))
MAILHUB_CLI = str(Path(TWISTD).with_name("mailhub"))
ALICE, PASSWORD = "alice@example.org", "alice-pw"




def event(*attendees: str) -> bytes:
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//test//EN", "BEGIN:VEVENT",
             "UID:%s" % uuid.uuid4(), "DTSTART:20270101T100000Z",
             "ORGANIZER;CN=Alice:mailto:%s" % ALICE]
    lines += ["ATTENDEE:mailto:%s" % a for a in attendees]
    lines += ["END:VEVENT", "END:VCALENDAR", ""]
    return "\r\n".join(lines).encode("utf-8")


class Site:
    """A mailhub, where Alice's books are, and Alice's vdirsyncer."""

    def __init__(self, tmp_path: Path, kind: str) -> None:
        self.tmp = tmp_path
        self.data = tmp_path / "data"
        self.radicale: RadicaleServer | None = None
        if kind == "embedded":
            carddav = "[carddav]\nurl = embedded\n"
        else:
            self.radicale = RadicaleServer({ALICE: PASSWORD})
            self.radicale.start()
            user, password = self.radicale.service
            carddav = "[carddav]\nurl = %s\nusername = %s\npassword = %s\n" % (
                self.radicale.url, user, password)
        self.config = "[mailhub]\ndata = %s\n%s" % (self.data, carddav)
        self.ini = tmp_path / "mailhub.ini"
        self.ini.write_text(self.config)
        self.cli("user", "add", ALICE, "--name", "Alice Example")
        self.cli("user", "passwd", ALICE, stdin=PASSWORD + "\n")
        self.token = self.cli("token", "create").splitlines()[1].strip()
        (tmp_path / "run").mkdir()
        self.mailhub = Mailhub(tmp_path / "run", config=self.config).start()
        base = (self.mailhub.url + "/dav/") if self.radicale is None else self.radicale.url
        self.home = base + quote(ALICE, safe="@+") + "/"
        self.book = self.home + "collected/"
        self.done = 0

    def close(self) -> None:
        self.mailhub.stop()
        if self.radicale is not None:
            self.radicale.cleanup()

    def cli(self, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run([MAILHUB_CLI, *args, "--config", str(self.ini)], input=stdin,
                              capture_output=True, text=True, timeout=60, cwd=self.tmp)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def collect(self, *attendees: str) -> None:
        """Alice organises an event; wait until the collector has decided it."""
        status, answer = self.mailhub.request(
            "POST", "/collector/v1/calendar?user=" + ALICE, event(*attendees),
            {"Authorization": "Bearer " + self.token, "Content-Type": "text/calendar"})
        assert status == 202, answer
        self.done += 1

        def handled() -> bool:
            _, text = self.mailhub.get("/metrics")
            return total(text, "mailhub_collector_messages_total", outcome="done") >= self.done
        wait_until(handled, "message %d to be collected" % self.done, timeout=60)

    def emails(self, book: str | None = None) -> set[str]:
        return {e for c in dav.cards(book or self.book, (ALICE, PASSWORD)) for e in c.emails}

    def skipped(self, reason: str) -> float:
        _, text = self.mailhub.get("/metrics")
        return total(text, "mailhub_collector_skipped_total", reason=reason)

    # -- Alice's CardDAV client -------------------------------------------------

    def vdirsyncer(self, *args: str) -> None:
        conf = self.tmp / "vdirsyncer.conf"
        if not conf.exists():
            conf.write_text(
                '[general]\nstatus_path = "%s"\n\n'
                '[pair contacts]\na = "site"\nb = "local"\ncollections = ["from a"]\n'
                'conflict_resolution = "a wins"\n\n'
                '[storage site]\ntype = "carddav"\nurl = "%s"\n'
                'username = "%s"\npassword = "%s"\n\n'
                '[storage local]\ntype = "filesystem"\npath = "%s"\nfileext = ".vcf"\n'
                % (self.tmp / "status", self.home, ALICE, PASSWORD, self.tmp / "local"))
        done = subprocess.run([VDIRSYNCER, "-c", str(conf), *args], input="y\n" * 5,
                              text=True, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr

    def sync(self) -> None:
        self.vdirsyncer("discover")
        self.vdirsyncer("sync")

    def local(self, book: str) -> Path:
        return self.tmp / "local" / book


@pytest.fixture(params=["embedded", "external"])
def site(request: Any, tmp_path: Path) -> Iterator[Site]:
    made = Site(tmp_path, request.param)
    try:
        yield made
    finally:
        made.close()


def test_a_contact_deleted_in_a_client_is_not_collected_again_until_added_back(
        site: Site) -> None:
    site.collect("ann@x.org", "bob@x.org")
    assert site.emails() == {"ann@x.org", "bob@x.org"}

    # Alice deletes Bob in her client.
    site.sync()
    [card] = [p for p in site.local("collected").glob("*.vcf") if "bob@x.org" in p.read_text()]
    card.unlink()
    site.vdirsyncer("sync")
    assert site.emails() == {"ann@x.org"}

    site.collect("bob@x.org", "carol@x.org")
    assert site.emails() == {"ann@x.org", "carol@x.org"}
    site.collect("bob@x.org")
    assert site.emails() == {"ann@x.org", "carol@x.org"}
    assert site.skipped("forgotten") == 2
    assert "forgotten: bob@x.org" in site.cli("user", "set", ALICE)

    # She puts Bob in a book of her own: the tombstone is lifted.
    dav.make_book(site.home + "friends/", (ALICE, PASSWORD), "Friends")
    site.sync()
    (site.local("friends") / "bob.vcf").write_text(
        "BEGIN:VCARD\r\nVERSION:3.0\r\nUID:bob-own\r\nFN:Bob Own\r\nEMAIL:bob@x.org\r\n"
        "END:VCARD\r\n")
    site.vdirsyncer("sync")
    assert site.emails(site.home + "friends/") == {"bob@x.org"}
    site.collect("dave@x.org")  # its lookup reads Alice's books
    assert "forgotten: -" in site.cli("user", "set", ALICE)
    # Her own card, deleted later: Bob is an address like any other again.
    (site.local("friends") / "bob.vcf").unlink()
    site.vdirsyncer("sync", "--force-delete", "contacts/friends")  # her only card there
    assert site.emails(site.home + "friends/") == set()
    site.collect("bob@x.org")
    assert site.emails() == {"ann@x.org", "bob@x.org", "carol@x.org", "dave@x.org"}


def test_deleting_the_collected_book_opts_out_until_collect_on(site: Site) -> None:
    site.collect("ann@x.org")
    assert site.emails() == {"ann@x.org"}
    answer = dav.request("DELETE", site.book, (ALICE, PASSWORD))
    assert answer.status in (200, 204), answer

    site.collect("bob@x.org")
    assert "collect=off (the collected book was deleted)" in site.cli("user", "set", ALICE)
    site.collect("carol@x.org")
    assert dav.hrefs(site.book, (ALICE, PASSWORD)) == []
    assert dav.request("PROPFIND", site.book, (ALICE, PASSWORD), b"",
                       {"Depth": "0"}).status == 404
    assert site.skipped("opted_out") == 2

    assert "collect=on" in site.cli("user", "set", ALICE, "collect=on")

    # The running server learns of the command's change from the change log
    # (SQLite: within [database] poll_interval); until then a message is still
    # skipped as opted out, and collection resumes once it has.
    def collected_again() -> bool:
        site.collect("dave@x.org")
        return "dave@x.org" in site.emails()

    wait_until(collected_again, "collection to resume after collect=on", timeout=30)
    assert site.emails() == {"dave@x.org"}
