"""``mailhub dead`` on the spool (no broker), the dead-letter gauge, and pruning.

The dead letters are made by the real :class:`~mailhub.pubsub.spool.SpoolQueue`
(a handler that raises ValidationError), read back by the command run
in-process, and a replayed letter is collected by the same queue, as a
running server would. Pruning and the watch run on a ``Clock`` with an
injected wall clock; file ages are set with ``os.utime``.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from mailhub import cli
from mailhub.config import load
from mailhub.errors import ConfigError, ValidationError
from mailhub.metrics import Metrics
from mailhub.pubsub.deadletters import GAUGE, DeadLetterWatch, SpoolDeadLetters
from mailhub.pubsub.retry import RetryPolicy
from mailhub.pubsub.spool import Spool, SpoolQueue

DAY = 86400.0


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdin=io.StringIO(""), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def rows(text: str) -> list[list[str]]:
    """The cells of a printed table (columns are separated by two spaces or more)."""
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines() if line.strip()]


class Poison:
    """A collector stand-in: refuses messages without emails, records the others."""

    def __init__(self) -> None:
        self.collected: list[dict[str, Any]] = []
        self.accept_all = False

    def __call__(self, body: bytes) -> None:
        try:
            message = json.loads(body)
        except ValueError:
            raise ValidationError(["not JSON"])
        if not message.get("emails") and not self.accept_all:
            raise ValidationError(["no emails"])
        self.collected.append(message)


@pytest.fixture
def site(tmp_path: Path) -> tuple[str, SpoolQueue, Poison]:
    """A config (no broker) and the server's spool queue on its collector-spool."""
    config = tmp_path / "mailhub.ini"
    config.write_text("[mailhub]\ndata = %s\n" % (tmp_path / "data"))
    folder = load(str(config)).data_dir / "collector-spool"
    queue = SpoolQueue("collector:email", Spool(folder), Clock(), RetryPolicy(1, 1))
    handler = Poison()
    queue.consume(handler)
    queue.recover()
    return str(config), queue, handler


def test_list_shows_each_dead_letter_with_its_reason_and_summary(site: Any) -> None:
    config, queue, _ = site
    queue.publish({"userEmail": "ann@example.org", "emails": []})
    queue.publish(b"not json")
    code, out, err = run("dead", "list", "--config", config)
    assert code == 0, err
    table = rows(out)
    assert table[0] == ["ID", "WHEN", "REASON", "SUMMARY"]
    assert [r[2:] for r in table[1:]] == [["no emails", "user=ann@example.org addresses=0"],
                                         ["not JSON", "not JSON (8 bytes)"]]
    ids = [r[0] for r in table[1:]]
    assert ids == [letter.id for letter in SpoolDeadLetters(queue.spool.folder).letters()]


def test_list_says_so_when_there_is_none(site: Any) -> None:
    config, _, _ = site
    code, out, _ = run("dead", "list", "--config", config)
    assert code == 0
    assert out.startswith("no dead letters in ") and "collector-spool/dead" in out


def test_show_prints_the_reason_and_the_whole_message(site: Any) -> None:
    config, queue, _ = site
    queue.publish({"userEmail": "ann@example.org", "emails": []})
    letter_id = rows(run("dead", "list", "--config", config)[1])[1][0]
    code, out, _ = run("dead", "show", letter_id, "--config", config)
    assert code == 0
    assert "reason:   no emails" in out
    assert '"userEmail": "ann@example.org"' in out
    code, _, err = run("dead", "show", "nonesuch", "--config", config)
    assert code == 1 and "no dead letter nonesuch" in err


def test_replay_puts_the_letter_back_and_the_running_queue_collects_it(site: Any) -> None:
    config, queue, handler = site
    queue.publish({"userEmail": "ann@example.org", "emails": []})
    letters = SpoolDeadLetters(queue.spool.folder)
    [letter] = list(letters.letters())
    handler.accept_all = True  # the cause is fixed
    code, out, _ = run("dead", "replay", letter.id, "--config", config)
    assert (code, out) == (0, "replayed %s\n" % letter.id)
    assert letters.count() == 0
    assert not list(letters.dead_folder.iterdir())  # the reason went with it
    # The server's watch reads the replayed file and hands it to the queue.
    assert queue.take_up(letters.replayed()) == 1
    assert handler.collected == [{"userEmail": "ann@example.org", "emails": []}]
    assert letters.replayed() == []  # collected: the file is gone
    assert queue.take_up([("gone", b"{}")]) == 0  # a file collected meanwhile is skipped


