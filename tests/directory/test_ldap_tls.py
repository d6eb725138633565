"""LDAPS and StartTLS against a real slapd, through LDAPService and its source.

Three servers (tests.support.slapd): the run's shared one, serving TLS with a
certificate for 127.0.0.1 signed by a throwaway CA, one whose certificate (from the same CA)
names another host, and one without TLS at all. A recording relay in front
of a server keeps every byte mailhub sends, so "nothing in plaintext" is
checked on the wire, not inferred.

The rule proven here: a server mailhub cannot verify (unknown CA, wrong
name, no TLS on offer) is an outage (Unavailable), never a login, and never
a silent fallback to plaintext.
"""

from __future__ import annotations

import gc
import socket
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from mailhub.config import LDAPSection
from mailhub.directory.ldap import LDAPClient, LDAPService, LDAPUserSource
from mailhub.errors import Unavailable
from tests.support import slapd as fixture
from tests.support.slapd import Slapd, make_certificates

USERS = fixture.SHARED_USERS
PAGE = 500


class Relay:
    """A TCP relay on 127.0.0.1 to ``port`` that records what clients send."""

    def __init__(self, port: int) -> None:
        self.target = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sent = bytearray()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def sent(self) -> bytes:
        """Every byte any client sent through the relay so far."""
        with self._lock:
            return bytes(self._sent)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        try:
            while data := source.recv(65536):
                if record:
                    with self._lock:
                        self._sent += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            s.close()


