"""One large collector message and a small one behind it, on the embedded store.

Issue 11: a 1.28 MB message of 40,000 addresses was collected at 5.6
contacts/s (about 2 h), and a one-address message of another user sent after
it waited over 120 s. This sends such a message (``--addresses``, default
40,000) to a fresh embedded Radicale, then one second later a one-address
message for another user, and reports: the small message's latency, how
long the large one took and how it ended (collected up to ``[collector]
max_addresses``, then dead-lettered), the longest reactor stall (a 10 ms
LoopingCall probe), and the process's peak RSS.

Usage: ``.venv/bin/python bench/collector/large_message.py [--addresses 40000]
[--max-addresses 1000]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402

from mailhub.collector.carddav import BookLayout, CardDAVClient  # noqa: E402
from mailhub.collector.embedded import EmbeddedDAV  # noqa: E402
from mailhub.collector.engine import CollectorEngine  # noqa: E402
from mailhub.directory.model import User  # noqa: E402
from mailhub.metrics import Metrics  # noqa: E402
from mailhub.pubsub import Hub  # noqa: E402
from tests.collector.fakes import FakeUsers  # noqa: E402

ALICE = User(login="alice@example.org", emails=("alice@example.org",), id="A1")
BOB = User(login="bob@example.org", emails=("bob@example.org",), id="B2")


async def run(reactor: Any, addresses: int, max_addresses: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="mailhub-bench-"))
    users = FakeUsers([ALICE, BOB], {})
    embedded = EmbeddedDAV(reactor, folder / "dav", users, threads=4)
    embedded.startService()
    dav = CardDAVClient(embedded.http_client(), reactor, timeout=30)
    engine = CollectorEngine(users, dav, BookLayout.from_config(embedded.url, ""), Hub(),
                             Metrics(), reactor, max_addresses=max_addresses)
    stall = [0.0]
    last = [time.monotonic()]

    def probe() -> None:
        now = time.monotonic()
        stall[0] = max(stall[0], now - last[0] - 0.01)
        last[0] = now

    probing = task.LoopingCall(probe)
    probing.start(0.01)
    large = json.dumps({"userId": "A1", "emails": [
        "Person %d <p%d@example%d.org>" % (i, i, i % 50) for i in range(addresses)]}).encode()
    started = time.monotonic()
    ended: list[tuple[float, Any]] = []
    engine.handle(large).addBoth(lambda r: ended.append((time.monotonic() - started, r)))
    await task.deferLater(reactor, 1.0, lambda: None)
    sent = time.monotonic()
    await engine.handle(json.dumps({"userId": "B2", "emails": ["Ann <ann@y.org>"]}).encode())
    small = time.monotonic() - sent
    while not ended:
        await task.deferLater(reactor, 0.2, lambda: None)
    probing.stop()
    embedded.stopService()
    shutil.rmtree(folder, True)
    print(json.dumps({
        "large_message_bytes": len(large),
        "small_message_latency_s": round(small, 2),
        "large_message_s": round(ended[0][0], 1),
        "large_message_ended": str(getattr(ended[0][1], "value", ended[0][1]))[:160],
        "longest_reactor_stall_s": round(stall[0], 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addresses", type=int, default=40_000)
    parser.add_argument("--max-addresses", type=int, default=1000)
    args = parser.parse_args()
    task.react(lambda reactor: Deferred.fromCoroutine(
        run(reactor, args.addresses, args.max_addresses)))


if __name__ == "__main__":
    main()