def test_a_replayed_letter_is_taken_up_once_even_if_seen_twice(site: Any) -> None:
    config, queue, handler = site
    queue.publish({"userEmail": "ann@example.org", "emails": []})
    letters = SpoolDeadLetters(queue.spool.folder)
    run("dead", "replay", "--all", "--config", config)
    handler.accept_all = True
    seen = letters.replayed()
    # Twice in one go (two watch rounds before it finished): handled once.
    assert queue.take_up(seen + seen) == 1
    assert queue.take_up(seen) == 0
    assert len(handler.collected) == 1


def test_replay_at_start_is_taken_up_by_recover(tmp_path: Path, site: Any) -> None:
    config, queue, handler = site
    queue.publish({"userEmail": "ann@example.org", "emails": []})
    run("dead", "replay", "--all", "--config", config)
    # A server started afterwards finds it in the spool.
    again = SpoolQueue("collector:email", Spool(queue.spool.folder), Clock())
    accepted: list[bytes] = []
    again.consume(accepted.append)
    assert again.recover() == 1
    assert [json.loads(b) for b in accepted] == [{"userEmail": "ann@example.org",
                                                  "emails": []}]


def test_drop_one_and_all(site: Any) -> None:
    config, queue, _ = site
    for n in range(3):
        queue.publish({"userEmail": "u%d@example.org" % n, "emails": []})
    letters = SpoolDeadLetters(queue.spool.folder)
    first = next(letters.letters()).id
    assert run("dead", "drop", first, "--config", config)[:2] == (0, "dropped %s\n" % first)
    assert letters.count() == 2
    code, out, _ = run("dead", "drop", "--all", "--config", config)
    assert code == 0 and out.endswith("dropped 2 dead letters\n")
    assert letters.count() == 0 and not list(letters.dead_folder.iterdir())
    code, _, err = run("dead", "drop", first, "--config", config)
    assert code == 1 and "no dead letter" in err


def test_replay_and_drop_want_an_id_or_all(site: Any) -> None:
    config, _, _ = site
    for action in ("replay", "drop"):
        code, _, err = run("dead", action, "--config", config)
        assert code == 1 and "give a dead letter's ID or --all" in err
        code, _, err = run("dead", action, "x", "--all", "--config", config)
        assert code == 1


def aged(letters: SpoolDeadLetters, letter_id: str, when: float) -> None:
    for suffix in (".msg", ".reason"):
        os.utime(letters.dead_folder / (letter_id + suffix), (when, when))


def dead_letters(queue: SpoolQueue, count: int) -> list[str]:
    for n in range(count):
        queue.publish({"userEmail": "u%d@example.org" % n, "emails": []})
    return [letter.id for letter in SpoolDeadLetters(queue.spool.folder).letters()]


def test_prune_deletes_only_letters_older_than_the_limit_in_bounded_batches(
        site: Any) -> None:
    _, queue, _ = site
    now = 1_800_000_000.0
    letters = SpoolDeadLetters(queue.spool.folder, clock=lambda: now)
    ids = dead_letters(queue, 4)
    for letter_id in ids[:3]:
        aged(letters, letter_id, now - 31 * DAY)
    aged(letters, ids[3], now - 29 * DAY)
    assert letters.prune(30, batch=2) == 2  # bounded
    assert letters.prune(30, batch=2) == 1
    assert [letter.id for letter in letters.letters()] == [ids[3]]
    assert letters.prune(0) == 0  # 0 keeps them forever
    assert letters.prune(28) == 1


def test_prune_removes_a_reason_whose_message_is_gone(site: Any) -> None:
    _, queue, _ = site
    letters = SpoolDeadLetters(queue.spool.folder)
    [letter_id] = dead_letters(queue, 1)
    (letters.dead_folder / (letter_id + ".msg")).unlink()  # a replay cut in two
    letters.prune(30)
    assert not list(letters.dead_folder.iterdir())


