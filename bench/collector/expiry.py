"""Retention benchmark: how long a full expiry pass takes, against the embedded store.

The embedded store is Radicale in process (mailhub.collector.embedded), as
``twistd mailhub`` runs it by default. Set-up writes the books straight into
Radicale's folder (``collection-root/{user}/collected/{uuid}.vcf`` and the
book's ``.Radicale.props``), as mailhub would have written them over the
months: 200 collected contacts per user by default, their ranking spread
over the last 120 days, one in ten edited by its user (a TEL added). Writing
2,000,000 cards through PUTs would take Radicale days; writing the files
takes minutes, and the pass reads them through Radicale all the same.

Then, for each scale (users), two passes of :class:`Retention` with
``expire_days = 90`` and ``max_contacts = 150``, timed:

1. removing: every user has contacts to remove (expired, over the cap);
2. steady: nothing is left to remove (what a daily pass meets: only what
   expired since yesterday).

Before them, one read of every book builds Radicale's item cache
(``.Radicale.cache``; timed apart, as ``read_all_first_s``), which a running
site has already.

A baseline beside each pass: the same reads with no rules applied, one
plain addressbook-query per book through the same client (what any pass
must at least cost), so the ratio says what deciding and deleting add.

The curve over the scales is printed, with a linear extrapolation to
10,000 users (``--target``). Usage::

    .venv/bin/python bench/collector/expiry.py --users 25 100 400 [--cards 200]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.defer import Deferred, DeferredSemaphore  # noqa: E402

from mailhub.collector.carddav import BookLayout, CardDAVClient  # noqa: E402
from mailhub.collector.embedded import EmbeddedDAV  # noqa: E402
from mailhub.collector.retention import Retention  # noqa: E402
from mailhub.collector.vcard import Contact, contact_uuid, to_vcard  # noqa: E402
from mailhub.directory.model import User  # noqa: E402
from mailhub.metrics import Metrics  # noqa: E402
from tests.collector.fakes import FakeUsers  # noqa: E402

NOW = datetime(2026, 12, 1, tzinfo=timezone.utc)
PROPS = '{"D:displayname": "Collected contacts", "tag": "VADDRESSBOOK"}'


class PagedUsers(FakeUsers):
    """FakeUsers that pages as the real user sources do."""

    async def pages(self, page_size: int) -> Any:
        for start in range(0, len(self.users), page_size):
            yield self.users[start:start + page_size]


def write_books(root: Path, users: list[User], cards: int, seed: int) -> int:
    """Write each user's collected book into Radicale's folder; the cards written."""
    rnd = random.Random(seed)
    written = 0
    for user in users:
        book = root / "collection-root" / user.login / "collected"
        book.mkdir(parents=True)
        (book / ".Radicale.props").write_text(PROPS)
        for i in range(cards):
            email = "c%d.%s" % (i, user.login)
            first = NOW - timedelta(days=rnd.uniform(30, 400))
            last = NOW - timedelta(days=rnd.uniform(0, 120))
            text = to_vcard(Contact(uid=contact_uuid(email), email=email, fn="Contact %d" % i,
                                    family="%d" % i, given="Contact", rev=first,
                                    source="mail", ref="<m%d@x.org>" % i,
                                    note="Collected automatically from sent mail.",
                                    count=rnd.randint(1, 40), last_used=last))
            if i % 10 == 0:  # edited by its user: kept whatever its age
                text = text.replace("END:VCARD", "TEL;TYPE=cell:+1 555 01%02d\r\nEND:VCARD"
                                    % (i % 100))
            (book / (contact_uuid(email) + ".vcf")).write_text(text, newline="")
            written += 1
    return written


async def read_all(dav: CardDAVClient, layout: BookLayout, users: list[User]) -> float:
    """Baseline: one addressbook-query of every book, same concurrency as the pass."""
    started = time.monotonic()
    window = DeferredSemaphore(2)
    ds = [window.run(lambda u=u: Deferred.fromCoroutine(dav.all_cards(layout.book(u))))
          for u in users]
    await defer.gatherResults(ds, consumeErrors=True)
    return time.monotonic() - started


async def one_scale(reactor: Any, n_users: int, cards: int, threads: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="mailhub-bench-expiry-"))
    try:
        users = [User(login="u%05d@example.org" % i, emails=("u%05d@example.org" % i,),
                      id="U%d" % i) for i in range(n_users)]
        started = time.monotonic()
        total = write_books(folder / "dav", users, cards, seed=n_users)
        setup = time.monotonic() - started
        source = PagedUsers(users)
        embedded = EmbeddedDAV(reactor, folder / "dav", source, threads=threads)
        embedded.startService()
        try:
            metrics = Metrics()
            dav = CardDAVClient(embedded.http_client(), reactor, timeout=300, metrics=metrics)
            layout = BookLayout.from_config(embedded.url, "")

            class Fixed:
                """The pass's clock: NOW."""

                def seconds(self) -> float:
                    return NOW.timestamp()

                def callLater(self, *a: Any, **kw: Any) -> Any:
                    return reactor.callLater(*a, **kw)

            retention = Retention(source, dav, layout, Fixed(), max_contacts=150,  # type: ignore
                                  expire_days=90, metrics=metrics)
            # The first read parses every card and builds Radicale's item
            # cache (.Radicale.cache), which a running site has already.
            cold_base = await read_all(dav, layout, users)
            first = await retention.run_pass()
            warm_base = await read_all(dav, layout, users)
            second = await retention.run_pass()
        finally:
            embedded.stopService()
        return {
            "users": n_users, "cards": total, "setup_s": round(setup, 1),
            "read_all_first_s": round(cold_base, 2),
            "pass_removing_s": round(first.seconds, 2),
            "removed": first.expired + first.over_limit,
            "expired": first.expired, "over_limit": first.over_limit,
            "users_own": first.users_own,
            "read_all_s": round(warm_base, 2),
            "pass_steady_s": round(second.seconds, 2),
            "removed_steady": second.expired + second.over_limit,
            "steady_vs_read_all": round(second.seconds / warm_base, 2) if warm_base else None,
            "ms_per_user_steady": round(1000 * second.seconds / n_users, 2),
            "ms_per_user_removing": round(1000 * first.seconds / n_users, 2),
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def main(reactor: Any, scales: list[int], cards: int, target: int,
               threads: int) -> None:
    results = []
    for n in scales:
        result = await one_scale(reactor, n, cards, threads)
        print(json.dumps(result), flush=True)
        results.append(result)
    # Linear in users (each book is read on its own): extrapolate from the largest.
    big = results[-1]
    print(json.dumps({
        "extrapolated_users": target,
        "extrapolated_cards": target * cards,
        "pass_steady_s": round(big["ms_per_user_steady"] * target / 1000, 0),
        "pass_removing_s": round(big["ms_per_user_removing"] * target / 1000, 0),
        "from_scale": big["users"],
        "curve_ms_per_user_steady": [r["ms_per_user_steady"] for r in results],
        "curve_ms_per_user_removing": [r["ms_per_user_removing"] for r in results],
    }, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="+", default=[25, 100, 400])
    parser.add_argument("--cards", type=int, default=200)
    parser.add_argument("--target", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    task.react(lambda reactor: Deferred.fromCoroutine(
        main(reactor, args.users, args.cards, args.target, args.threads)))
