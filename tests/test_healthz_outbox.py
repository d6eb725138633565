"""``/healthz`` shows what waits in the AMQP outbox while the broker is away (doc/pubsub.rst).

A real ``twistd mailhub`` is configured with a broker that does not answer
(a free port); changes made through the hooks publish ``profile:created``
and ``member:added``, which wait in the outbox; ``/healthz`` counts them.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.support.process import Mailhub
from tests.support.require import free_port


def test_healthz_counts_the_publications_waiting_for_the_broker(tmp_path: Path) -> None:
    config = "[amqp]\nurl = amqp://guest:guest@127.0.0.1:%d/\noutbox = 50\n" % free_port()
    with Mailhub(tmp_path, config) as mailhub:
        _, health = mailhub.get("/healthz")
        amqp = health["dependencies"]["amqp"]
        assert (amqp["ok"], amqp["outbox"], amqp["outbox_limit"]) == (False, 0, 50), amqp
        cli = str(Path(sys.executable).with_name("mailhub"))

        def run(*args: str) -> str:
            return subprocess.run([cli, *args, "--config", str(tmp_path / "mailhub.ini")],
                                  cwd=tmp_path, capture_output=True, text=True, timeout=60,
                                  check=True).stdout

        token = run("token", "create").splitlines()[1]
        run("group", "add", "g", "--name", "G")
        for n in range(3):
            status, answer = mailhub.post_form(
                "/gs-group-member-add.json",
                "token=%s&groupId=g&email=p%d%%40example.org&fn=P&add" % (token, n))
            assert (status, answer["status"]) == (200, 0), answer
        deadline = time.monotonic() + 20
        while True:
            _, health = mailhub.get("/healthz")
            waiting = health["dependencies"]["amqp"]["outbox"]
            # Two publications per new member; token:rotated may come too.
            if waiting >= 6 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert waiting >= 6, health
        assert health["dependencies"]["amqp"]["ok"] is False
