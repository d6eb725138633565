"""The LDAP user source against a real slapd (tests.support.slapd).

The directory has 1,201 users, more than two pages of 500, and the service
account may read only 500 entries without paging, as Active Directory's
MaxPageSize would do: a listing that forgot to page would come up short.
"""

from __future__ import annotations

import gc
import socket
import time
import warnings
from typing import Any, Iterator

import pytest
from ldap3 import SUBTREE, Connection, Server

from mailhub.config import LDAPSection
from mailhub.directory.ldap import LDAPClient
from mailhub.errors import Unavailable
from tests.support import slapd as fixture
from tests.support.require import free_port
from tests.support.slapd import Slapd

USERS = fixture.SHARED_USERS


@pytest.fixture
def server(slapd: Slapd) -> Slapd:
    """The run's shared slapd (tests/conftest.py)."""
    return slapd


@pytest.fixture
def client(server: Slapd) -> Iterator[LDAPClient]:
    made = LDAPClient(LDAPSection(**server.settings(timeout=1.0)))
    yield made
    made.close_all()


def listed(client: LDAPClient, page_size: int = 500) -> tuple[list[Any], int]:
    listing = client.open_listing()
    users: list[Any] = []
    pages = 0
    try:
        while not listing.done:
            page = client.next_page(listing, page_size)
            pages += 1
            users.extend(page)
    finally:
        client.close_listing(listing)
    return users, pages


def test_users_are_found_by_uid_and_by_every_mail_value(client: LDAPClient) -> None:
    for login in ("user00042", "user00042@example.test", "j.nuesslein.00042@mail.example.test",
                  "USER00042@EXAMPLE.TEST"):
        user = client.find(login)
        assert user is not None, login
        assert user.login == "user00042"
        assert user.name == "Jörg Nüßlein 00042"
        assert list(user.emails) == fixture.emails(42)
        assert user.dn == "uid=user00042,ou=people,dc=example,dc=test"
        assert user.source == "ldap"
    assert client.find("nobody") is None
    assert client.find("") is None


def test_non_ascii_names_and_three_addresses_come_back_intact(client: LDAPClient) -> None:
    user = client.find("zoe")
    assert user is not None
    assert user.name == "Zoë Ørsted-Ünal"
    assert user.emails == ("zoe@example.test", "zoe.orsted@example.test",
                           "Z.Orsted@Example.Test")


def test_the_right_password_authenticates(client: LDAPClient) -> None:
    user = client.authenticate("user00007", fixture.password(7))
    assert user is not None and user.login == "user00007"
    assert client.authenticate("user00007@example.test", fixture.password(7)) is not None
    assert client.authenticate("zoe", fixture.ZOE_PASSWORD) is not None


@pytest.mark.parametrize("login,password", [
    ("user00007", "wrong"),
    ("user00007", fixture.password(8)),
    ("user00007", ""),
    ("zoe", "Passwörd zoë"),
    ("nobody", "anything"),
    ("", fixture.password(7)),
])
def test_wrong_empty_or_unknown_never_authenticate(client: LDAPClient, login: str,
                                                   password: str) -> None:
    assert client.authenticate(login, password) is None


INJECTIONS = [
    "*", "*)(uid=*", "*)(uid=*))(|(uid=*", "user0000*", "*user00007", "(uid=*)",
    "user00007)(|(objectClass=*", "*)(objectClass=*", "\\2a", "user00007\x00",
    "*)(|(mail=*)", "user00007)(userPassword=*",
]


@pytest.mark.parametrize("login", INJECTIONS)
def test_filter_injection_finds_nobody_and_never_authenticates(client: LDAPClient,
                                                               login: str) -> None:
    assert client.find(login) is None
    assert client.authenticate(login, fixture.password(7)) is None
    assert client.authenticate(login, "x") is None


def test_a_login_matching_several_entries_is_nobody(server: Slapd) -> None:
    client = LDAPClient(LDAPSection(**server.settings(user_filter="(sn={login})")))
    try:
        assert client.find("Nüßlein") is None
        assert client.authenticate("Nüßlein", fixture.password(1)) is None
    finally:
        client.close_all()


