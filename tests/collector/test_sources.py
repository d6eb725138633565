"""Sources: sent mail, ESN calendar events, the iCalendar HTTP surface, dispatchers."""

from __future__ import annotations

import json
from typing import Any, Callable

from treq.testing import StubTreq
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailhub.auth import Auth, SiteToken
from mailhub.collector.sources import (
    CalendarSource, MailSource, folder_matches, ical_addresses, jcal_addresses)
from mailhub.config import Config
from mailhub.errors import Unavailable, ValidationError
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.pubsub.local import LocalPubSub
from mailhub.pubsub.outbox import Route
from mailhub.pubsub.shared import LocalSharedSubscription
from mailhub.pubsub.wiring import make_pubsub
from mailhub.pubsub.workqueue import REASON_HEADER, WorkQueue
from mailhub.web.calendar import CalendarCollect

from tests.pubsub.fakes import FakeBroker, FakeChannel, FakeDelivery

ICS = """BEGIN:VCALENDAR\r
VERSION:2.0\r
PRODID:-//test//EN\r
BEGIN:VEVENT\r
UID:1\r
DTSTAMP:20240101T000000Z\r
DTSTART:20240101T100000Z\r
ORGANIZER;CN="Doe, Jane":mailto:jane@x.org\r
ATTENDEE;CN=Bob Smith;PARTSTAT=ACCEPTED:mailto:bob@x.org\r
ATTENDEE;CUTYPE=RESOURCE;CN=Projector:mailto:projector@x.org\r
ATTENDEE;CUTYPE=ROOM;CN=Room 1:mailto:room1@x.org\r
ATTENDEE:MAILTO:plain@x.org\r
END:VEVENT\r
END:VCALENDAR\r
"""

JCAL = ["vcalendar", [], [["vevent", [
    ["uid", {}, "text", "1"],
    ["organizer", {"cn": "Jane"}, "cal-address", "mailto:jane@x.org"],
    ["attendee", {"cn": "Bob", "partstat": "NEEDS-ACTION"}, "cal-address", "mailto:bob@x.org"],
    ["attendee", {"cutype": "RESOURCE"}, "cal-address", "mailto:room@x.org"],
    ["attendee", {}, "cal-address", "mailto:bob@x.org"],
], []]]]


def local_shared(hub: Hub) -> Callable[[str], LocalSharedSubscription]:
    """Shared subscriptions as PubSub gives them without a broker."""
    return lambda topic: LocalSharedSubscription(hub.global_, topic, "mailhub:" + topic,
                                                 Clock())


class Recorder:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def publish(self, body: bytes) -> Any:
        self.bodies.append(json.loads(body))
        return succeed(None)


class MailSourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.hub = Hub()
        self.out = Recorder()
        MailSource(self.hub, self.out, ["Sent", "Sent Items"]).start()

    def append(self, **data: Any) -> None:
        self.successResultOf(self.hub.local.topic("mail:append").publish(data))

    def test_recipients_of_a_sent_message_are_submitted(self) -> None:
        self.append(user="alice@example.org", mailbox="INBOX/Sent",
                    to='"Doe, J" <j@y.org>, k@z.org', to_address="j@y.org")
        # source: issue 13's provenance (the card says it came from sent mail).
        self.assertEqual(self.out.bodies, [{"userEmail": "alice@example.org",
                                            "emails": ['"Doe, J" <j@y.org>, k@z.org'],
                                            "source": "mail"}])

    def test_other_folders_are_ignored(self) -> None:
        self.append(user="a@x.org", mailbox="INBOX", to="j@y.org")
        self.append(user="a@x.org", mailbox="Drafts", to="j@y.org")
        self.assertEqual(self.out.bodies, [])

    def test_special_use_sent_counts_whatever_the_name(self) -> None:
        self.append(user="a@x.org", mailbox="Gesendet", special_use=["\\Sent"], to="j@y.org")
        self.assertEqual(len(self.out.bodies), 1)

    def test_first_address_fields_are_the_fallback(self) -> None:
        self.append(user="a@x.org", mailbox="sent items", to_address="j@y.org",
                    to_display_name="J Y")
        self.assertEqual(self.out.bodies[0]["emails"], ['"J Y" <j@y.org>'])

    def test_folder_matching(self) -> None:
        self.assertTrue(folder_matches("INBOX.Sent", ["sent"]))
        self.assertTrue(folder_matches("Sent Items", ["Sent Items"]))
        self.assertFalse(folder_matches("Sent Items", ["Sent"]))
        self.assertFalse(folder_matches("Unsent", ["Sent"]))


