"""Service helpers: start-up that waits for the database, and ordered shutdown."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailhub.errors import Unavailable
from mailhub.service import AfterReady, InOrder


class Recording(Service):
    def __init__(self, name: str, log: list[str], stop_with: "Deferred[None] | None" = None) -> None:
        self.setName(name)
        self.log = log
        self.stop_with = stop_with

    def startService(self) -> None:
        super().startService()
        self.log.append("start " + self.name)

    def stopService(self) -> Any:
        super().stopService()
        self.log.append("stop " + self.name)
        return self.stop_with


class InOrderTests(SynchronousTestCase):
    def test_stops_one_by_one_in_reverse_waiting_for_each(self) -> None:
        log: list[str] = []
        draining: Deferred[None] = Deferred()
        top = InOrder()
        for service in (Recording("pools", log), Recording("broker", log, draining),
                        Recording("web", log)):
            service.setServiceParent(top)
        top.startService()
        stopped = top.stopService()
        self.assertEqual(log, ["start pools", "start broker", "start web",
                               "stop web", "stop broker"])
        self.assertNoResult(stopped)
        draining.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(log[-1], "stop pools")


class AfterReadyTests(SynchronousTestCase):
    def test_children_start_only_once_preparation_succeeds_retrying_with_backoff(self) -> None:
        clock = Clock()
        attempts: list[int] = []

        async def prepare() -> None:
            attempts.append(1)
            if len(attempts) < 3:
                raise Unavailable("database unreachable")

        log: list[str] = []
        ready = AfterReady(prepare, clock, policy=lambda attempt: 2.0)
        Recording("web", log).setServiceParent(ready)
        ready.startService()
        self.assertEqual(log, [])
        clock.advance(2)
        self.assertEqual(log, [])
        clock.advance(2)
        self.assertEqual(log, ["start web"])
        self.assertEqual(len(attempts), 3)
        self.successResultOf(ready.ready)
        self.flushLoggedErrors()

    def test_stopping_before_ready_cancels_the_retry(self) -> None:
        clock = Clock()

        async def prepare() -> None:
            raise Unavailable("database unreachable")

        log: list[str] = []
        ready = AfterReady(prepare, clock, policy=lambda attempt: 2.0)
        Recording("web", log).setServiceParent(ready)
        ready.startService()
        ready.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(log, [])
