"""twisted.web answers ``Expect: 100-continue`` as soon as the headers arrive.

Dovecot's Lua HTTP client sends its body only after ``100 Continue`` (or
after waiting about 2 s): the push receiver relies on twisted.web's
automatic interim answer, which this pins down without any network.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from mailhub.config import Config, PushSection
from mailhub.metrics import Metrics
from mailhub.pubsub import Hub
from mailhub.web.push import PushReceiver

BODY = json.dumps({"user": "alice", "events": [
    {"name": "MessageNew", "mailbox": "INBOX", "uid": 1, "uid_validity": 2}]}).encode()
HEAD = (b"POST /push/v1/notify HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Basic ZG92ZWNvdDpwdw==\r\n"  # dovecot:pw
        b"Content-Type: application/json; charset=utf-8\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(BODY))


class ContinueTests(SynchronousTestCase):
    def test_100_continue_is_sent_before_the_body_arrives(self) -> None:
        clock, hub = Clock(), Hub()
        seen: list[object] = []
        hub.local.topic("mail:new").subscribe(seen.append)
        receiver = PushReceiver(Config(push=PushSection(username="dovecot", password="pw")),
                                hub, Metrics(), clock)
        channel = Site(receiver.resource()).buildProtocol(
            IPv4Address("TCP", "127.0.0.1", 8080))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        channel.makeConnection(transport)
        channel.dataReceived(HEAD)
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        transport.clear()
        channel.dataReceived(BODY)
        answer = transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:60])
        self.assertIn(b'{"success":true,"events":1}', answer)
        clock.advance(0)
        self.assertEqual(len(seen), 1)
        channel.connectionLost(None)
