"""``/api/v1/events`` for a user who is in LDAP only: a real slapd, a real listener."""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

from mailhub.config import Config, LDAPSection, PushSection
from mailhub.directory.ldap import LDAPService
from mailhub.directory.users import ChainedUserSource
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.web.events import EventStream
from tests.support import slapd as fixture


class LDAPEventStreamTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.server = fixture.shared()
        ldap = LDAPService(reactor, LDAPSection(**self.server.settings(timeout=2.0)),
                           threads=1)
        ldap.startService()
        self.addCleanup(ldap.stopService)
        self.hub = Hub()
        self.stream = EventStream(Config(push=PushSection(keepalive=5.0)), self.hub,
                                  Metrics(), ChainedUserSource([ldap.source]), reactor)
        self.addCleanup(self.stream.close)
        port = reactor.listenTCP(0, Site(self.stream.resource()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.url = "http://127.0.0.1:%d/api/v1/events" % port.getHost().port
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    async def _own_events_by_ldap_password(self) -> None:
        wrong = await treq.get(self.url, auth=("zoe", "not her password"), pool=self.pool)
        self.assertEqual(wrong.code, 401)
        await wrong.content()
        response = await treq.get(self.url, auth=("zoe", fixture.ZOE_PASSWORD),
                                  pool=self.pool, unbuffered=True)
        self.assertEqual(response.code, 200)
        chunks: list[bytes] = []
        ended = treq.collect(response, chunks.append)
        # Someone else's event, then one addressed by one of her LDAP mail values
        # (in another case): had the first reached her, it would come first.
        for user, subject in ((fixture.login(1), "not hers"),
                              ("z.orsted@example.test", "hers")):
            self.hub.local.topic("mail:new").publish({"user": user, "subject": subject})
        def subjects() -> list[str]:
            lines = b"".join(chunks).decode("utf-8").split("\n")
            return [json.loads(line[6:])["subject"] for line in lines
                    if line.startswith("data: ")]

        for _ in range(250):
            if subjects():
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.stream.close()
        await ended
        self.assertEqual(subjects(), ["hers"])

    def test_an_ldap_user_gets_their_own_events_with_their_ldap_password(self) -> Any:
        return Deferred.fromCoroutine(self._own_events_by_ldap_password())
