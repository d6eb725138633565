"""The directory's profiles in memory, compact: about 200 to 300 bytes each.

A million :class:`~mailhub.directory.model.Profile` objects, with their
``Email`` objects, tuples, strings and two dicts to find them, took 1.3 KiB
each (1.3 GiB), and the garbage collector had millions of containers to
follow. Here a profile is a record, its fields joined by NUL (which neither
PostgreSQL's text nor a hook's input can hold), and the indexes are sorted
keys, each ``KEY NUL ID``:

- records, ordered by profile id (a record begins ``ID NUL``), so the
  id order the member lists answer in is the records' own order;
- addresses, normalised (:func:`~mailhub.directory.model.normalise_email`);
- logins, case-folded: the order MailStore's user list is sent in;
- nicknames, for the sites that map OpenPaaS ids to them.

Each index is a :class:`SortedKeys`: blocks of about a thousand items, each
block one ``bytes`` object with the items end to end and an array of where
each ends. An item costs its length and four bytes, the collector follows
nothing, and the blocks can be saved and read back as they are
(:mod:`mailhub.directory.snapshot`).

Readers that walk the whole directory (a member list, MailStore's list)
hold no snapshot: they ask for the next batch after the last key they were
given (:meth:`ProfileTable.walk`), so a list of a million profiles costs
the memory of a batch, and changes made while it is written show or not by
where they fall (each profile is listed once at most, in order).

A profile is made from its record when asked for; the last few thousand
asked for are kept, so a profile asked for again (the hooks' JSON cache
keys on the object) is the same object until it changes.
"""

from __future__ import annotations

import heapq
from array import array
from bisect import bisect_left, bisect_right, insort
from itertools import accumulate, chain
from os.path import commonprefix
from typing import Iterable, Iterator

from cachetools import LRUCache

from mailhub.directory.model import Email, Profile, normalise_email
from mailhub.steps import return_freed_memory

NUL = b"\x00"
#: Profiles made from records kept for callers that ask again.
DECODED = 4096

#: The indexes of a table, in the order :meth:`ProfileTable.state` gives them.
INDEXES = ("records", "emails", "logins", "nicknames")

#: The orders :meth:`ProfileTable.walk` walks.
BY_ID = "id"
BY_LOGIN = "login"


