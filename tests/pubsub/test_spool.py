"""The spool-backed work queue (no broker): retries, dead letters, restarts."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailhub.errors import Unavailable, ValidationError
from mailhub.metrics import Metrics
from mailhub.pubsub.interfaces import IWorkQueue
from mailhub.pubsub.retry import RetryPolicy
from mailhub.pubsub.spool import Spool, SpoolQueue


def queue(handler: Callable[[bytes], Any], clock: Clock, folder: Path,
          **kw: Any) -> SpoolQueue:
    """A consuming SpoolQueue on ``folder``."""
    made = SpoolQueue("collector:email", Spool(folder), clock, **kw)
    made.consume(handler)
    return made


class SpoolQueueTests(SynchronousTestCase):
    """Moved from the collector's dispatcher tests, with the same assertions."""

    def test_transient_failures_are_retried_with_backoff(self) -> None:
        clock = Clock()
        calls: list[bytes] = []

        def handler(body: bytes) -> Any:
            calls.append(body)
            return fail(Unavailable("down")) if len(calls) < 3 else succeed(None)

        d = queue(handler, clock, self.folder(), policy=RetryPolicy(1, 10))
        self.successResultOf(d.publish(b"m"))
        self.assertEqual(len(calls), 1)
        clock.advance(1)
        self.assertEqual(len(calls), 2)
        clock.advance(1.5)
        self.assertEqual(len(calls), 2)
        clock.advance(0.5)
        self.assertEqual(len(calls), 3)
        self.assertEqual(d.held, 0)

    def test_poison_is_dropped_and_a_full_dispatcher_pushes_back(self) -> None:
        metrics = Metrics()
        d = queue(lambda b: fail(ValidationError("bad")), Clock(), self.folder(), limit=1,
                  metrics=metrics)
        self.successResultOf(d.publish(b"x"))
        self.assertEqual(d.held, 0)
        self.assertEqual(metrics.value("mailhub_collector_dropped_total", {"reason": "poison"}), 1)
        stuck = queue(lambda b: fail(Unavailable("x")), Clock(), self.folder(), limit=1)
        stuck.publish(b"x")
        self.failureResultOf(stuck.publish(b"y"), Unavailable)
        stuck.stop()

    def folder(self) -> Path:
        """A spool folder outside the work tree, removed after the test."""
        top = Path(tempfile.mkdtemp(prefix="mailhub-spool-"))
        self.addCleanup(shutil.rmtree, top, True)
        return top / "spool"

    def spooled(self, handler: Callable[[bytes], Any], **kw: Any) -> tuple[Any, Any]:
        folder = self.folder()
        made = queue(handler, kw.pop("clock", Clock()), folder, **kw)
        return made, made.spool

    def test_a_message_is_on_disk_until_it_is_collected(self) -> None:
        answers: list[Deferred[None]] = []
        d, spool = self.spooled(lambda body: answers.append(Deferred()) or answers[-1])
        self.successResultOf(d.publish(b'{"m": 1}'))
        [(name, body)] = spool.messages()
        self.assertEqual(body, b'{"m": 1}')
        answers[0].callback(None)
        self.assertEqual(spool.messages(), [])
        self.assertEqual(list(spool.dead_folder.iterdir()), [])

    def test_a_message_held_for_a_retry_survives_a_stop_and_is_collected_next_time(
            self) -> None:
        clock = Clock()
        d, spool = self.spooled(lambda body: fail(Unavailable("down")), clock=clock)
        self.successResultOf(d.publish(b"first"))
        self.successResultOf(d.publish(b"second"))
        d.stop()
        self.assertEqual([body for _, body in spool.messages()], [b"first", b"second"])
        # The next process, on the same folder; a half-written file is dropped.
        (spool.folder / "junk.tmp").write_bytes(b"half")
        seen: list[bytes] = []
        again = queue(lambda body: succeed(seen.append(body)), Clock(), spool.folder)
        self.assertEqual(again.recover(), 2)
        self.assertEqual(seen, [b"first", b"second"])
        self.assertEqual(list(spool.folder.glob("*.msg")) + list(spool.folder.glob("*.tmp")),
                         [])
        self.assertEqual(again.recover(), 0)

    def test_recover_leaves_alone_what_this_process_is_collecting(self) -> None:
        answers: list[Deferred[None]] = []
        d, spool = self.spooled(lambda body: answers.append(Deferred()) or answers[-1])
        d.publish(b"running")
        self.assertEqual(d.recover(), 0)
        self.assertEqual(len(answers), 1)
        answers[0].callback(None)

    def test_a_message_failing_while_stopping_is_not_tried_again_but_kept(self) -> None:
        clock = Clock()
        answers: list[Deferred[None]] = []
        d, spool = self.spooled(lambda body: answers.append(Deferred()) or answers[-1],
                                clock=clock)
        d.publish(b"running")
        d.stop()
        answers[0].errback(Unavailable("down"))
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(d.held, 0)
        self.assertEqual([body for _, body in spool.messages()], [b"running"])

    def test_recovered_messages_start_as_room_allows_under_the_limit(self) -> None:
        folder = self.folder()
        left = Spool(folder)
        for n in range(5):
            left.keep(b"m%d" % n)
        answers: list[Deferred[None]] = []
        metrics = Metrics()
        d = queue(lambda body: answers.append(Deferred()) or answers[-1],
                  Clock(), folder, limit=2, metrics=metrics)
        self.assertEqual(d.recover(), 5)
        self.assertEqual((len(answers), d.held), (2, 2))
        self.assertEqual(metrics.value("mailhub_collector_held"), 5)
        self.failureResultOf(d.publish(b"new"), Unavailable)  # the limit holds for new ones too
        for n in range(5):
            answers[n].callback(None)
        self.assertEqual((len(answers), d.held, left.messages()), (5, 0, []))

    def test_poison_is_kept_in_dead_with_its_reason(self) -> None:
        live = Metrics()
        d, spool = self.spooled(lambda body: fail(ValidationError("unknown user (x)")),
                                metrics=live)
        self.successResultOf(d.publish(b"poison"))
        self.assertEqual(spool.messages(), [])
        [reason] = spool.dead_folder.glob("*.reason")
        self.assertEqual(reason.read_text(), "unknown user (x)\n")
        self.assertEqual(reason.with_suffix(".msg").read_bytes(), b"poison")
        self.assertEqual(live.value("mailhub_collector_spool_dead"), 1)
        metrics = Metrics()  # and the next process counts it too
        queue(lambda body: succeed(None), Clock(), spool.folder, metrics=metrics)
        self.assertEqual(metrics.value("mailhub_collector_spool_dead"), 1)

    def test_a_disk_that_refuses_the_message_pushes_back(self) -> None:
        d, spool = self.spooled(lambda body: succeed(None))
        # The spool's folder is gone and a file stands in its place: every
        # write fails, as on a full or broken disk (also for root).
        shutil.rmtree(spool.folder)
        spool.folder.write_bytes(b"")
        self.failureResultOf(d.publish(b"m"), Unavailable)
        self.assertEqual(d.held, 0)

    def test_publish_keeps_bytes_as_they_are_and_encodes_the_rest_as_json(self) -> None:
        d, spool = self.spooled(lambda body: Deferred())
        self.successResultOf(d.publish(b"{}"))
        self.successResultOf(d.publish({"emails": ["a@x"]}))
        self.assertEqual([body for _, body in spool.messages()],
                         [b"{}", b'{"emails":["a@x"]}'])

    def test_it_is_a_work_queue(self) -> None:
        self.assertTrue(verifyObject(IWorkQueue, queue(lambda body: None, Clock(),
                                                       self.folder())))

    def test_resume_takes_up_what_an_earlier_run_left(self) -> None:
        folder = self.folder()
        Spool(folder).keep(b"left")
        seen: list[bytes] = []
        made = queue(lambda body: succeed(seen.append(body)), Clock(), folder)
        self.assertEqual(seen, [])
        made.resume()
        self.assertEqual(seen, [b"left"])

    def test_messages_published_before_a_consumer_wait_on_disk_for_it(self) -> None:
        made = SpoolQueue("q", Spool(self.folder()), Clock())
        self.successResultOf(made.publish(b"early"))
        seen: list[bytes] = []
        made.consume(lambda body: succeed(seen.append(body)))
        made.resume()
        self.assertEqual(seen, [b"early"])
        self.assertEqual(made.spool.messages(), [])

    def test_stop_ends_the_retries_of_messages_published_before_resume(self) -> None:
        clock = Clock()
        calls: list[bytes] = []
        made = queue(lambda body: fail(Unavailable(str(calls.append(body)))), clock,
                     self.folder())
        made.publish(b"early")
        made.resume()
        made.stop()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual((calls, made.held), ([b"early"], 0))
