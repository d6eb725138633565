"""``reuseport=yes``: several listeners on one port; the rest of the string as Twisted reads it."""

from __future__ import annotations

import socket
import urllib.request
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from mailhub.checks import Status, listen_check
from mailhub.endpoints import ReusePortEndpoint, server_endpoint
from mailhub.errors import ConfigError
from mailhub.tap import listen_endpoint
from tests.support.require import free_port


class ParsingTests(SynchronousTestCase):
    def test_reuseport_yes_on_tcp_gives_the_reuseport_endpoint(self) -> None:
        endpoint = server_endpoint(reactor, "tcp:8080:interface=127.0.0.1:reuseport=yes")
        assert isinstance(endpoint, ReusePortEndpoint)
        self.assertEqual((endpoint.port, endpoint.interface, endpoint.family),
                         (8080, "127.0.0.1", socket.AF_INET))

    def test_an_ipv6_interface_listens_on_ipv6(self) -> None:
        endpoint = server_endpoint(reactor, "tcp6:port=8080:interface=\\:\\:1:reuseport=yes")
        assert isinstance(endpoint, ReusePortEndpoint)
        self.assertEqual((endpoint.interface, endpoint.family), ("::1", socket.AF_INET6))

    def test_reuseport_no_and_no_option_are_twisteds_own_endpoint(self) -> None:
        for text in ("tcp:8080:interface=127.0.0.1:reuseport=no", "tcp:8080"):
            self.assertIsInstance(server_endpoint(reactor, text), TCP4ServerEndpoint)

    def test_a_bad_value_is_a_configuration_error_naming_the_setting(self) -> None:
        for text in ("tcp:8080:reuseport=maybe", "tcp:8080:reuseport=yes:ssl=1",
                     "tcp:reuseport=yes", "tcp:8080:interface=localhost:reuseport=yes"):
            with self.assertRaises(ConfigError) as raised:
                listen_endpoint(reactor, text)
            self.assertIn("[mailhub] listen: bad value", str(raised.exception))

    def test_mailhub_check_accepts_the_option(self) -> None:
        rows = self.successResultOf(Deferred.fromCoroutine(
            listen_check(reactor, "tcp:8080:reuseport=yes").probe()))
        self.assertEqual([row.status for row in rows], [Status.OK])
        rows = self.successResultOf(Deferred.fromCoroutine(
            listen_check(reactor, "tcp:8080:reuseport=maybe").probe()))
        self.assertEqual([row.status for row in rows], [Status.FAIL])

    def test_mailhub_check_before_systemd_passes_the_socket_is_not_a_failure(self) -> None:
        """mailhub@.service's ExecStartPre runs mailhub check without the socket."""
        rows = self.successResultOf(Deferred.fromCoroutine(
            listen_check(reactor, "systemd:domain=INET:index=0").probe()))
        self.assertEqual([row.status for row in rows], [Status.OK])


class Hello(Resource):
    isLeaf = True

    def __init__(self, name: bytes) -> None:
        super().__init__()
        self.name = name

    def render_GET(self, request: Any) -> bytes:
        return self.name


class ListeningTests(TestCase):
    timeout = 30

    async def test_two_listeners_share_one_port_and_both_get_connections(self) -> None:
        port = free_port()
        ports = []
        for name in (b"one", b"two"):
            endpoint = server_endpoint(reactor, "tcp:%d:interface=127.0.0.1:reuseport=yes" % port)
            listening = await endpoint.listen(Site(Hello(name)))
            self.addCleanup(listening.stopListening)
            ports.append(listening)
        self.assertEqual({p.getHost().port for p in ports}, {port})

        def fetch_many() -> set[bytes]:
            seen = set()
            for _ in range(64):  # each a new connection; the kernel hashes them over both
                with urllib.request.urlopen("http://127.0.0.1:%d/" % port, timeout=5) as r:
                    seen.add(r.read())
            return seen

        self.assertEqual(await deferToThread(fetch_many), {b"one", b"two"})

    async def test_a_listener_without_the_option_cannot_take_the_port(self) -> None:
        port = free_port()
        endpoint = server_endpoint(reactor, "tcp:%d:interface=127.0.0.1:reuseport=yes" % port)
        listening = await endpoint.listen(Factory.forProtocol(Protocol))
        self.addCleanup(listening.stopListening)
        plain = server_endpoint(reactor, "tcp:%d:interface=127.0.0.1" % port)
        with self.assertRaises(CannotListenError):
            await plain.listen(Factory.forProtocol(Protocol))