class LDAPTLSTests(TestCase):
    tls: Slapd
    misnamed: Slapd
    plain: Slapd
    wrong_ca: str
    _tmp: Any

    @classmethod
    def setUpClass(cls) -> None:
        cls._tmp = tempfile.TemporaryDirectory()
        root = Path(cls._tmp.name)
        cls.tls = fixture.shared()
        try:
            cls.misnamed = Slapd(root / "misnamed", users=3, tls=True,
                                 tls_names=("ldap.example.org",)).start()
            cls.plain = Slapd(root / "plain", users=3).start()
        except BaseException:
            cls.tearDownClass()
            raise
        # A CA of its own: it signed nothing these servers present.
        cls.wrong_ca = str(make_certificates(root / "other-ca").ca_file)

    @classmethod
    def tearDownClass(cls) -> None:
        for name in ("misnamed", "plain"):  # tls is the run's shared slapd
            server = cls.__dict__.get(name)
            if server is not None:
                server.stop()
        cls._tmp.cleanup()

    def source(self, server: Slapd, **overrides: Any) -> LDAPUserSource:
        """A started LDAPService's source for ``server``, stopped after the test."""
        settings = LDAPSection(**server.settings(**{"timeout": 2.0, **overrides}))
        service = LDAPService(reactor, settings, threads=2)
        service.startService()
        self.addCleanup(service.stopService)
        return service.source

    def relay(self, port: int) -> Relay:
        made = Relay(port)
        self.addCleanup(made.close)
        return made

    # -- verified TLS works end to end --------------------------------------

    async def _works(self, source: LDAPUserSource) -> None:
        user = await source.find("user00042@example.test")
        self.assertIsNotNone(user)
        assert user is not None
        self.assertEqual(user.login, "user00042")
        self.assertEqual(user.name, fixture.full_name(42))
        self.assertEqual(list(user.emails), fixture.emails(42))
        self.assertIsNone(await source.find("nobody"))

        user = await source.authenticate("user00007", fixture.password(7))
        self.assertIsNotNone(user)
        assert user is not None
        self.assertEqual(user.login, "user00007")
        zoe = await source.authenticate("zoe", fixture.ZOE_PASSWORD)
        self.assertIsNotNone(zoe)
        self.assertIsNone(await source.authenticate("user00007", fixture.password(8)))
        self.assertIsNone(await source.authenticate("user00007", ""))

        sizes: list[int] = []
        logins: set[str] = set()
        async for page in source.pages(PAGE):
            sizes.append(len(page))
            logins.update(u.login for u in page)
        self.assertEqual(sizes, [PAGE, PAGE, USERS + 1 - 2 * PAGE])
        self.assertEqual(logins, {fixture.login(n) for n in range(USERS)} | {"zoe"})
        self.assertTrue(await source.ping())

    def test_ldaps_with_the_ca_finds_authenticates_and_lists(self) -> Deferred[None]:
        source = self.source(self.tls, urls=(self.tls.ldaps_url,), ca_file=self.tls.ca_file)
        return Deferred.fromCoroutine(self._works(source))

    def test_starttls_with_the_ca_finds_authenticates_and_lists(self) -> Deferred[None]:
        source = self.source(self.tls, start_tls=True, ca_file=self.tls.ca_file)
        return Deferred.fromCoroutine(self._works(source))

    async def _encrypted(self, relay: Relay, source: LDAPUserSource) -> None:
        self.assertIsNotNone(await source.authenticate("user00003", fixture.password(3)))
        self.assertIsNotNone(await source.find("user00004"))
        sent = relay.sent
        self.assertGreater(len(sent), 0)
        for secret in (fixture.READER_PASSWORD, fixture.password(3), "user00004"):
            self.assertNotIn(secret.encode("utf-8"), sent)

    def test_starttls_sends_binds_and_searches_only_encrypted(self) -> Deferred[None]:
        relay = self.relay(self.tls.port)
        source = self.source(self.tls, urls=("ldap://127.0.0.1:%d" % relay.port,),
                             start_tls=True, ca_file=self.tls.ca_file)
        return Deferred.fromCoroutine(self._encrypted(relay, source))

    # -- a server that cannot be verified is an outage, never a login -------

    async def _refused(self, source: LDAPUserSource) -> None:
        with self.assertRaises(Unavailable):
            await source.authenticate("user00007", fixture.password(7))
        with self.assertRaises(Unavailable):
            await source.authenticate("zoe", fixture.ZOE_PASSWORD)
        with self.assertRaises(Unavailable):
            await source.find("user00007")
        with self.assertRaises(Unavailable):
            async for _page in source.pages(PAGE):
                self.fail("a page came from a server that was not verified")
        with self.assertRaises(Unavailable):
            await source.ping()

    def test_ldaps_without_ca_file_refuses_the_private_ca(self) -> Deferred[None]:
        # The system's CAs do not know the throwaway CA.
        source = self.source(self.tls, urls=(self.tls.ldaps_url,), ca_file="")
        return Deferred.fromCoroutine(self._refused(source))

    def test_starttls_without_ca_file_refuses_the_private_ca(self) -> Deferred[None]:
        source = self.source(self.tls, start_tls=True, ca_file="")
        return Deferred.fromCoroutine(self._refused(source))

    def test_ldaps_with_another_ca_is_refused(self) -> Deferred[None]:
        source = self.source(self.tls, urls=(self.tls.ldaps_url,), ca_file=self.wrong_ca)
        return Deferred.fromCoroutine(self._refused(source))

    def test_starttls_with_another_ca_is_refused(self) -> Deferred[None]:
        source = self.source(self.tls, start_tls=True, ca_file=self.wrong_ca)
        return Deferred.fromCoroutine(self._refused(source))

    def test_ldaps_certificate_for_another_host_is_refused(self) -> Deferred[None]:
        # Signed by a CA we trust, but it names ldap.example.org, not 127.0.0.1.
        source = self.source(self.misnamed, urls=(self.misnamed.ldaps_url,),
                             ca_file=self.misnamed.ca_file)
        return Deferred.fromCoroutine(self._refused(source))

    def test_starttls_certificate_for_another_host_is_refused(self) -> Deferred[None]:
        source = self.source(self.misnamed, start_tls=True, ca_file=self.misnamed.ca_file)
        return Deferred.fromCoroutine(self._refused(source))

    def test_a_refused_certificate_leaves_no_socket_open(self) -> None:
        # ldap3 itself drops the socket of a refused name unclosed; ours closes it.
        for overrides in ({"urls": (self.misnamed.ldaps_url,)}, {"start_tls": True}):
            client = LDAPClient(LDAPSection(**self.misnamed.settings(
                ca_file=self.misnamed.ca_file, timeout=2.0, **overrides)))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ResourceWarning)
                with self.assertRaises(Unavailable):
                    client.authenticate("user00001", fixture.password(1))
                client.close_all()
                gc.collect()
            self.assertEqual([str(w.message) for w in caught
                              if w.category is ResourceWarning], [], overrides)

    async def _refused_on_the_wire(self, relay: Relay, source: LDAPUserSource) -> None:
        await self._refused(source)
        sent = relay.sent
        self.assertGreater(len(sent), 0)  # StartTLS was asked for, on this relay
        for secret in (fixture.READER_PASSWORD, fixture.password(7), fixture.ZOE_PASSWORD,
                       "user00007"):
            self.assertNotIn(secret.encode("utf-8"), sent)

    def test_starttls_to_a_server_without_tls_never_falls_back_to_plaintext(
            self) -> Deferred[None]:
        relay = self.relay(self.plain.port)
        source = self.source(self.plain, urls=("ldap://127.0.0.1:%d" % relay.port,),
                             start_tls=True, ca_file=self.tls.ca_file)
        return Deferred.fromCoroutine(self._refused_on_the_wire(relay, source))

    def test_starttls_refused_by_an_unverified_server_sends_no_secret(self) -> Deferred[None]:
        relay = self.relay(self.tls.port)
        source = self.source(self.tls, urls=("ldap://127.0.0.1:%d" % relay.port,),
                             start_tls=True, ca_file=self.wrong_ca)
        return Deferred.fromCoroutine(self._refused_on_the_wire(relay, source))

    def test_ldaps_to_a_plaintext_port_is_refused(self) -> Deferred[None]:
        source = self.source(self.plain, urls=("ldaps://127.0.0.1:%d" % self.plain.port,),
                             ca_file=self.tls.ca_file)
        return Deferred.fromCoroutine(self._refused(source))

    # -- timeouts -----------------------------------------------------------

    async def _hung_handshake(self, source: LDAPUserSource) -> None:
        started = time.monotonic()
        with self.assertRaises(Unavailable):
            await source.authenticate("user00001", fixture.password(1))
        self.assertLess(time.monotonic() - started, 6.0)

    def test_an_ldaps_handshake_that_never_answers_times_out_unavailable(
            self) -> Deferred[None]:
        # The kernel accepts connections on a listening socket nobody reads.
        silent = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(silent.close)
        url = "ldaps://127.0.0.1:%d" % silent.getsockname()[1]
        source = self.source(self.tls, urls=(url,), ca_file=self.tls.ca_file, timeout=1.0)
        return Deferred.fromCoroutine(self._hung_handshake(source))
