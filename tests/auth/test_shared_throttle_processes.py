"""Two real ``twistd mailhub`` processes on one PostgreSQL share one failure budget.

A burst of wrong site tokens sent to instance A is checked there (a token is
compared at once; only the answers wait). Once B has read A's rows (its
``/metrics`` says so), B refuses the next guess from that address without
checking it: the guesses made on A count at B. A third process on its own
database, sent the same single guess, checks it: the refusal is the shared
budget, not the guess.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.metrics import total
from tests.support.postgres import throwaway_database
from tests.support.process import Mailhub

WRONG = "WrongTokenWrongTokenWrongToken00"


def config(folder: Path, dsn: str) -> str:
    return ("[mailhub]\ndata = %s\n[database]\ndsn = %s\nthrottle_sync = 0.2\n"
            "[collector]\nenabled = false\n" % (folder / "data", dsn))


def start(folder: Path, dsn: str) -> Mailhub:
    folder.mkdir(parents=True, exist_ok=True)
    return Mailhub(folder, config=config(folder, dsn)).start(timeout=60)


def guess(mailhub: Mailhub) -> int:
    status, _ = mailhub.post_form("/gs-group-groups.json", "token=%s&get" % WRONG)
    return status


def metric(mailhub: Mailhub, name: str, **labels: str) -> float:
    status, page = mailhub.get("/metrics")
    assert status == 200
    return total(page, name, **labels)


@pytest.fixture
def dsn() -> Iterator[str]:
    with throwaway_database() as name:
        yield name


def test_failures_on_one_instance_count_on_the_other(tmp_path: Path, dsn: str) -> None:
    a = start(tmp_path / "a", dsn)
    try:
        b = start(tmp_path / "b", dsn)
        try:
            # A burst of 12 wrong tokens at A (the answers are held; the
            # failures are recorded as each token is compared).
            with ThreadPoolExecutor(12) as pool:
                statuses = list(pool.map(lambda _: guess(a), range(12)))
            assert statuses == [403] * 12
            checked_on_a = metric(a, "mailhub_auth_failures_total", surface="hooks",
                                  reason="wrong")
            assert checked_on_a >= 8
            assert metric(b, "mailhub_auth_failures_total", surface="hooks") == 0
            # Wait (bounded) until B has applied A's rows.
            deadline = time.monotonic() + 20
            while metric(b, "mailhub_throttle_shared_rows_total", direction="applied") < 1:
                assert time.monotonic() < deadline, "B never read A's failures"
                time.sleep(0.1)
            # One guess at B: refused unchecked, as if the burst had come to B.
            assert guess(b) == 403
            assert metric(b, "mailhub_auth_failures_total", surface="hooks",
                          reason="throttled") == 1
            assert metric(b, "mailhub_auth_failures_total", surface="hooks",
                          reason="wrong") == 0
            assert metric(a, "mailhub_throttle_shared_rows_total", direction="written") >= 1
        finally:
            b.stop()
    finally:
        a.stop()
    # The same single guess at an instance that shares nothing is checked.
    with throwaway_database() as other:
        c = start(tmp_path / "c", other)
        try:
            assert guess(c) == 403
            assert metric(c, "mailhub_auth_failures_total", surface="hooks",
                          reason="wrong") == 1
            assert metric(c, "mailhub_auth_failures_total", surface="hooks",
                          reason="throttled") == 0
        finally:
            c.stop()
