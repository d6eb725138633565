"""The servers of bench/events/run.py: mailhub's event streams, or a bare twisted.web one.

    python bench/events/serve.py mailhub PORT KEEPALIVE
    python bench/events/serve.py bare PORT

``mailhub``: mailhub's own MailhubSite, Root, PushReceiver (the Dovecot OX
endpoint) and EventStream, wired as tap.py wires them, without a broker
(global topics stay in the process). Users log in with a password checked
by a stand-in user source that compares it at once: argon2 would make
opening 10,000 streams take minutes of hashing, which is not what this
measures (doc/performance.rst says so). ``bare``: a plain twisted.web
resource that holds each GET open, indexed by the Basic login, and writes
each OX notification's JSON to that user's streams as one SSE frame.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

PASSWORD = "bench-password"
PUSH_USER, PUSH_PASSWORD = "dovecot", "bench-secret"


class QuickUsers:
    """A user source whose check costs nothing: every ``uN@example.org``, one password."""

    async def authenticate(self, login: str, password: str) -> Any:
        from mailhub.directory.model import User

        if password == PASSWORD and login.endswith("@example.org"):
            return User(login=login, name=login, emails=(login,))
        return None


def mailhub(port: int, keepalive: float) -> None:
    from mailhub.auth import Auth
    from mailhub.config import Config, MailhubSection, PushSection
    from mailhub.metrics import Metrics
    from mailhub.pubsub import Hub
    from mailhub.web.events import EventStream
    from mailhub.web.push import PushReceiver
    from mailhub.web.site import MailhubSite, Root

    config = Config(mailhub=MailhubSection(max_connections=20_000),
                    push=PushSection(username=PUSH_USER, password=PUSH_PASSWORD,
                                     keepalive=keepalive))
    metrics = Metrics()
    hub = Hub()
    auth = Auth(reactor, metrics, hub)
    root = Root(metrics)
    push = PushReceiver(config, hub, metrics, reactor, auth=auth)
    events = EventStream(config, hub, metrics, QuickUsers(), reactor, auth=auth)
    root.mount(b"preliminary", push.resource())
    root.mount(b"api", events.resource())
    site = MailhubSite(root, config.mailhub.max_body,
                       max_connections=config.mailhub.max_connections, metrics=metrics)
    reactor.listenTCP(port, site, backlog=1024, interface="127.0.0.1")
    reactor.callWhenRunning(lambda: print("ready", flush=True))
    reactor.run()


class BareStreams(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.streams: dict[str, set[Any]] = {}
        self.seq = 0

    def render_GET(self, request: Any) -> Any:
        header = request.getHeader(b"authorization") or b""
        login = base64.b64decode(header.split()[-1]).decode().split(":")[0]
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.write(b"retry: 5000\n: connected\n\n")
        self.streams.setdefault(login, set()).add(request)
        request.notifyFinish().addBoth(lambda _: self.streams[login].discard(request))
        return NOT_DONE_YET

    def render_POST(self, request: Any) -> bytes:
        data = json.loads(request.content.read())
        self.seq += 1
        frame = b"id: %d\nevent: mail:new\ndata: %s\n\n" % (self.seq, json.dumps(data).encode())
        for stream in self.streams.get(data["user"], ()):
            stream.write(frame)
        return b""


def bare(port: int) -> None:
    reactor.listenTCP(port, Site(BareStreams()), backlog=1024, interface="127.0.0.1")
    reactor.callWhenRunning(lambda: print("ready", flush=True))
    reactor.run()


if __name__ == "__main__":
    if sys.argv[1] == "bare":
        bare(int(sys.argv[2]))
    else:
        mailhub(int(sys.argv[2]), float(sys.argv[3]))
