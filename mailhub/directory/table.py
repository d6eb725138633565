"""The directory's profiles in memory, compact: about 250 bytes each.

A million :class:`~mailhub.directory.model.Profile` objects, with their
``Email`` objects, tuples, strings and two dicts to find them, took 1.3 KiB
each (1.3 GiB), and the garbage collector had a million containers to
follow. Here a profile is one ``bytes`` record, its fields joined by NUL
(which neither PostgreSQL's text nor a hook's input can hold), and the
indexes are sorted lists of ``bytes`` keys, each ``KEY NUL ID``:

- records, ordered by profile id (a record begins ``ID NUL``), so the
  id order the member lists answer in is the records' own order;
- addresses, normalised (:func:`~mailhub.directory.model.normalise_email`);
- logins, case-folded: the order MailStore's user list is sent in; where
  the login is one of the addresses (nearly always) the login key is the
  very object of the address index, so it costs a reference;
- nicknames, for the sites that map OpenPaaS ids to them.

``bytes`` objects are not tracked by the garbage collector at all, and a
sorted list of them is the cheapest index there is: 8 bytes a reference.
Lists are cut into blocks (:class:`SortedKeys`) so that a change costs a
few microseconds, not the move of a million references.

Readers that walk the whole directory (a member list, MailStore's list)
hold no snapshot: they ask for the next batch after the last key they were
given (:meth:`ProfileTable.after`), so a list of a million profiles costs
the memory of a batch, and changes made while it is written show or not by
where they fall (each profile is listed once at most, in order).

A profile is made from its record when asked for; the last few thousand
asked for are kept, so a profile asked for again (the hooks' JSON cache
keys on the object) is the same object until it changes.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right, insort
from typing import Iterable, Iterator

from cachetools import LRUCache

from mailhub.directory.model import Email, Profile, normalise_email

NUL = b"\x00"
#: Profiles made from records kept for callers that ask again.
DECODED = 4096

#: The orders :meth:`ProfileTable.after` walks.
BY_ID = "id"
BY_LOGIN = "login"


class SortedKeys:
    """A sorted list of ``bytes``, in blocks of at most ``2 * load`` items.

    What ``list`` + ``bisect`` does, but an insertion or a removal moves the
    references of one block, not of a million.
    """

    def __init__(self, items: Iterable[bytes] = (), load: int = 1000) -> None:
        ordered = sorted(items)
        self._load = load
        self._blocks: list[list[bytes]] = [
            ordered[start:start + load] for start in range(0, len(ordered), load)]
        self._maxes: list[bytes] = [block[-1] for block in self._blocks]
        self._len = len(ordered)

    @classmethod
    def of_sorted(cls, blocks: Iterable[list[bytes]], load: int = 1000) -> "SortedKeys":
        """From blocks already in order, each block and each block's items
        (the start-up load builds them a block per step)."""
        made = cls(load=load)
        for block in blocks:
            if block:
                made._blocks.append(block)
                made._maxes.append(block[-1])
                made._len += len(block)
        return made

    def __len__(self) -> int:
        return self._len

    def first_from(self, key: bytes) -> bytes | None:
        """The least item that is ``key`` or after it, or None."""
        where = bisect_left(self._maxes, key)
        if where == len(self._maxes):
            return None
        block = self._blocks[where]
        return block[bisect_left(block, key)]

    def with_prefix(self, prefix: bytes) -> bytes | None:
        """The least item that begins with ``prefix``, or None."""
        found = self.first_from(prefix)
        return found if found is not None and found.startswith(prefix) else None

    def add(self, item: bytes) -> None:
        maxes = self._maxes
        if not maxes:
            self._blocks.append([item])
            maxes.append(item)
            self._len = 1
            return
        where = bisect_left(maxes, item)
        if where == len(maxes):
            where -= 1
        block = self._blocks[where]
        insort(block, item)
        maxes[where] = block[-1]
        self._len += 1
        if len(block) > 2 * self._load:
            half = len(block) // 2
            self._blocks[where:where + 1] = [block[:half], block[half:]]
            maxes[where:where + 1] = [block[half - 1], block[-1]]

    def discard(self, item: bytes) -> bool:
        """Remove ``item`` if there; say whether it was."""
        where = bisect_left(self._maxes, item)
        if where == len(self._maxes):
            return False
        block = self._blocks[where]
        at = bisect_left(block, item)
        if block[at] != item:
            return False
        del block[at]
        self._len -= 1
        if block:
            self._maxes[where] = block[-1]
        else:
            del self._blocks[where]
            del self._maxes[where]
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
            start = bisect_right(self._blocks[where], key)
        found: list[bytes] = []
        while where < len(maxes) and len(found) < limit:
            found.extend(self._blocks[where][start:start + limit - len(found)])
            where += 1
            start = 0
        return found

    def __iter__(self) -> Iterator[bytes]:
        for block in self._blocks:
            yield from block


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
        if len(bucket) > BUCKET and len(head) == 2 and depth < 32:
            ordered.extend(in_buckets(bucket, end))
        else:
            bucket.sort()
            ordered.extend(bucket)
    return ordered


def _blocks(items: list[bytes], load: int) -> Iterator[list[bytes]]:
    for start in range(0, len(items), load):
        yield items[start:start + load]


def _text(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


def encode(profile: Profile) -> bytes | None:
    """A profile's record, or None when a field holds a NUL (kept aside, as it is)."""
    flags = "%d%d%d" % (profile.has_password, profile.nickname is not None, len(profile.emails))
    fields = [profile.id, profile.name, profile.nickname or "", flags]
    fields.extend("%d%s" % (email.verified + 2 * email.preferred, email.address)
                  for email in profile.emails)
    fields.extend(profile.groups)
    if any("\x00" in field for field in fields):
        return None
    return _text("\x00".join(fields))