class CalendarSourceTests(SynchronousTestCase):
    def test_attendees_and_organizer_without_resources_with_names(self) -> None:
        self.assertEqual(jcal_addresses(JCAL), ['"Jane" <jane@x.org>', '"Bob" <bob@x.org>',
                                                "bob@x.org"])
        self.assertEqual(ical_addresses(ICS), ['"Doe, Jane" <jane@x.org>',
                                               '"Bob Smith" <bob@x.org>', "plain@x.org"])

    def test_events_on_the_global_topics_are_submitted_unless_imported(self) -> None:
        global_ = LocalPubSub()
        hub = Hub(LocalPubSub(), global_)
        out = Recorder()
        CalendarSource(out, local_shared(hub)).start()
        event = {"eventPath": "/calendars/U1/cal/1.ics", "event": JCAL, "import": False}
        self.successResultOf(global_.topic("calendar:event:created").publish(event))
        self.successResultOf(global_.topic("calendar:event:updated").publish(
            dict(event, **{"import": True})))
        self.successResultOf(global_.topic("calendar:event:updated").publish({"nonsense": 1}))
        self.assertEqual(len(out.bodies), 1)
        self.assertEqual(out.bodies[0]["userId"], "U1")

    def test_without_a_broker_the_events_come_from_the_local_global_topics(self) -> None:
        made = make_pubsub(Config(), Clock(), Metrics())
        out = Recorder()
        CalendarSource(out, made.shared_subscription).start()
        event = {"eventPath": "/calendars/U1/cal/1.ics", "event": JCAL}
        self.successResultOf(made.hub.global_.topic("calendar:event:updated").publish(event))
        self.assertEqual([b["userId"] for b in out.bodies], ["U1"])

    def test_junk_icalendar_is_a_validation_error(self) -> None:
        self.assertRaises(ValidationError, ical_addresses, "hello")
        self.assertRaises(ValidationError, ical_addresses, "BEGIN:VCALENDAR\r\nBROKEN")


class CalendarWebTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.out = Recorder()
        self.clock, self.metrics = Clock(), Metrics()
        token = SiteToken(Auth(self.clock, self.metrics), "calendar",
                          lambda t: succeed(t == "s3cret"))
        self.web = CalendarCollect(self.out, token, max_body=4096)
        self.http = StubTreq(self.web.resource())

    def post(self, query: str, body: str, headers: dict[str, str] | None = None) -> Any:
        response = self.successResultOf(self.http.post(
            "http://x/collector/v1/calendar" + query, data=body.encode("utf-8"),
            headers=headers or {"Content-Type": "text/calendar"}))
        return response.code, json.loads(self.successResultOf(response.content()))

    def test_a_control_character_in_the_user_or_token_is_400(self) -> None:
        for query in ("?user=%00&token=s3cret", "?user=a%01b@example.org&token=s3cret",
                      "?user=alice@example.org&token=s3cret%00"):
            code, answer = self.post(query, ICS)
            self.assertEqual(code, 400, query)
            self.assertIn("control character", answer["error"])
        self.assertEqual(self.out.bodies, [])

    def test_attendees_are_submitted_for_the_named_user(self) -> None:
        code, answer = self.post("?user=alice@example.org&token=s3cret", ICS)
        self.assertEqual(code, 202)
        self.assertEqual(len(answer["emails"]), 3)
        self.assertEqual(self.out.bodies[0]["userEmail"], "alice@example.org")

    def test_bearer_token(self) -> None:
        code, _ = self.post("?user=a", ICS, {"Authorization": "Bearer s3cret"})
        self.assertEqual(code, 202)

    def test_bad_token_missing_user_junk_and_oversize(self) -> None:
        self.assertEqual(self.post("?user=a&token=wrong", ICS)[0], 403)
        self.assertEqual(self.post("?user=a", ICS)[0], 403)
        self.assertEqual(self.post("?token=s3cret", ICS)[0], 400)
        code, answer = self.post("?user=a&token=s3cret", "not a calendar")
        self.assertEqual(code, 400)
        self.assertIn("iCalendar", answer["error"])
        self.assertEqual(self.post("?user=a&token=s3cret", "x" * 5000)[0], 413)
        self.assertEqual(self.out.bodies, [])


