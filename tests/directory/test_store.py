"""The directory store behaves the same on SQLite and on PostgreSQL.

Every test here runs three times: on the in-memory store, on a SQLite file and
on a throwaway PostgreSQL database, all through the same SQLStore, run inline.
"""

from __future__ import annotations

import pytest
from zope.interface.verify import verifyObject

from mailhub.directory.interfaces import IDirectoryStore
from mailhub.directory.model import Email, Group, Profile, new_profile_id, new_token
from mailhub.directory.sql import SQLStore, dialect_for
from mailhub.errors import ConfigError, Unavailable, ValidationError
from tests.support.deferreds import result


def person(address: str = "a.person@home.example.com", name: str = "A Person") -> Profile:
    return Profile(id=new_profile_id(), name=name,
                   emails=(Email(address, verified=True, preferred=True),))


def test_implements_the_interface(store: SQLStore) -> None:
    assert verifyObject(IDirectoryStore, store)


def test_migrating_twice_keeps_the_schema(store: SQLStore) -> None:
    assert result(store.migrate()) == result(store.migrate())
    assert result(store.ping()) is True


def test_token_is_stored_and_replaced(store: SQLStore) -> None:
    assert result(store.get_token()) is None
    first, second = new_token(), new_token()
    result(store.set_token(first))
    assert result(store.get_token()) == first
    result(store.set_token(second))
    assert result(store.get_token()) == second


def test_profile_round_trip_with_addresses_and_groups(store: SQLStore) -> None:
    profile = Profile(id=new_profile_id(), name="Zoë Ünicode", nickname="zoe",
                      emails=(Email("Zoe@Home.example.com", True, True),
                              Email("zoe@work.example.com", True, False),
                              Email("zoe@old.example.com", False, False)))
    result(store.create_profile(profile))
    result(store.create_group(Group("example", "Example", "example@lists.example.com")))
    assert result(store.add_member("example", profile.id)) is True
    got = result(store.get_profile(profile.id))
    assert got.name == "Zoë Ünicode"
    assert got.nickname == "zoe"
    assert [e.address for e in got.emails] == [e.address for e in profile.emails]
    assert got.groups == ("example",)
    data = got.data("https://groups.example.com")
    assert data["url"] == "https://groups.example.com/p/zoe"
    assert data["email"] == {
        "all": ["Zoe@Home.example.com", "zoe@work.example.com", "zoe@old.example.com"],
        "preferred": ["Zoe@Home.example.com"],
        "other": ["zoe@work.example.com"],
        "unverified": ["zoe@old.example.com"],
    }


def test_find_by_address_is_exact_and_case_insensitive(store: SQLStore) -> None:
    profile = person("a_b%c@example.com")
    result(store.create_profile(profile))
    assert result(store.find_profile("A_B%C@EXAMPLE.COM")).id == profile.id
    # SQL wildcards in the searched address match nothing else.
    assert result(store.find_profile("a_b%@example.com")) is None
    assert result(store.find_profile("axb%c@example.com")) is None
    assert result(store.find_profile("%")) is None


def test_an_address_belongs_to_one_profile(store: SQLStore) -> None:
    result(store.create_profile(person("shared@example.com")))
    with pytest.raises(ValidationError):
        result(store.create_profile(person("SHARED@example.com")))


def test_memberships_report_what_changed(store: SQLStore) -> None:
    profile = person()
    result(store.create_profile(profile))
    result(store.create_group(Group("g1", "Group one")))
    assert result(store.add_member("g1", profile.id)) is True
    assert result(store.add_member("g1", profile.id)) is False
    assert result(store.remove_member("g1", profile.id)) is True
    assert result(store.remove_member("g1", profile.id)) is False


def test_removing_a_group_removes_its_memberships(store: SQLStore) -> None:
    profile = person()
    result(store.create_profile(profile))
    result(store.create_group(Group("g1", "Group one")))
    result(store.add_member("g1", profile.id))
    assert result(store.remove_group("g1")) is True
    assert result(store.get_profile(profile.id)).groups == ()
    assert result(store.remove_group("g1")) is False


def test_duplicate_group_is_a_validation_error(store: SQLStore) -> None:
    result(store.create_group(Group("g1", "Group one")))
    with pytest.raises(ValidationError):
        result(store.create_group(Group("g1", "Again")))


def test_password_hash_and_removal(store: SQLStore) -> None:
    profile = person()
    result(store.create_profile(profile))
    result(store.set_password_hash(profile.id, "$argon2id$fake"))
    assert result(store.get_password_hash(profile.id)) == "$argon2id$fake"
    assert result(store.get_profile(profile.id)).has_password
    assert result(store.remove_profile(profile.id)) is True
    assert result(store.get_profile(profile.id)) is None
    assert result(store.find_profile("a.person@home.example.com")) is None


