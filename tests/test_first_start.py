"""A first start, as ``twistd mailhub`` wires it: ready once the schema, the groups
and the tokens are read, while the directory's table is still being built; every
surface answers meanwhile (the lists from the database), and what needs the table
in memory (the collector's consumer) starts once it is there."""

from __future__ import annotations

import json
import shutil
import tempfile
from typing import Any, Iterator
from urllib.parse import urlencode

import treq
from twisted.application.service import IServiceCollection
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from mailhub.config import CollectorSection, Config, MailhubSection
from mailhub.directory.model import Email, Group, Profile
from mailhub.directory.service import Directory
from mailhub.directory.sql import SQLStore, dialect_for
from mailhub.service import AfterReady, Listening
from mailhub.tap import build
from tests.support.deferreds import result

TOKEN = "0123456789abcdefghijABCDEFGHIJ01"
FORM = {b"content-type": [b"application/x-www-form-urlencoded"]}


def services(parent: Any) -> Iterator[Any]:
    for child in parent:
        yield child
        if IServiceCollection.providedBy(child):
            yield from services(child)


class FirstStartTests(TestCase):
    def setUp(self) -> None:
        data = tempfile.mkdtemp(prefix="mailhub-first-start-")
        self.addCleanup(shutil.rmtree, data, True)
        self.config = Config(mailhub=MailhubSection(data=data, site_url="https://site.example/"),
                             collector=CollectorSection(enabled=False))
        store = SQLStore(dialect_for(self.config.dsn))
        result(store.migrate())
        result(store.set_token(TOKEN))
        result(store.create_group(Group("example", "Example")))
        self.members = []
        for n in range(1500):
            pid = "%sx%04d" % ("aB"[n % 2], n)
            result(store.create_profile(Profile(pid, "P %d" % n, None, (
                Email("p%d@example.com" % n, True, True),))))
            if n % 3:
                result(store.add_member("example", pid))
                self.members.append(pid)
        store.close_all()
        self.members.sort(key=str.encode)

    async def test_ready_and_answering_in_full_while_the_table_loads(self) -> None:
        top = build(self.config, "tcp:0:interface=127.0.0.1", reactor)
        every = list(services(top))
        [directory] = [s for s in every if isinstance(s, Directory)]
        [table] = [s for s in every if isinstance(s, AfterReady)
                   and getattr(s.prepare, "__self__", None) is directory]
        [ready] = [s for s in every if isinstance(s, AfterReady) and table in list(s)]
        [web] = [s for s in every if isinstance(s, Listening)]
        # The table's load waits for the test (a first start at a million
        # profiles: about 11 s of a child process's work).
        held: Deferred[None] = Deferred()
        load = table.prepare

        async def slow_load() -> None:
            await held
            await load()

        table.prepare = slow_load
        top.privilegedStartService()
        top.startService()
        self.addCleanup(top.stopService)
        self.addCleanup(lambda: held.called or held.callback(None))
        await ready.ready
        port = (await web._waitingForPort).getHost().port
        base = "http://127.0.0.1:%d" % port

        response = await treq.get(base + "/healthz?ready", persistent=False)
        state = json.loads(await response.content())
        self.assertEqual(response.code, 200, state)
        self.assertIn("table is loading", state["dependencies"]["startup"]["detail"])
        self.assertFalse(directory.loaded)

        async def users() -> Any:
            body = urlencode({"token": TOKEN, "users": ""}).encode()
            response = await treq.post(base + "/gs-site-member-list.json", body, headers=FORM,
                                     persistent=False)
            self.assertEqual(response.code, 200)
            return json.loads(await response.content())

        self.assertEqual(await users(), self.members)
        held.callback(None)
        await table.ready
        self.assertTrue(directory.loaded)
        self.assertEqual(await users(), self.members)
        await deferLater(reactor, 1.1, lambda: None)  # /healthz reuses results for 1 s
        response = await treq.get(base + "/healthz?ready", persistent=False)
        state = json.loads(await response.content())
        self.assertEqual(state["dependencies"]["startup"]["detail"], "done")

    def test_the_collectors_consumer_starts_once_the_table_is_loaded(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from mailhub.pubsub.wiring import Resume

        config = Config(mailhub=self.config.mailhub)  # the collector enabled
        top = build(config, "tcp:0:interface=127.0.0.1", MemoryReactorClock())
        every = list(services(top))
        [directory] = [s for s in every if isinstance(s, Directory)]
        [table] = [s for s in every if isinstance(s, AfterReady)
                   and getattr(s.prepare, "__self__", None) is directory]
        self.assertEqual([type(s) for s in table], [Resume])
