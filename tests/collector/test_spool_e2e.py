"""Without a broker: the collector's spool, through the real ``twistd mailhub``.

The embedded default (no ``[amqp] url``, embedded CardDAV) keeps each
collector message in ``{data}/collector-spool`` until it is collected or
decided: a mailhub killed with SIGKILL leaves its messages there and the next
start collects them; a message that can never be collected is kept in
``dead/`` with its reason.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from urllib.parse import quote

from mailhub.collector.engine import message_body
from tests.support.wait import wait_until
from tests.support import dav
from tests.support.process import TWISTD, Mailhub

MAILHUB_CLI = str(Path(TWISTD).with_name("mailhub"))
ALICE, PASSWORD = "alice@example.org", "alice-pw"
ICS = ("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\nBEGIN:VEVENT\r\nUID:1\r\n"
       "DTSTART:20260101T100000Z\r\nORGANIZER;CN=Olga:mailto:olga@x.org\r\n"
       "ATTENDEE;CN=Pat:mailto:pat@x.org\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n")




def test_what_a_killed_mailhub_held_is_collected_at_the_next_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = "[mailhub]\ndata = %s\n[carddav]\nurl = embedded\n" % data
    ini = tmp_path / "mailhub.ini"
    ini.write_text(config)

    def cli(*args: str, stdin: str | None = None) -> str:
        done = subprocess.run([MAILHUB_CLI, *args, "--config", str(ini)], input=stdin,
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return done.stdout

    cli("user", "add", ALICE, "--name", "Alice Example")
    cli("user", "passwd", ALICE, stdin=PASSWORD + "\n")
    token = cli("token", "create").splitlines()[1].strip()
    spool = data / "collector-spool"

    (tmp_path / "run1").mkdir()
    first = Mailhub(tmp_path / "run1", config=config).start()
    try:
        # A message that can never be collected: kept in dead/ with the reason.
        status, _ = first.request(
            "POST", "/collector/v1/calendar?user=nobody@example.org", ICS.encode(),
            {"Authorization": "Bearer " + token, "Content-Type": "text/calendar"})
        assert status == 202
        reason = wait_until(lambda: list((spool / "dead").glob("*.reason")),
                            "the poison message in dead/")
        assert "unknown user" in reason[0].read_text()
        assert reason[0].with_suffix(".msg").exists()
    finally:
        first.stop(signal.SIGKILL)
    # What a process killed mid-message leaves: its message, whole, and
    # maybe a file it was still writing.
    (spool / "00000000000000000001-1-000000.msg").write_bytes(
        message_body(["Carol Chan <carol@x.org>"], user_email=ALICE))
    (spool / "00000000000000000002-1-000001.tmp").write_bytes(b'{"user')

    (tmp_path / "run2").mkdir()
    with Mailhub(tmp_path / "run2", config=config) as second:
        book = "%s/dav/%s/collected/" % (second.url, quote(ALICE, safe="@+"))
        [card] = wait_until(lambda: dav.cards(book, (ALICE, PASSWORD)), "the card")
        assert (card.fn, card.emails) == ("Carol Chan", ("carol@x.org",))
        assert list(spool.glob("*.msg")) == [] and list(spool.glob("*.tmp")) == []
        assert len(list((spool / "dead").glob("*.msg"))) == 1