def test_every_write_is_in_the_change_log(store: SQLStore) -> None:
    start = result(store.last_change())
    profile = person()
    result(store.create_profile(profile))
    result(store.create_group(Group("g1", "Group one")))
    result(store.add_member("g1", profile.id))
    result(store.set_token(new_token()))
    changes = result(store.changes_since(start))
    assert [(kind, key) for _, kind, key in changes] == [
        ("profile", profile.id), ("group", "g1"), ("profile", profile.id), ("token", "main")]
    assert [seq for seq, _, _ in changes] == sorted(seq for seq, _, _ in changes)
    assert result(store.changes_since(changes[-1][0])) == []


def test_audit_keeps_time_client_and_event(store: SQLStore) -> None:
    result(store.audit("token-mismatch", "192.0.2.7", "hook=/gs-group-groups.json"))
    rows = result(store.audit_log(10))
    assert rows[0]["event"] == "token-mismatch"
    assert rows[0]["client"] == "192.0.2.7"
    assert rows[0]["at"].endswith("+00:00")


def test_bad_dsns_are_configuration_errors() -> None:
    for dsn in ("mysql://x", "sqlite://host/x", "sqlite:///", "nonsense", "postgresql://[unclosed/x"):
        with pytest.raises(ConfigError):
            dialect_for(dsn)


def test_unreachable_postgresql_is_unavailable() -> None:
    store = SQLStore(dialect_for("postgresql://postgres@127.0.0.1:1/none"))
    with pytest.raises(Unavailable):
        result(store.get_token())


def test_loading_every_profile_gives_each_its_own_addresses_and_groups(store: SQLStore) -> None:
    """The full load joins three answers as they stream (no per-profile
    query): profiles with none, one and several addresses and groups, ids in
    an order unlike creation's, each comes back as ``get_profile`` gives it."""
    for gid in ("zeta", "alpha", "mid"):
        result(store.create_group(Group(gid, gid.title(), "%s@lists.example.com" % gid)))
    made = []
    for n in range(30):
        emails = tuple(Email("p%d.%d@home.example.com" % (n, k), bool(k % 2), k == 0)
                       for k in range(n % 4))
        profile = Profile(id="%02d%s" % ((n * 7) % 30, new_profile_id()[2:]),
                          name="Person %d" % n, emails=emails)
        result(store.create_profile(profile))
        for gid in ("zeta", "alpha", "mid")[: n % 4]:
            result(store.add_member(gid, profile.id))
        made.append(profile.id)
    loaded = {p.id: p for p in result(store.load_profiles())}
    assert sorted(loaded) == sorted(made)
    for pid in made:
        assert loaded[pid] == result(store.get_profile(pid))
    assert sum(len(p.emails) for p in loaded.values()) == sum(n % 4 for n in range(30))
    assert sum(len(p.groups) for p in loaded.values()) == sum(min(n % 4, 3) for n in range(30))


def test_members_are_read_in_pages_in_the_in_memory_directorys_order(store: SQLStore) -> None:
    """The hooks' lists while the directory loads: every profile in a group
    once, page after page, in byte order (upper case before lower case,
    as the in-memory table orders them, whatever the database's collation),
    each with its addresses and groups; profiles in no group are left out."""
    from mailhub.directory.table import BY_ID

    for gid in ("zeta", "alpha"):
        result(store.create_group(Group(gid, gid.title())))
    ids = ["b-x", "B-x", "a-x", "A-x", "Z9", "z9", "é-x", "e-x", "0x", "_x", "ab", "aB"]
    for n, pid in enumerate(ids):
        result(store.create_profile(Profile(pid, "P %d" % n, None, (
            Email("p%d@home.example.com" % n, True, True),))))
        for gid in ("zeta", "alpha")[: n % 3]:
            result(store.add_member(gid, pid))
    members = sorted(pid for n, pid in enumerate(ids) if n % 3)
    assert members == sorted(members, key=lambda i: i.encode())
    for size in (1, 2, 3, 100):
        pages, after = [], ""
        while page := result(store.member_ids(after, size)):
            assert len(page) <= size
            pages.append(page)
            after = page[-1]
        assert [i for page in pages for i in page] == members, size
        profiles, after = [], ""
        while page := result(store.members(after, size)):
            profiles.extend(page)
            after = page[-1].id
        assert profiles == [result(store.get_profile(i)) for i in members], size
    # The same order as the table the directory loads.
    table = result(store.load_table())
    assert [i for batch in table.member_ids(5) for i in batch] == members
    assert [p.id for b in table.walk(BY_ID, 5) for p in b if p.groups] == members
