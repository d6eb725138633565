"""Cost of the collector's exclusions on its hot path: Exclusions.reason per address.

Every address of every collector message is checked (before any lookup), so
this is what the exclusions add to re-collecting a known address. Checked:
the default patterns, ``--globs`` site patterns, ``--domains`` domains and
``--lists`` mailing-list addresses, on a mix of ordinary and excluded
addresses.

Usage: ``.venv/bin/python bench/collector/exclusions.py [--globs 20] [--domains 10]
[--lists 1000] [--n 200000]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mailhub.collector.rules import Exclusions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--globs", type=int, default=20)
    parser.add_argument("--domains", type=int, default=10)
    parser.add_argument("--lists", type=int, default=1000)
    parser.add_argument("--n", type=int, default=200_000)
    args = parser.parse_args()
    lists = ["group%d@lists.example.org" % i for i in range(args.lists)]
    rules = Exclusions(patterns=["alerts%d-*@*" % i for i in range(args.globs)],
                       domains=["spam%d.example" % i for i in range(args.domains)],
                       lists=lambda: lists)
    sample = ["user%d@example.com" % i for i in range(90)] + [
        "noreply@shop.example", "bounces+a=b.org@lists.x.org", "group7@lists.example.org",
        "x@mx.spam3.example", "alerts4-db@x.org", "jean-luc.picard@starfleet.example",
        "a+b@x.org", "postmaster@x.org", "prvs=12ab=bob@x.org", "Ann.Lee@example.com"]
    addresses = (sample * (args.n // len(sample) + 1))[:args.n]
    excluded = sum(1 for a in sample if rules.reason(a))
    start = time.perf_counter()
    for address in addresses:
        rules.reason(address)
    elapsed = time.perf_counter() - start
    print("%d addresses (%d of every %d excluded): %.2f us per address, %.0f addresses/s"
          % (args.n, excluded, len(sample), elapsed / args.n * 1e6, args.n / elapsed))


if __name__ == "__main__":
    main()