class SortedKeys:
    """A sorted list of ``bytes`` items, packed: blocks of up to ``2 * load``
    items, each block one ``bytes`` object (the items end to end) and an
    array of where each item ends.

    An item costs its length and four bytes: none of the 33-byte header of
    a ``bytes`` object, the 8-byte reference to it and the allocator's
    rounding, and nothing for the garbage collector to follow. The blocks
    are large objects of their own, so the many small objects a load makes
    and frees leave no holes among them. A change repacks one block (a few
    hundred microseconds); a search bisects the block maxima, then the
    block's items.
    """

    def __init__(self, items: Iterable[bytes] = (), load: int = 1000) -> None:
        self._load = load
        self._data: list[bytes] = []
        self._ends: list[array[int]] = []
        self._maxes: list[bytes] = []
        self._len = 0
        ordered = sorted(items)
        for start in range(0, len(ordered), load):
            self._append(ordered[start:start + load])

    @classmethod
    def of_sorted(cls, items: list[bytes], load: int = 1000) -> "SortedKeys":
        """From items already in order, taken from ``items`` (left empty): a
        block at a time, from the end, so that the small objects are freed
        a block at a time too (a million freed at once is one C call that
        holds the GIL for a tenth of a second)."""
        made = cls(load=load)
        for start in reversed(range(0, len(items), load)):
            made._append(items[start:])
            del items[start:]
        made._data.reverse()
        made._ends.reverse()
        made._maxes.reverse()
        return made

    @classmethod
    def of_blocks(cls, data: list[bytes], ends: list[array[int]],
                  load: int = 1000) -> "SortedKeys":
        """From packed blocks (as :meth:`blocks` gave them)."""
        made = cls(load=load)
        made._data = data
        made._ends = ends
        made._len = sum(len(e) for e in ends)
        made.seal()
        return made

    def blocks(self) -> tuple[list[bytes], list[array[int]]]:
        """The packed blocks as they are now (for the saved table: blocks
        are replaced on change, never changed in place)."""
        return list(self._data), list(self._ends)

    def _append(self, block: list[bytes]) -> None:
        if block:
            self._data.append(b"".join(block))
            self._ends.append(array("I", accumulate(map(len, block))))
            self._maxes.append(block[-1])
            self._len += len(block)

    def seal(self) -> None:
        """Hold copies of the block maxima, made now: the items they were
        taken from (a load's many small objects, freed by now) would each
        keep a whole arena of the allocator's memory from being freed."""
        self._maxes = [self._item(where, len(ends) - 1) for where, ends in enumerate(self._ends)]

    def _pack(self, where: int, block: list[bytes]) -> None:
        """Replace block ``where`` with ``block`` (split when too large,
        dropped when empty)."""
        if not block:
            del self._data[where], self._ends[where], self._maxes[where]
            return
        if len(block) > 2 * self._load:
            half = len(block) // 2
            self._pack(where, block[half:])
            self._data.insert(where, b"")
            self._ends.insert(where, array("I"))
            self._maxes.insert(where, b"")
            block = block[:half]
        self._data[where] = b"".join(block)
        self._ends[where] = array("I", accumulate(map(len, block)))
        self._maxes[where] = block[-1]

    def _items(self, where: int) -> list[bytes]:
        data = self._data[where]
        ends = self._ends[where]
        return [data[start:end] for start, end in zip(chain((0,), ends), ends)]

    def _item(self, where: int, at: int) -> bytes:
        ends = self._ends[where]
        return self._data[where][ends[at - 1] if at else 0:ends[at]]

    def _bisect(self, where: int, key: bytes, right: bool = False) -> int:
        """Where ``key`` goes in block ``where`` (bisect_left, or _right)."""
        data = self._data[where]
        ends = self._ends[where]
        low, high = 0, len(ends)
        while low < high:
            middle = (low + high) // 2
            item = data[ends[middle - 1] if middle else 0:ends[middle]]
            if item < key or right and item == key:
                low = middle + 1
            else:
                high = middle
        return low

    def __len__(self) -> int:
        return self._len

    def first_from(self, key: bytes) -> bytes | None:
        """The least item that is ``key`` or after it, or None."""
        where = bisect_left(self._maxes, key)
        if where == len(self._maxes):
            return None
        return self._item(where, self._bisect(where, key))

    def with_prefix(self, prefix: bytes) -> bytes | None:
        """The least item that begins with ``prefix``, or None."""
        found = self.first_from(prefix)
        return found if found is not None and found.startswith(prefix) else None

    def add(self, item: bytes) -> None:
        if not self._maxes:
            self._append([item])
            return
        where = min(bisect_left(self._maxes, item), len(self._maxes) - 1)
        block = self._items(where)
        insort(block, item)
        self._pack(where, block)
        self._len += 1

    def discard(self, item: bytes) -> bool:
        """Remove ``item`` if there; say whether it was."""
        where = bisect_left(self._maxes, item)
        if where == len(self._maxes):
            return False
        at = self._bisect(where, item)
        if self._item(where, at) != item:
            return False
        block = self._items(where)
        del block[at]
        self._pack(where, block)
        self._len -= 1
        return True

    def after(self, key: bytes | None, limit: int) -> list[bytes]:
        """Up to ``limit`` items after ``key`` (from the first when None), in order."""
        maxes = self._maxes
        if key is None:
            where = start = 0
        else:
            where = bisect_right(maxes, key)
            if where == len(maxes):
                return []
            start = self._bisect(where, key, right=True)
        found: list[bytes] = []
        while where < len(maxes) and len(found) < limit:
            found.extend(self._items(where)[start:start + limit - len(found)])
            where += 1
            start = 0
        return found

    def __iter__(self) -> Iterator[bytes]:
        for where in range(len(self._data)):
            yield from self._items(where)

    def nbytes(self) -> int:
        """The memory the items take (their bytes and offsets)."""
        return sum(len(d) for d in self._data) + 4 * self._len


#: A bucket larger than this is cut again, by its next two bytes.
BUCKET = 20_000