def sync_runner(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return succeed(f(*args))


def test_the_watch_counts_prunes_and_takes_up_replays(site: Any) -> None:
    config, queue, handler = site
    clock = Clock()
    now = [time.time()]  # the files are written now
    letters = SpoolDeadLetters(queue.spool.folder, clock=lambda: now[0])
    metrics = Metrics()
    ids = dead_letters(queue, 3)
    # The server's queue, counting into the same registry.
    served = SpoolQueue("collector:email", Spool(queue.spool.folder), Clock(), metrics=metrics)
    served.consume(handler)
    served.recover()
    watch = DeadLetterWatch(clock, metrics, spool=letters, days=30, rescan=served.take_up,
                            counted=served.dead_counted, interval=30, runner=sync_runner)
    watch.startService()
    try:
        assert metrics.value(GAUGE) == 3
        assert metrics.value("mailhub_collector_spool_dead") == 3
        handler.accept_all = True
        run("dead", "replay", ids[0], "--config", config)
        aged(letters, ids[1], now[0] - 31 * DAY)
        clock.advance(30)
        assert metrics.value(GAUGE) == 1  # one replayed, one pruned
        assert metrics.value("mailhub_collector_spool_dead") == 1
        assert metrics.value("mailhub_collector_dead_letters_pruned_total") == 1
        assert [m["userEmail"] for m in handler.collected] == ["u0@example.org"]
        now[0] += 31 * DAY
        clock.advance(30)
        assert metrics.value(GAUGE) == 0
    finally:
        watch.stopService()


def test_the_watch_reads_the_broker_count_and_keeps_it_while_the_broker_is_away() -> None:
    clock = Clock()
    metrics = Metrics()
    answers: list[int | None] = [5, None, 7]
    watch = DeadLetterWatch(clock, metrics, broker_count=lambda: succeed(answers.pop(0)),
                            interval=10)
    watch.startService()
    try:
        assert metrics.value(GAUGE) == 5
        clock.advance(10)
        assert metrics.value(GAUGE) == 5  # broker away: the last count stands
        clock.advance(10)
        assert metrics.value(GAUGE) == 7
    finally:
        watch.stopService()


def test_dead_letter_days_is_read_and_zero_allowed(tmp_path: Path) -> None:
    path = tmp_path / "m.ini"
    assert load(None).collector.dead_letter_days == 30
    path.write_text("[collector]\ndead_letter_days = 0\n")
    assert load(str(path)).collector.dead_letter_days == 0
    path.write_text("[collector]\ndead_letter_days = -1\n")
    with pytest.raises(ConfigError):
        load(str(path))


def test_a_running_server_counts_its_dead_letters_and_takes_up_a_replay(
        tmp_path: Path) -> None:
    """The real ``twistd mailhub`` (no broker): poison left in its spool dies
    at start, ``/metrics`` counts it, and ``mailhub dead replay`` while it
    runs is taken up by it (the user is still unknown, so the letter dies
    again, under its new name)."""
    from tests.support.metrics import total
    from tests.support.process import Mailhub

    spool = tmp_path / "data" / "collector-spool"
    spool.mkdir(parents=True)
    (spool / "00000000000000000001-1-000000.msg").write_text(
        '{"userEmail": "nobody@example.com", "emails": ["ann@example.org"]}')
    config = "[mailhub]\ndata = %s\n" % (tmp_path / "data")
    letters = SpoolDeadLetters(spool)

    def wait(check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 90
        while not check():
            assert time.monotonic() < deadline, "timed out waiting: " + what
            time.sleep(0.2)

    with Mailhub(tmp_path, config=config) as server:
        wait(lambda: letters.count() == 1, "the poison to die")
        wait(lambda: total(server.get("/metrics")[1], GAUGE) == 1, "the gauge to count it")
        [first] = list(letters.letters())
        assert first.reason == "unknown user (userEmail 'nobody@example.com')"
        code, out, err = run("dead", "replay", first.id, "--config", str(tmp_path / "mailhub.ini"))
        assert code == 0, err
        wait(lambda: [letter.id for letter in letters.letters()] not in ([], [first.id]),
             "the replayed letter to be taken up")
        [again] = list(letters.letters())
        assert "-replay-" in again.id and again.body == first.body