def decode(record: bytes) -> Profile:
    """The profile a record holds (:func:`encode` reversed)."""
    fields = record.decode("utf-8", "surrogatepass").split("\x00")
    flags = fields[3]
    count = int(flags[2:])
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
        """The address keys, the login key, whether that is one of the
        address keys (the same object, in two indexes), and the nickname key
        of a profile."""
        tail = NUL + _text(profile.id)
        addresses: dict[str, bytes] = {}
        for email in profile.emails:
            normal = normalise_email(email.address)
            if normal not in addresses:
                addresses[normal] = _text(normal) + tail
        login = login_key(profile)
        login_entry = addresses.get(login)
        shared = login_entry is not None
        if login_entry is None:
            login_entry = _text(login) + tail
        nickname = _text(profile.nickname) + tail if profile.nickname else None
        return list(addresses.values()), login_entry, shared, nickname

    @classmethod
    def build(cls, profiles: Iterable[Profile], load: int = 1000) -> "ProfileTable":
        """A table of ``profiles``, made in one pass with no large sort.

        Meant for a thread (the start-up load): no step holds the GIL for
        long. Records come in id order when the store reads them so (it is
        checked); addresses are sorted in buckets by their first two bytes,
        and the logins are the addresses that are logins, in that order,
        with the few that are not addresses merged in.
        """
        table = cls()
        records: list[bytes] = []
        emails: list[bytes] = []
        shared: set[int] = set()
        own_logins: list[bytes] = []
        nicknames: list[bytes] = []
        ordered = True
        last = b""
        for profile in profiles:
            record = encode(profile)
            if record is None:
                table._odd[profile.id] = profile
                record = _text(profile.id) + NUL
            if record < last:
                ordered = False
            last = record
            records.append(record)
            addresses, login, is_address, nickname = table._keys(profile)
            emails.extend(addresses)
            if is_address:
                shared.add(id(login))
            else:
                own_logins.append(login)
            if nickname is not None:
                nicknames.append(nickname)
        if not ordered:
            records = in_buckets(records)
        emails = in_buckets(emails)
        logins = [key for key in emails if id(key) in shared]
        shared.clear()
        if own_logins:
            logins = list(heapq.merge(logins, in_buckets(own_logins)))
        table._records = SortedKeys.of_sorted(_blocks(records, load), load)
        table._emails = SortedKeys.of_sorted(_blocks(emails, load), load)
        table._logins = SortedKeys.of_sorted(_blocks(logins, load), load)
        table._nicknames = SortedKeys(nicknames, load)
        return table

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

    def _profile(self, record: bytes) -> Profile:
        profile_id = record_id(record)
        held = self._decoded.get(profile_id)
        if held is not None and held[0] is record:
            return held[1]
        odd = self._odd.get(profile_id)
        profile = odd if odd is not None else decode(record)
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

    def after(self, order: str, key: bytes | None, limit: int) -> tuple[list[Profile], bytes | None]:
        """Up to ``limit`` profiles after ``key`` in ``order`` (:data:`BY_ID` or
        :data:`BY_LOGIN`), and the key to ask after next (None: the end)."""
        if order == BY_ID:
            records = self._records.after(key, limit)
            found = [self._odd.get(record_id(r)) or decode(r) for r in records]
        else:
            keys = self._logins.after(key, limit)
            found = []
            for login in keys:
                record = self._record(_key_id(login))
                if record is not None:
                    found.append(self._odd.get(record_id(record)) or decode(record))
            records = keys
        return found, (records[-1] if len(records) == limit else None)

    def walk(self, order: str = BY_ID, batch: int = 1000) -> Iterator[list[Profile]]:
        """Every profile, in ``order``, a batch at a time, resumed by key: safe
        to change the table between two batches."""
        key: bytes | None = None
        while True:
            found, key = self.after(order, key, batch)
            if found:
                yield found
            if key is None:
                return


__all__ = ["BY_ID", "BY_LOGIN", "ProfileTable", "SortedKeys", "decode", "encode", "login_key"]
