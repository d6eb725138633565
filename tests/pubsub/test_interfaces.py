"""Every pubsub implementation provides the interface its callers rely on."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.pubsub.globalpubsub import GlobalPubSub
from mailhub.pubsub.interfaces import IPubSub, ITopic, IWorkQueue
from mailhub.pubsub.local import LocalPubSub
from mailhub.pubsub.shared import LocalSharedSubscription
from mailhub.pubsub.spool import Spool, SpoolQueue
from mailhub.pubsub.workqueue import WorkQueue

from tests.pubsub.fakes import FakeBroker


class InterfaceTests(SynchronousTestCase):
    def test_the_local_pubsub_and_its_topics(self) -> None:
        pubsub = LocalPubSub()
        self.assertTrue(verifyObject(IPubSub, pubsub))
        self.assertTrue(verifyObject(ITopic, pubsub.topic("mail:new")))

    def test_the_global_pubsub_and_its_topics(self) -> None:
        pubsub = GlobalPubSub(FakeBroker())  # type: ignore[arg-type]
        self.assertTrue(verifyObject(IPubSub, pubsub))
        self.assertTrue(verifyObject(ITopic, pubsub.topic("mail:new")))

    def test_the_rabbitmq_work_queue(self) -> None:
        broker = FakeBroker()
        queue = WorkQueue(broker.outbox, "collector:email", Clock(), metrics=Metrics())
        self.assertTrue(verifyObject(IWorkQueue, queue))

    def test_the_spool_work_queue(self) -> None:
        folder = Path(tempfile.mkdtemp(prefix="mailhub-spool-"))
        self.addCleanup(shutil.rmtree, folder, True)
        queue = SpoolQueue("collector:email", Spool(folder), Clock(), metrics=Metrics())
        self.assertTrue(verifyObject(IWorkQueue, queue))

    def test_the_shared_subscription_without_a_broker(self) -> None:
        queue = LocalSharedSubscription(LocalPubSub(), "calendar:event:created",
                                        "mailhub:calendar:event:created", Clock())
        self.assertTrue(verifyObject(IWorkQueue, queue))

    def test_a_hub_without_a_broker_has_one_pubsub(self) -> None:
        hub = Hub()
        self.assertIs(hub.global_, hub.local)
        self.assertTrue(verifyObject(IPubSub, hub.global_))