def test_listing_pages_through_more_users_than_the_server_gives_at_once(
        server: Slapd, client: LDAPClient) -> None:
    # Without paging the service account gets at most 500 entries.
    plain = Connection(Server(server.url), fixture.READER_DN, fixture.READER_PASSWORD,
                       auto_bind=True)
    plain.search(fixture.BASE_DN, "(objectClass=inetOrgPerson)", SUBTREE, attributes=["uid"])
    assert plain.result["result"] == 4 and len(plain.entries) == fixture.SIZE_LIMIT
    plain.unbind()
    users, pages = listed(client)
    assert len(users) == USERS + 1 and pages == 3
    assert len({u.login for u in users}) == USERS + 1
    by_login = {u.login: u for u in users}
    assert by_login["user01199"].emails == tuple(fixture.emails(1199))
    assert by_login["zoe"].name == "Zoë Ørsted-Ünal"


def test_an_anonymous_bind_works_when_no_bind_dn_is_set(server: Slapd) -> None:
    client = LDAPClient(LDAPSection(**server.settings(bind_dn="", bind_password="")))
    try:
        assert client.find("user00003") is not None
        assert client.authenticate("user00003", fixture.password(3)) is not None
    finally:
        client.close_all()


def test_a_wrong_service_password_is_unavailable_never_a_success(server: Slapd) -> None:
    client = LDAPClient(LDAPSection(**server.settings(bind_password="wrong")))
    try:
        with pytest.raises(Unavailable, match="service bind failed"):
            client.authenticate("user00003", fixture.password(3))
    finally:
        client.close_all()


def test_failover_skips_a_first_server_that_is_down(server: Slapd) -> None:
    dead = "ldap://127.0.0.1:%d" % free_port()
    client = LDAPClient(LDAPSection(**server.settings(urls=(dead, server.url), timeout=1.0)))
    try:
        assert client.authenticate("user00009", fixture.password(9)) is not None
        assert client.find("user00010") is not None
        users, _ = listed(client)
        assert len(users) == USERS + 1
        # The dead server is now tried last.
        assert client._servers() == [server.url, dead]
    finally:
        client.close_all()


def test_no_server_at_all_is_unavailable() -> None:
    urls = tuple("ldap://127.0.0.1:%d" % free_port() for _ in range(2))
    client = LDAPClient(LDAPSection(url=" ".join(urls), base_dn=fixture.BASE_DN, timeout=1.0))
    with pytest.raises(Unavailable):
        client.authenticate("user00001", fixture.password(1))
    with pytest.raises(Unavailable):
        client.open_listing()


def test_a_refused_connection_leaves_no_socket_open() -> None:
    urls = tuple("ldap://127.0.0.1:%d" % free_port() for _ in range(2))
    client = LDAPClient(LDAPSection(url=" ".join(urls), base_dn=fixture.BASE_DN, timeout=1.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with pytest.raises(Unavailable):
            client.authenticate("user00001", fixture.password(1))
        with pytest.raises(Unavailable):
            client.open_listing()
        gc.collect()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []


def test_a_server_that_stops_answering_is_unavailable_after_the_timeout(
        server: Slapd) -> None:
    client = LDAPClient(LDAPSection(**server.settings(timeout=1.0)))
    try:
        assert client.find("user00001") is not None  # a cached, working connection
        server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(Unavailable):
                client.authenticate("user00001", fixture.password(1))
            assert time.monotonic() - started < 6
        finally:
            server.resume()
        # And it recovers by itself once the server answers again.
        client._down_until.clear()
        assert client.authenticate("user00001", fixture.password(1)) is not None
    finally:
        client.close_all()


def test_a_listener_that_never_answers_fails_over_to_the_next(server: Slapd) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        url = "ldap://127.0.0.1:%d" % silent.getsockname()[1]
        client = LDAPClient(LDAPSection(**server.settings(urls=(url, server.url),
                                                           timeout=1.0)))
        try:
            assert client.authenticate("user00002", fixture.password(2)) is not None
        finally:
            client.close_all()
    finally:
        silent.close()
