"""The directory's table kept in the data folder, so that a restart is ready in a second.

Reading a million profiles from the database and indexing them is about ten
seconds of Python, most of it holding the GIL. The table itself is a few
thousand packed blocks (:class:`~mailhub.directory.table.SortedKeys`): saved
as they are, they are read back with no work per profile. A start reads
the file, checks that it is of this database and that the change log still
holds the change it was saved at, then applies the changes made since, as a
running directory does; and it compares the number of profiles with the
database's. Any doubt, and the database is read as on a first start.

The file (``directory.table`` in ``[mailhub] data``) is written after a
start that read the database, and when mailhub stops after changes were
applied. It is written whole to a temporary file and renamed: a crash
leaves the old one or the new one. It holds what the directory holds
(names, addresses, groups; never a password or its hash) and is made
readable by its owner only.

Layout: a line with :data:`MAGIC`, a line of JSON (the :class:`Mark`, the
block counts, the profiles kept aside, :data:`MACHINE`), then each index's blocks (a
little-endian length pair, the items, their ends), then a CRC-32 of all
that came before.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import zlib
from array import array
from pathlib import Path
from typing import IO, Any

import attrs

from mailhub.directory.model import Email, Profile
from mailhub.directory.table import INDEXES, ProfileTable, SortedKeys

MAGIC = b"MAILHUB-DIRECTORY-TABLE 1\n"
FILENAME = "directory.table"
_BLOCK = struct.Struct("<QI")
_CRC = struct.Struct("<I")
#: Bytes per end offset (4 wherever mailhub runs).
_END = array("I").itemsize
#: The offsets are written as the machine holds them: a file from a machine
#: of another byte order or offset size is not read.
MACHINE = "%s-%d" % (sys.byteorder, _END)


@attrs.frozen
class Mark:
    """Which database, and which point of its change log, a table is of."""

    #: The database (its DSN without a password) and the site.
    identity: str
    #: The last change applied to the table.
    seq: int
    #: When that change was logged (None: no change yet); checked against
    #: the database's log, so a restored or replaced database is noticed.
    at: str | None


class _Summing:
    """A file that keeps a CRC-32 of what goes through it."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.crc = 0

    def write(self, data: bytes) -> None:
        self.crc = zlib.crc32(data, self.crc)
        self.file.write(data)

    def read(self, size: int) -> bytes:
        data = self.file.read(size)
        if len(data) != size:
            raise ValueError("the file ends early")
        self.crc = zlib.crc32(data, self.crc)
        return data

    def readline(self) -> bytes:
        line = self.file.readline()
        self.crc = zlib.crc32(line, self.crc)
        return line


def _profile_json(profile: Profile) -> list[Any]:
    return [profile.id, profile.name, profile.nickname, profile.has_password,
            [[e.address, e.verified, e.preferred] for e in profile.emails], list(profile.groups)]


def _profile_of(data: list[Any]) -> Profile:
    return Profile(id=data[0], name=data[1], nickname=data[2], has_password=data[3],
                   emails=tuple(Email(a, v, p) for a, v, p in data[4]), groups=tuple(data[5]))


def write(path: Path, state: tuple[list[tuple[list[bytes], list[array[int]]]], list[Profile]],
          mark: Mark) -> None:
    """Save a table's :meth:`~ProfileTable.state` at ``mark`` (blocking: for a thread)."""
    indexes, odd = state
    header = {"mark": attrs.asdict(mark), "blocks": [len(data) for data, _ in indexes],
              "odd": [_profile_json(p) for p in odd], "machine": MACHINE}
    # Several processes on one machine may share the data folder: each
    # writes a file of its own, and the last rename wins (both are whole).
    partial = path.with_name("%s.%d.partial" % (path.name, os.getpid()))
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as raw:
        out = _Summing(raw)
        out.write(MAGIC)
        out.write(json.dumps(header).encode() + b"\n")
        for datas, ends in indexes:
            for data, block_ends in zip(datas, ends):
                out.write(_BLOCK.pack(len(data), len(block_ends)))
                out.write(data)
                out.write(block_ends.tobytes())
        raw.write(_CRC.pack(out.crc))
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(partial, path)


def read(path: Path) -> tuple[Mark, ProfileTable] | None:
    """The table saved at ``path`` and its mark; None when there is none,
    or it is of another version, cut short or damaged (blocking: for a thread)."""
    try:
        raw = open(path, "rb")
    except FileNotFoundError:
        return None
    with raw:
        source = _Summing(raw)
        if source.readline() != MAGIC:
            return None
        try:
            header = json.loads(source.readline())
            if header["machine"] != MACHINE:  # offsets written in another byte order
                return None
            mark = Mark(**header["mark"])
            indexes = []
            for count in header["blocks"]:
                datas: list[bytes] = []
                ends: list[array[int]] = []
                for _ in range(count):
                    size, items = _BLOCK.unpack(source.read(_BLOCK.size))
                    datas.append(source.read(size))
                    block_ends = array("I")
                    block_ends.frombytes(source.read(_END * items))
                    ends.append(block_ends)
                indexes.append(SortedKeys.of_blocks(datas, ends))
            crc = source.crc
            (saved,) = _CRC.unpack(raw.read(_CRC.size))
            if saved != crc or raw.read(1) or len(indexes) != len(INDEXES):
                return None
            odd = [_profile_of(p) for p in header["odd"]]
        except (ValueError, KeyError, TypeError, struct.error):
            return None
    return mark, ProfileTable.of_state(indexes, odd)


__all__ = ["FILENAME", "MAGIC", "Mark", "read", "write"]
