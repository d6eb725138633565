"""The collector's ESN ids over a real slapd: users found by an attribute, and an
attribute of a user read ([collector] esn_id_attribute, issue 12).

The test directory has no ESN ids; ``uid`` and ``sn`` stand in for the
attribute a site would name (``employeeNumber``...): the searches are the same.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, TypeVar

import pytest
from twisted.internet.defer import Deferred, maybeDeferred

from mailhub.collector.rules import EsnIds
from mailhub.config import LDAPSection
from mailhub.directory.ldap import LDAPClient, LDAPUserSource
from tests.support.deferreds import result
from tests.support.slapd import Slapd

T = TypeVar("T")


@pytest.fixture(scope="module")
def server(tmp_path_factory: Any) -> Iterator[Slapd]:
    with Slapd(tmp_path_factory.mktemp("slapd"), users=3) as running:
        yield running


@pytest.fixture
def client(server: Slapd) -> Iterator[LDAPClient]:
    made = LDAPClient(LDAPSection(**server.settings(timeout=1.0)))
    yield made
    made.close_all()


def test_a_user_is_found_by_an_attribute(client: LDAPClient) -> None:
    user = client.find_by("uid", "zoe")
    assert user is not None and user.login == "zoe" and user.source == "ldap"
    assert "zoe@example.test" in user.emails


def test_no_one_several_or_an_injection_find_nobody(client: LDAPClient) -> None:
    assert client.find_by("uid", "nobody") is None
    assert client.find_by("sn", "Nüßlein") is None  # three users share it
    assert client.find_by("uid", "*") is None
    assert client.find_by("uid", "zoe)(uid=*") is None
    assert client.find_by("uid", "") is None


def test_an_attribute_of_a_user_is_read(client: LDAPClient) -> None:
    assert client.attribute_of("zoe", "sn") == "Ørsted-Ünal"
    assert client.attribute_of("zoe@example.test", "SN") == "Ørsted-Ünal"
    assert client.attribute_of("zoe", "employeeNumber") is None
    assert client.attribute_of("nobody", "sn") is None


class InlineSource(LDAPUserSource):
    """The LDAP user source with its calls made inline (no thread pool, no reactor)."""

    def _call(self, function: Callable[..., T], *args: Any) -> "Deferred[T]":
        return maybeDeferred(function, *args)


def test_esn_ids_over_the_ldap_source(client: LDAPClient) -> None:
    ids = EsnIds(ldap=InlineSource(client, None, None), attribute="uid")
    found = result(Deferred.fromCoroutine(ids.find("zoe")))
    assert found is not None and found.login == "zoe"
    assert result(Deferred.fromCoroutine(ids.id_of(found))) == "zoe"
    assert result(Deferred.fromCoroutine(ids.find("nobody"))) is None
