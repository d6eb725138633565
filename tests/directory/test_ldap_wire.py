"""On the wire, against a real slapd: the pre-encoded login requests.

mailhub sends each login's search and bind pre-encoded (mailhub.directory.ldap_wire)
instead of through pyasn1. These tests record what goes out on the socket
and check it is exactly what ldap3 sends for the same login, for several
``user_filter`` shapes and any login text (hypothesis), and that the
behaviour around it (refusals, reconnection, fallback) is unchanged.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ldap3 import SUBTREE

from mailhub.config import LDAPSection
from mailhub.directory.ldap import LDAPClient, user_filter
from mailhub.directory.ldap_wire import TEMPLATE_MARKER, ber
from tests.support import slapd as fixture
from tests.support.slapd import Slapd

FILTERS = [
    "(&(objectClass=inetOrgPerson)(|(uid={login})(mail={login})))",   # the default
    "(uid={login})",
    "(&(objectClass=person)(cn=*{login}*))",                           # substrings
    "(|(mail={login}@example.test)(uid=x-{login}))",                  # login inside a value
    "(&(objectClass=user)(!(userAccountControl:1.2.840.113556.1.4.803:=2))"
    "(|(sAMAccountName={login})(userPrincipalName={login})))",         # Active Directory
]


@pytest.fixture
def server(slapd: Slapd) -> Slapd:
    """The run's shared slapd (tests/conftest.py)."""
    return slapd


def message_id(data: bytes) -> int:
    tag, children = ber.decode(data)
    assert isinstance(children, list) and children[0][0] == ber.INTEGER
    content = children[0][1]
    assert isinstance(content, bytes)
    return int.from_bytes(content, "big")


def ldap3_search_bytes(client: LDAPClient, conn: Any, login: str) -> bytes:
    """What ldap3's own Connection.search sends for ``login``."""
    recorder = ber.Recorder(conn.socket)
    conn.socket = recorder
    try:
        s = client.settings
        conn.search(s.base_dn, user_filter(s.user_filter, login), SUBTREE,
                    attributes=s.attributes, size_limit=2)
    finally:
        conn.socket = recorder._sock
    assert len(recorder.sent) == 1
    return recorder.sent[0]


@pytest.mark.parametrize("template", FILTERS)
def test_the_search_template_sends_what_ldap3_sends_for_any_login(
        server: Slapd, template: str) -> None:
    client = LDAPClient(LDAPSection(**server.settings(user_filter=template)))
    conn = client._connect(server.url, service=True)
    try:
        client.find("user00001")  # the first search records the template
        search = client._wire.search_template(conn)
        assert search is not None, "the template should serve this filter"

        @settings(max_examples=150, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(st.text(max_size=40).filter(lambda t: t.strip() == t and t))
        def same_bytes(login: str) -> None:
            try:
                login.encode("utf-8")
            except UnicodeEncodeError:
                return  # such logins take ldap3's own path
            expected = ldap3_search_bytes(client, conn, login)
            assert search.message(message_id(expected), login) == expected

        same_bytes()
        for login in ("*", "*)(uid=*", "a\\2ab", "zoë", "\x00", TEMPLATE_MARKER,
                      "x" * 300):
            expected = ldap3_search_bytes(client, conn, login)
            assert search.message(message_id(expected), login) == expected
    finally:
        client._forget(conn)
        client.close_all()


def test_the_fast_bind_sends_what_ldap3_sends(server: Slapd) -> None:
    client = LDAPClient(LDAPSection(**server.settings()))
    try:
        assert client.authenticate("zoe", fixture.ZOE_PASSWORD) is not None
        conn = client._local.auth
        recorder = ber.Recorder(conn.socket)
        conn.socket = recorder
        try:
            assert client.authenticate("zoe", fixture.ZOE_PASSWORD) is not None
        finally:
            conn.socket = recorder._sock
        [sent] = recorder.sent
        dn = "uid=zoe,ou=people," + fixture.BASE_DN
        expected = ber.bind_message(message_id(sent), dn, fixture.ZOE_PASSWORD.encode())
        assert sent == expected
    finally:
        client.close_all()


def test_fast_and_ldap3_paths_give_the_same_answers(server: Slapd) -> None:
    fast = LDAPClient(LDAPSection(**server.settings()))
    slow = LDAPClient(LDAPSection(**server.settings()), fast=False)
    try:
        cases = [("user00003", fixture.password(3)), ("user00003", fixture.password(4)),
                 ("user00003@example.test", fixture.password(3)), ("zoe", fixture.ZOE_PASSWORD),
                 ("ZOE", fixture.ZOE_PASSWORD), ("nobody", "x"), ("*", fixture.password(3)),
                 ("*)(uid=*", "x"), ("user0000*", fixture.password(3))]
        for login, password in cases:
            assert fast.find(login) == slow.find(login), login
            assert fast.authenticate(login, password) == slow.authenticate(login, password), login
        assert fast._wire.search_template(fast._local.search) is not None
        assert slow._wire.template is None
    finally:
        fast.close_all()
        slow.close_all()


def test_a_password_saslprep_refuses_is_a_plain_failure_not_an_outage(server: Slapd) -> None:
    client = LDAPClient(LDAPSection(**server.settings()))
    try:
        for fast in (True, False):
            client.fast = fast
            assert client.authenticate("user00002", "bad\x01password") is None
            # The server was not marked down: the next login is answered at once.
            assert client.authenticate("user00002", fixture.password(2)) is not None
            assert client._down_until == {}
    finally:
        client.close_all()


def test_a_filter_without_the_login_keeps_ldap3s_own_path(server: Slapd) -> None:
    client = LDAPClient(LDAPSection(**server.settings(user_filter="(uid=user00005)")))
    try:
        assert client.authenticate("anything", fixture.password(5)) is not None
        assert client._wire.template is None
    finally:
        client.close_all()


def test_a_connection_the_server_dropped_is_replaced_on_the_fast_path(server: Slapd) -> None:
    client = LDAPClient(LDAPSection(**server.settings()))
    try:
        assert client.authenticate("user00006", fixture.password(6)) is not None
        for kind in ("search", "auth"):
            getattr(client._local, kind).socket.shutdown(socket.SHUT_RDWR)
        assert client.authenticate("user00006", fixture.password(6)) is not None
        assert client.authenticate("user00006", "wrong") is None
    finally:
        client.close_all()