class Flaky(Recorder):
    """A collector queue whose first ``failures`` publications fail as a full outbox does."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.attempts = 0

    def publish(self, body: bytes) -> Any:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise Unavailable("the outbox is full")
        return super().publish(body)


class SharedCalendarQueueTests(SynchronousTestCase):
    """With a broker: one shared queue per calendar topic, not a copy per instance."""

    EVENT = json.dumps({"eventPath": "/calendars/U1/cal/1.ics", "event": JCAL}).encode()

    def start(self, dispatcher: Any) -> None:
        self.clock = Clock()
        self.broker = FakeBroker()
        self.channel = FakeChannel()
        self.broker.outbox.attach(self.channel)
        self.hub = Hub(LocalPubSub(), LocalPubSub())
        self.queues: dict[str, WorkQueue] = {}

        def shared(topic: str) -> WorkQueue:
            queue = self.queues[topic] = WorkQueue(
                self.broker.outbox, "mailhub:" + topic, self.clock, retry_initial=1,
                retry_max=4, metrics=self.broker.metrics, broker=self.broker, exchange=topic)
            return queue

        self.source = CalendarSource(dispatcher, shared)
        self.source.start()

    def test_each_calendar_topic_gets_a_shared_queue_instead_of_a_subscription(self) -> None:
        out = Recorder()
        self.start(out)
        self.assertEqual(sorted(self.queues), ["calendar:event:created",
                                               "calendar:event:updated"])
        queue = self.queues["calendar:event:created"]
        self.assertEqual(queue.route, Route("calendar:event:created", "",
                                            queue="mailhub:calendar:event:created"))
        # Nothing listens on the (per-instance) global topic itself.
        self.successResultOf(self.hub.global_.topic("calendar:event:created").publish(
            json.loads(self.EVENT)))
        self.assertEqual(out.bodies, [])
        delivery = FakeDelivery(self.EVENT)
        self.successResultOf(queue.handle(delivery))
        self.assertEqual([b["userId"] for b in out.bodies], ["U1"])
        self.assertEqual(delivery.acks, 1)

    def test_a_refused_submit_is_retried_and_acked_only_once_accepted(self) -> None:
        out = Flaky(failures=2)
        self.start(out)
        delivery = FakeDelivery(self.EVENT)
        d = self.queues["calendar:event:updated"].handle(delivery)
        self.assertEqual((out.attempts, delivery.acks), (1, 0))
        self.clock.advance(1)
        self.assertEqual((out.attempts, delivery.acks), (2, 0))
        self.clock.advance(2)
        self.successResultOf(d)
        self.assertEqual((out.attempts, delivery.acks, len(out.bodies)), (3, 1, 1))
        self.assertEqual(len(self.flushLoggedErrors(Unavailable)), 2)

    def test_bodies_that_are_not_events_are_dead_lettered_with_the_reason(self) -> None:
        out = Recorder()
        self.start(out)
        queue = self.queues["calendar:event:created"]
        bodies = (b"not json", b"[" * 200000, b"[1]", b'{"eventPath": "/nowhere"}')
        for n, body in enumerate(bodies, 1):
            delivery = FakeDelivery(body)
            d = queue.handle(delivery)
            self.broker.outbox.ack(n, False)  # the broker confirms the dead letter
            self.successResultOf(d)
            self.assertEqual(delivery.acks, 1)
        reasons = [props["headers"][REASON_HEADER] for route, _, props in self.channel.published]
        self.assertEqual(reasons, [
            "the calendar event is not valid JSON: Expecting value: line 1 column 1 (char 0)",
            "the calendar event is nested too deeply (more than 64 levels)",
            "the calendar event must be a JSON object",
            "the calendar event has no usable eventPath"])
        self.assertEqual({route.routing_key for route, _, _ in self.channel.published},
                         {"mailhub:calendar:event:created:dead"})
        self.assertEqual(out.bodies, [])

    def test_nan_infinity_utf16_and_too_large_events_are_dead_lettered_with_the_reason(
            self) -> None:
        from tests.test_decoding import REFUSED

        out = Recorder()
        self.start(out)
        queue = self.queues["calendar:event:updated"]
        for n, (raw, why) in enumerate(REFUSED.items(), 1):
            delivery = FakeDelivery(raw)
            d = queue.handle(delivery)
            self.broker.outbox.ack(n, False)
            self.successResultOf(d)
            self.assertEqual(delivery.acks, 1)
            reason = self.channel.published[-1][2]["headers"][REASON_HEADER]
            self.assertTrue(reason.startswith("the calendar event "), reason)
            self.assertIn(why, reason)
        self.assertEqual(out.bodies, [])

    def test_imported_events_and_events_without_attendees_are_acked_quietly(self) -> None:
        out = Recorder()
        self.start(out)
        queue = self.queues["calendar:event:created"]
        for data in ({"eventPath": "/calendars/U1/c/1.ics", "event": JCAL, "import": True},
                     {"eventPath": "/calendars/U1/c/1.ics", "event": ["vcalendar", [], []]}):
            delivery = FakeDelivery(json.dumps(data).encode())
            self.successResultOf(queue.handle(delivery))
            self.assertEqual(delivery.acks, 1)
        self.assertEqual((out.bodies, self.channel.published), ([], []))
