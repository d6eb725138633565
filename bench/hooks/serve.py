"""Serve mailhub's group hooks, or a bare twisted.web baseline, for bench/hooks/run.py.

    serve.py mailhub DSN PORT SITE_URL   the hooks in mailhub's own Site and Root,
                                         on the directory loaded from DSN
    serve.py bare FILE PORT              a bare twisted.web resource answering
                                         the bytes in FILE to every request

The mailhub mode is what ``twistd -n mailhub`` runs for the hooks (same
Site, Root, Directory and GroupHooks); run.py uses the real ``twistd`` when
it mounts the hooks and this script until then. Both modes print ``ready``
on stdout once they listen.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import Site


class Bare(Resource):
    """Answers the same bytes and headers as the search hook, and nothing else."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render(self, request: Any) -> bytes:
        request.content.read()
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return self.body

    render_GET = render_POST = render


def bare(path: str, port: int) -> None:
    with open(path, "rb") as f:
        body = f.read()
    reactor.listenTCP(port, Site(Bare(body)), interface="127.0.0.1")
    reactor.callWhenRunning(lambda: print("ready", flush=True))
    reactor.run()


def mailhub(dsn: str, port: int, site_url: str) -> None:
    from mailhub.config import Config, DatabaseSection, MailhubSection
    from mailhub.directory.service import Directory
    from mailhub.directory.sql import StoreService
    from mailhub.metrics import Metrics
    from mailhub.pubsub import Hub
    from mailhub.web.hooks import GroupHooks
    from mailhub.web.site import MailhubSite, Root

    config = Config(mailhub=MailhubSection(site_url=site_url), database=DatabaseSection(dsn=dsn))
    database = StoreService(config.dsn, config.mailhub.site_id, reactor)
    database.startService()
    directory = Directory(database.store, reactor, config.database.poll_interval)
    metrics = Metrics()
    hooks = GroupHooks(directory, config, metrics, Hub())
    resource = hooks.resource()
    root = Root(metrics, {name: resource for name in GroupHooks.paths})
    site = MailhubSite(root, config.mailhub.max_body)

    async def start() -> None:
        await directory.load()
        directory.startService()
        reactor.listenTCP(port, site, interface="127.0.0.1")
        print("ready", flush=True)

    d = Deferred.fromCoroutine(start())
    d.addErrback(lambda f: (f.printTraceback(), reactor.stop()))
    reactor.addSystemEventTrigger("before", "shutdown", database.stopService)
    reactor.run()


if __name__ == "__main__":
    if sys.argv[1] == "bare":
        bare(sys.argv[2], int(sys.argv[3]))
    else:
        mailhub(sys.argv[2], int(sys.argv[3]), sys.argv[4])
