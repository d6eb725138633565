"""A bare twisted.web resource answering fixed bytes on a shared port (SO_REUSEPORT).

    python bench/processes/bare.py BODY_FILE PORT

The baseline of bench/processes/run.py: started once or twice on one port, it
shows what a second process gives the simplest Twisted server on this
machine, beside what it gives mailhub.
"""

from __future__ import annotations

import sys
from pathlib import Path
from twisted.internet import reactor
from twisted.web.server import Site

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent / "hooks"))

from mailhub.endpoints import server_endpoint  # noqa: E402
from serve import Bare  # noqa: E402  (bench/hooks' baseline: the same bytes and headers)


def main() -> None:
    body = Path(sys.argv[1]).read_bytes()
    endpoint = server_endpoint(reactor, "tcp:%s:interface=127.0.0.1:reuseport=yes" % sys.argv[2])
    site = Site(Bare(body))
    endpoint.listen(site).addCallback(lambda _: print("ready", flush=True))
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
