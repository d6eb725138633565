"""The compact profile table: the same answers as plain dicts, in a fraction of the memory."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mailhub.directory.model import Email, Profile, normalise_email
from mailhub.directory.table import (
    BY_ID, BY_LOGIN, ProfileTable, SortedKeys, decode, encode, in_buckets, login_key,
)

ALICE = Profile(id="aaaaaaaaaaaaaaaaaaaaa1", name="Alice Ærø ✓", nickname="alice",
                emails=(Email("Alice@Example.org", True, True), Email("old@example.org", False)),
                groups=("example", "team"), has_password=True)
BOB = Profile(id="bbbbbbbbbbbbbbbbbbbbb2", name="Bob", emails=(Email("bob@example.org"),))
NOBODY = Profile(id="ccccccccccccccccccccc3", name="", nickname="")


def test_a_record_holds_every_field_of_a_profile() -> None:
    for profile in (ALICE, BOB, NOBODY):
        record = encode(profile)
        assert record is not None
        assert decode(record) == profile
    # An empty nickname is not None.
    assert decode(encode(NOBODY)).nickname == ""  # type: ignore[arg-type]


def test_a_profile_with_a_nul_is_kept_as_it_is() -> None:
    odd = Profile(id="odd", name="bad\x00name", emails=(Email("odd@example.org"),))
    assert encode(odd) is None
    table = ProfileTable()
    table.put(odd)
    assert table.get("odd") == odd
    assert table.id_by_email("ODD@example.org") == "odd"
    table.drop("odd")
    assert table.get("odd") is None and len(table) == 0


def test_lookups_by_id_address_and_nickname() -> None:
    table = ProfileTable.build([ALICE, BOB, NOBODY])
    assert len(table) == 3
    assert table.get(ALICE.id) == ALICE
    assert table.get(ALICE.id[:-1]) is None
    assert table.id_by_email(" alice@EXAMPLE.org ") == ALICE.id
    assert table.id_by_email("old@example.org") == ALICE.id
    assert table.id_by_email("alice@example.or") is None
    assert table.id_by_nickname("alice") == ALICE.id
    assert table.id_by_nickname("") is None


def test_a_profile_asked_for_twice_is_the_same_object_until_it_changes() -> None:
    table = ProfileTable.build([ALICE])
    first = table.get(ALICE.id)
    assert table.get(ALICE.id) is first
    table.put(Profile(id=ALICE.id, name="Alice B", emails=ALICE.emails))
    changed = table.get(ALICE.id)
    assert changed is not first and changed is not None and changed.name == "Alice B"


def test_an_address_moved_to_another_profile_is_found_there() -> None:
    table = ProfileTable.build([ALICE, BOB])
    table.put(Profile(id=BOB.id, name="Bob", emails=(Email("bob@example.org"),
                                                     Email("old@example.org"))))
    assert table.id_by_email("old@example.org") == BOB.id
    table.drop(ALICE.id)
    assert table.id_by_email("old@example.org") == BOB.id
    assert table.id_by_email("alice@example.org") is None


def test_buckets_sort_as_sorted_does() -> None:
    items = [b"b", b"ab", b"a", b"", b"\xff\x00", b"abc", b"aa", b"b\x00x"]
    assert in_buckets(list(items)) == sorted(items)


def test_sorted_keys_stay_sorted_through_splits_and_removals() -> None:
    keys = SortedKeys(load=4)
    values = [b"%03d" % ((n * 37) % 100) for n in range(100)]
    for value in values:
        keys.add(value)
    assert list(keys) == sorted(values) and len(keys) == 100
    for value in values[::2]:
        assert keys.discard(value)
    assert not keys.discard(b"nope")
    assert list(keys) == sorted(values[1::2])
    assert keys.after(None, 3) == sorted(values[1::2])[:3]
    assert keys.after(b"050", 2) == [v for v in sorted(values[1::2]) if v > b"050"][:2]
    assert keys.first_from(b"999") is None


ids = st.text("abcXYZ019", min_size=1, max_size=6)
addresses = st.builds(lambda local, upper: (local.upper() if upper else local) + "@x.org",
                      st.text("abcé", min_size=1, max_size=4), st.booleans())
profiles = st.builds(
    lambda pid, name, mails, nick, groups, pw: Profile(
        id=pid, name=name, nickname=nick,
        emails=tuple(Email(a, v, p) for a, v, p in mails), groups=tuple(groups),
        has_password=pw),
    ids, st.text(max_size=5).filter(lambda t: "\x00" not in t),
    st.lists(st.tuples(addresses, st.booleans(), st.booleans()), max_size=3,
             unique_by=lambda t: normalise_email(t[0])),
    st.none() | st.text("nk", min_size=1, max_size=2), st.lists(st.sampled_from("gh"), max_size=2,
                                                              unique=True),
    st.booleans())
operations = st.lists(st.tuples(st.booleans(), profiles), max_size=40)


def _model(ops: list[tuple[bool, Profile]]) -> dict[str, Profile]:
    """What the table must hold: the last put of each id, less the dropped."""
    held: dict[str, Profile] = {}
    for put, profile in ops:
        held.pop(profile.id, None)
        if put:
            held[profile.id] = profile
    return held


@settings(max_examples=200, deadline=None)
@given(operations)
def test_the_table_answers_as_a_dict_would(ops: list[tuple[bool, Profile]]) -> None:
    table = ProfileTable()
    for put, profile in ops:
        if put:
            table.put(profile)
        else:
            table.drop(profile.id)
    held = _model(ops)
    assert len(table) == len(held)
    for pid, profile in held.items():
        assert table.get(pid) == profile
    # An address is found at the profile last put with it, while that put holds.
    last_with: dict[str, Profile] = {}
    for put, profile in ops:
        if put:
            for email in profile.emails:
                last_with[normalise_email(email.address)] = profile
    for address, profile in last_with.items():
        if held.get(profile.id) is profile:
            assert table.id_by_email(address) == profile.id
    # Both orders, walked in batches of two.
    by_id = [p for batch in table.walk(BY_ID, 2) for p in batch]
    assert by_id == sorted(held.values(), key=lambda p: p.id.encode())
    by_login = [p.id for batch in table.walk(BY_LOGIN, 2) for p in batch]
    assert sorted(by_login) == sorted(held)
    keys = [login_key(table.get(pid)).encode() + b"\x00" + pid.encode()  # type: ignore[arg-type]
            for pid in by_login]
    assert keys == sorted(keys)


@settings(max_examples=100, deadline=None)
@given(st.lists(profiles, max_size=30, unique_by=lambda p: p.id))
def test_built_at_once_or_one_by_one_the_table_is_the_same(given: list[Profile]) -> None:
    # Addresses unique across profiles, as the store keeps them.
    seen: set[str] = set()
    chosen = []
    for profile in given:
        mine = {normalise_email(e.address) for e in profile.emails}
        if not mine & seen:
            seen |= mine
            chosen.append(profile)
    built = ProfileTable.build(chosen)
    one_by_one = ProfileTable()
    for profile in chosen:
        one_by_one.put(profile)
    for order in (BY_ID, BY_LOGIN):
        assert ([p for b in built.walk(order, 3) for p in b]
                == [p for b in one_by_one.walk(order, 3) for p in b])
    for profile in chosen:
        for email in profile.emails:
            assert built.id_by_email(email.address) == profile.id


def test_a_walk_resumes_after_the_last_key_through_changes() -> None:
    table = ProfileTable.build([Profile(id="p%02d" % n, name=str(n)) for n in range(10)])
    walk = table.walk(BY_ID, 3)
    first = next(walk)
    assert [p.id for p in first] == ["p00", "p01", "p02"]
    table.drop("p03")                       # ahead: not listed
    table.put(Profile(id="p015", name="x"))  # behind the cursor: not listed
    table.put(Profile(id="p055", name="y"))  # ahead: listed
    rest = [p.id for batch in walk for p in batch]
    assert rest == ["p04", "p05", "p055", "p06", "p07", "p08", "p09"]


def test_member_ids_are_the_ids_of_the_profiles_in_a_group_in_id_order() -> None:
    odd = Profile(id="p05", name="with\x00nul", groups=("g",))
    table = ProfileTable.build(
        [Profile(id="p%02d" % n, name=str(n), groups=("g",) if n % 3 == 0 else (),
                 emails=(Email("a%d@x.org" % n),) * (n % 2)) for n in range(12) if n != 5]
        + [odd])
    expected = [p.id for b in table.walk(BY_ID, 4) for p in b if p.groups]
    assert expected == ["p00", "p03", "p05", "p06", "p09"]
    assert [i for b in table.member_ids(4) for i in b] == expected
    assert [i for b in table.member_ids(100) for i in b] == expected


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=4)), max_size=120),
       st.binary(max_size=4))
def test_sorted_keys_answer_as_a_sorted_list_would(ops: list[tuple[bool, bytes]],
                                                   probe: bytes) -> None:
    keys = SortedKeys(load=3)
    model: list[bytes] = []
    for add, item in ops:
        if add:
            keys.add(item)
            model.append(item)
            model.sort()
        else:
            assert keys.discard(item) == (item in model)
            if item in model:
                model.remove(item)
    assert list(keys) == model and len(keys) == len(model)
    at_or_after = [m for m in model if m >= probe]
    assert keys.first_from(probe) == (at_or_after[0] if at_or_after else None)
    assert keys.after(probe, 5) == [m for m in model if m > probe][:5]
    assert keys.after(None, 4) == model[:4]
    blocks = keys.blocks()
    again = SortedKeys.of_blocks(*blocks, load=3)
    assert list(again) == model and again.first_from(probe) == keys.first_from(probe)