def in_buckets(items: list[bytes], depth: int = 0) -> list[bytes]:
    """``sorted(items)``, made as buckets of the same two bytes each sorted
    apart: no one sort of a million items (a C call that holds the GIL for
    most of a second), and fewer comparisons. Items that share a long
    prefix (``user000123@example.org``) are cut again, deeper."""
    buckets: dict[bytes, list[bytes]] = {}
    end = depth + 2
    for item in items:
        head = item[depth:end]
        bucket = buckets.get(head)
        if bucket is None:
            buckets[head] = [item]
        else:
            bucket.append(item)
    ordered: list[bytes] = []
    for head in sorted(buckets):
        bucket = buckets.pop(head)
        if len(bucket) > BUCKET and len(head) == 2:
            # Cut again past what every item of the bucket shares (its least
            # and greatest found a slice at a time: each a C call).
            least = min(min(bucket[at:at + BUCKET]) for at in range(0, len(bucket), BUCKET))
            most = max(max(bucket[at:at + BUCKET]) for at in range(0, len(bucket), BUCKET))
            shared = len(commonprefix([least, most]))
            if shared < 64:
                ordered.extend(in_buckets(bucket, max(end, shared)))
                continue
        bucket.sort()
        ordered.extend(bucket)
    return ordered


def _text(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


def fields_of(profile_id: str, name: str, nickname: str | None, has_password: bool,
              emails: list[str], groups: list[str]) -> list[str]:
    """A record's fields: ``emails`` as records hold them (:func:`_flagged`)."""
    fields = [profile_id, name, nickname or "",
              "%d%d%d" % (has_password, nickname is not None, len(emails))]
    fields += emails
    fields += groups
    return fields


def record_of(fields: list[str]) -> bytes | None:
    """The record of these fields, or None when one holds a NUL."""
    record = _text("\x00".join(fields))
    return record if record.count(NUL) == len(fields) - 1 else None


def encode(profile: Profile) -> bytes | None:
    """A profile's record, or None when a field holds a NUL (kept aside, as it is)."""
    return record_of(fields_of(profile.id, profile.name, profile.nickname, profile.has_password,
                               [_flagged(e) for e in profile.emails], list(profile.groups)))


def decode(record: bytes) -> Profile:
    """The profile a record holds (:func:`encode` reversed)."""
    fields = record.decode("utf-8", "surrogatepass").split("\x00")
    return decode_fields(fields, int(fields[3][2:]))


def decode_fields(fields: list[str], count: int) -> Profile:
    """The profile of a record's fields, ``count`` of them addresses."""
    flags = fields[3]
    emails = tuple(Email(text[1:], text[0] in "13", text[0] in "23")
                   for text in fields[4:4 + count])
    return Profile(id=fields[0], name=fields[1],
                   nickname=fields[2] if flags[1] == "1" else None,
                   emails=emails, groups=tuple(fields[4 + count:]),
                   has_password=flags[0] == "1")


def record_id(record: bytes) -> str:
    """The profile id a record (or an index key) ends or begins with."""
    return record[:record.index(NUL)].decode("utf-8", "surrogatepass")


def _key_id(key: bytes) -> str:
    return key[key.rindex(NUL) + 1:].decode("utf-8", "surrogatepass")


def login_key(profile: Profile) -> str:
    """What MailStore's list is ordered by: the login, case-folded."""
    return profile.login.casefold()


def _flagged(email: Email) -> str:
    """An address as a record holds it: its state as a digit, then itself."""
    return "%d%s" % (email.verified + 2 * email.preferred, email.address)


#: The login of a record: its first address whose digit says verified and preferred.
VERIFIED_PREFERRED = "3"


class Loader:
    """Makes a :class:`ProfileTable` from a store's rows, in one pass, with
    no large sort and no Profile object.

    Meant for the store's thread at start-up: no step holds the GIL for long.
    Records are checked to come in id order, and sorted in buckets when not
    (:func:`in_buckets`); addresses are sorted in buckets; the logins are
    the address keys that are logins, in that order (the same objects, found
    by identity), with the few that are not addresses merged in.
    """

    def __init__(self, load: int = 1000) -> None:
        self._load = load
        self._reset()

    def _reset(self) -> None:
        self._made = ProfileTable()
        self._records: list[bytes] = []
        self._emails: list[bytes] = []
        self._shared: set[int] = set()
        self._own_logins: list[bytes] = []
        self._nicknames: list[bytes] = []
        self._ordered = True
        self._last = b""

    def add(self, profile_id: str, name: str, nickname: str | None, has_password: bool,
            emails: list[str], groups: list[str]) -> None:
        """One profile: ``emails`` as records hold them (:func:`_flagged`),
        in their order; ``groups`` sorted."""
        fields = fields_of(profile_id, name, nickname, has_password, emails, groups)
        record = record_of(fields)
        if record is None:
            # A NUL inside a field (SQLite can store one): kept as it is.
            self._made._odd[profile_id] = decode_fields(fields, len(emails))
            record = _text(profile_id) + NUL
        if record < self._last:
            self._ordered = False
        self._last = record
        self._records.append(record)
        addresses, login, shared, nickname_key = keys_of(profile_id, nickname, emails)
        self._emails += addresses
        if shared:
            self._shared.add(id(login))
        else:
            self._own_logins.append(login)
        if nickname_key is not None:
            self._nicknames.append(nickname_key)

    def table(self) -> "ProfileTable":
        """The table of every profile added (the loader is empty after).

        The small objects of the load are let go a block at a time
        (:meth:`SortedKeys.of_sorted`): a list of a million freed at once
        holds the GIL, and so the reactor, for a tenth of a second."""
        made, load = self._made, self._load
        records, emails, shared = self._records, self._emails, self._shared
        own_logins, nicknames, ordered = self._own_logins, self._nicknames, self._ordered
        self._reset()
        if not ordered:
            records = in_buckets(records)
        made._records = SortedKeys.of_sorted(records, load)
        emails = in_buckets(emails)
        logins = [key for key in emails if id(key) in shared]
        shared.clear()  # ints only: no object of the table's
        if own_logins:
            logins = list(heapq.merge(logins, in_buckets(own_logins)))
        made._emails = SortedKeys.of_sorted(emails, load)
        made._logins = SortedKeys.of_sorted(logins, load)
        made._nicknames = SortedKeys(nicknames, load)
        # The maxima are copied once the small objects are gone.
        for index in made._indexes():
            index.seal()
        return_freed_memory()
        return made


def keys_of(profile_id: str, nickname: str | None,
            emails: list[str]) -> tuple[list[bytes], bytes, bool, bytes | None]:
    """A profile's index keys: its address keys, its login key, whether that
    is one of the address keys (the same object: a load finds it by
    identity), and its nickname key (None without one).

    The login is :attr:`Profile.login <mailhub.directory.model.Profile.login>`,
    case-folded: the first verified preferred address, else the first, else the id.
    """
    tail = "\x00" + profile_id
    keys: dict[str, bytes] = {}
    login = ""
    for flagged in emails:
        normal = normalise_email(flagged[1:])
        if normal not in keys:
            keys[normal] = _text(normal + tail)
        if not login and flagged[0] == VERIFIED_PREFERRED:
            login = flagged[1:].casefold()
    if not login:
        login = emails[0][1:].casefold() if emails else profile_id.casefold()
    login_key = keys.get(login)
    shared = login_key is not None
    if login_key is None:
        login_key = _text(login + tail)
    return (list(keys.values()), login_key, shared,
            _text(nickname + tail) if nickname else None)


class ProfileTable:
    """Every profile of the site, compact, found by id, address, login or nickname."""

    def __init__(self) -> None:
        self._records = SortedKeys()
        self._emails = SortedKeys()
        self._logins = SortedKeys()
        self._nicknames = SortedKeys()
        #: Profiles whose fields hold a NUL (SQLite can store one), kept as they are.
        self._odd: dict[str, Profile] = {}
        self._decoded: LRUCache[str, tuple[bytes, Profile]] = LRUCache(maxsize=DECODED)

    def __len__(self) -> int:
        return len(self._records)

    # -- building --------------------------------------------------------------

    def _keys(self, profile: Profile) -> tuple[list[bytes], bytes, bool, bytes | None]:
        return keys_of(profile.id, profile.nickname, [_flagged(e) for e in profile.emails])

    @classmethod
    def build(cls, profiles: Iterable[Profile], load: int = 1000) -> "ProfileTable":
        """A table of ``profiles`` (see :class:`Loader`)."""
        loader = Loader(load)
        for profile in profiles:
            loader.add(profile.id, profile.name, profile.nickname, profile.has_password,
                       [_flagged(email) for email in profile.emails], list(profile.groups))
        return loader.table()

    def _indexes(self) -> tuple[SortedKeys, ...]:
        return (self._records, self._emails, self._logins, self._nicknames)

    def state(self) -> tuple[list[tuple[list[bytes], list[array[int]]]], list[Profile]]:
        """What :meth:`of_state` makes the same table again from: the
        indexes' blocks (in :data:`INDEXES` order) and the profiles kept aside."""
        return [index.blocks() for index in self._indexes()], list(self._odd.values())

    @classmethod
    def of_state(cls, indexes: list[SortedKeys], odd: list[Profile]) -> "ProfileTable":
        made = cls()
        made._records, made._emails, made._logins, made._nicknames = indexes
        made._odd = {p.id: p for p in odd}
        return made

    def put(self, profile: Profile) -> None:
        """Hold ``profile``, replacing the one with its id."""
        self.drop(profile.id)
        record = encode(profile)
        if record is None:
            self._odd[profile.id] = profile
            record = _text(profile.id) + NUL
        self._records.add(record)
        addresses, login, _, nickname = self._keys(profile)
        for key in addresses:
            self._drop_address_owner(key)
            self._emails.add(key)
        self._logins.add(login)
        if nickname is not None:
            self._nicknames.add(nickname)

    def _drop_address_owner(self, key: bytes) -> None:
        """Forget whoever held this address before (the store moved it)."""
        address = key[:key.rindex(NUL) + 1]
        while (stale := self._emails.with_prefix(address)) is not None:
            self._emails.discard(stale)

    def drop(self, profile_id: str) -> None:
        """Forget the profile with this id, if held."""
        old = self.get(profile_id)
        if old is None:
            return
        record = self._record(profile_id)
        assert record is not None
        self._records.discard(record)
        addresses, login, _, nickname = self._keys(old)
        for key in addresses:
            self._emails.discard(key)
        self._logins.discard(login)
        if nickname is not None:
            self._nicknames.discard(nickname)
        self._odd.pop(profile_id, None)
        self._decoded.pop(profile_id, None)

    # -- reads -------------------------------------------------------------------

    def _record(self, profile_id: str) -> bytes | None:
        return self._records.with_prefix(_text(profile_id) + NUL)

    def _made(self, record: bytes) -> Profile:
        """The profile of a record (those kept aside as they are)."""
        return self._odd.get(record_id(record)) or decode(record)

    def _profile(self, record: bytes) -> Profile:
        """:meth:`_made`, the same object while the record stays (see DECODED)."""
        profile_id = record_id(record)
        held = self._decoded.get(profile_id)
        if held is not None and held[0] == record:
            return held[1]
        profile = self._made(record)
        self._decoded[profile_id] = (record, profile)
        return profile

    def get(self, profile_id: str) -> Profile | None:
        record = self._record(profile_id)
        return None if record is None else self._profile(record)

    def id_by_email(self, address: str) -> str | None:
        key = self._emails.with_prefix(_text(normalise_email(address)) + NUL)
        return None if key is None else _key_id(key)

    def id_by_nickname(self, nickname: str) -> str | None:
        key = self._nicknames.with_prefix(_text(nickname) + NUL)
        return None if key is None else _key_id(key)

    @staticmethod
    def _resumed(keys: SortedKeys, batch: int) -> Iterator[list[bytes]]:
        """The items of ``keys`` a batch at a time, each batch asked for after
        the last item given: the table may change between two."""
        key: bytes | None = None
        while True:
            items = keys.after(key, batch)
            if items:
                yield items
            if len(items) < batch:
                return
            key = items[-1]

    def member_ids(self, batch: int = 1000) -> Iterator[list[str]]:
        """The ids of the profiles in a group, in id order, a batch at a time
        (resumed by key, as :meth:`walk`), read from the records without
        making a profile of each."""
        for records in self._resumed(self._records, batch):
            found = []
            for record in records:
                fields = record.split(NUL)
                if len(fields) == 2:  # kept aside (a NUL in a field)
                    odd = self._odd.get(fields[0].decode("utf-8", "surrogatepass"))
                    if odd is not None and odd.groups:
                        found.append(odd.id)
                elif len(fields) > 4 + int(fields[3][2:]):
                    found.append(fields[0].decode("utf-8", "surrogatepass"))
            if found:
                yield found

    def walk(self, order: str = BY_ID, batch: int = 1000) -> Iterator[list[Profile]]:
        """Every profile, in ``order`` (:data:`BY_ID` or :data:`BY_LOGIN`), a
        batch at a time, resumed by key: safe to change the table between
        two batches. (Made apart from the cache of :meth:`get`, which a
        walk of a million would only flush.)"""
        if order == BY_ID:
            for records in self._resumed(self._records, batch):
                yield [self._made(record) for record in records]
            return
        for logins in self._resumed(self._logins, batch):
            found = [self._made(record) for record in
                     (self._record(_key_id(login)) for login in logins) if record is not None]
            if found:
                yield found


__all__ = ["BY_ID", "BY_LOGIN", "ProfileTable", "SortedKeys", "decode", "encode", "login_key"]
