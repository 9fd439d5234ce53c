"""A zip's entry count and central-directory size, read from its end records alone.

Python's zipfile (archives) and torch's reader (`.bin` weights) both parse the whole central
directory before a caller sees a single entry, so a zip of 600k empty entries costs seconds
and hundreds of MB before any member limit applies. The end-of-central-directory record (and
its zip64 twin) states both numbers in a few bytes at the end of the file. Readers disagree on
which record they trust when a file holds several candidates, so every candidate either reader
could pick is read and the largest claim wins: what passes here bounds the work of both.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO
from zipfile import BadZipFile

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory, 22 bytes
_EOCD_SIG = b"PK\x05\x06"
_LOCATOR = struct.Struct("<4sLQL")  # zip64 end of central directory locator, 20 bytes
_LOCATOR_SIG = b"PK\x06\x07"
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # zip64 end of central directory, 56 bytes
_EOCD64_SIG = b"PK\x06\x06"
_MAX_COMMENT = 0xFFFF

# Bytes one central-directory entry may take when a limit of N entries is applied: the 46-byte
# fixed part plus a name, extra fields and a comment. Real entries take well under 200.
MAX_ENTRY_BYTES = 1024


@dataclass(frozen=True)
class ZipDirectory:
    """The largest entry count and central-directory size any end record of the file claims."""

    entries: int
    size: int  # bytes


def _read_at(src: BinaryIO, offset: int, n: int) -> bytes:
    src.seek(offset)
    return src.read(n)


def _claims(src: BinaryIO, file_size: int, at: int) -> list[tuple[int, int]]:
    """(entries, size) of the end record at `at` and of every zip64 record tied to it."""
    record = _read_at(src, at, _EOCD.size)
    if len(record) != _EOCD.size or record[:4] != _EOCD_SIG:
        return []
    _, _, _, this_disk, total, size, _, _ = _EOCD.unpack(record)
    claims64 = _zip64_claims(src, file_size, at) if at >= _LOCATOR.size else []
    if claims64:  # the all-ones values of the classic record only say "see the zip64 one"
        this_disk, total = (0 if n == 0xFFFF else n for n in (this_disk, total))
        size = 0 if size == 0xFFFFFFFF else size
    return [(max(this_disk, total), size), *claims64]


def _zip64_claims(src: BinaryIO, file_size: int, at: int) -> list[tuple[int, int]]:
    locator = _read_at(src, at - _LOCATOR.size, _LOCATOR.size)
    if locator[:4] != _LOCATOR_SIG:
        return []
    _, _, record64_at, _ = _LOCATOR.unpack(locator)
    claims = []
    # zipfile reads the zip64 record just before the locator; miniz (torch) where it points.
    for where in {at - _LOCATOR.size - _EOCD64.size, record64_at}:
        if not 0 <= where <= file_size - _EOCD64.size:
            continue
        record64 = _read_at(src, where, _EOCD64.size)
        if record64[:4] == _EOCD64_SIG:
            fields = _EOCD64.unpack(record64)
            claims.append((max(fields[6], fields[7]), fields[8]))
    return claims


def read_zip_directory(src: BinaryIO, file_size: int) -> ZipDirectory:
    """What the end records claim; BadZipFile when there is none. Reads 64 KiB at most."""
    if file_size < _EOCD.size:
        raise BadZipFile("File is not a zip file")
    tail_at = max(file_size - _MAX_COMMENT - _EOCD.size, 0)
    tail = _read_at(src, tail_at, file_size - tail_at)
    candidates = {file_size - _EOCD.size}  # a zip without a comment (zipfile looks here first)
    last = tail.rfind(_EOCD_SIG)
    if last >= 0:
        candidates.add(tail_at + last)  # the last signature (where every reader looks next)
    claims = [c for at in sorted(candidates) for c in _claims(src, file_size, at)]
    if not claims:
        raise BadZipFile("File is not a zip file")
    return ZipDirectory(entries=max(c[0] for c in claims), size=max(c[1] for c in claims))


def directory_too_large(directory: ZipDirectory, max_entries: int) -> bool:
    """True when the directory claims, or would take room for, more than max_entries entries."""
    return directory.entries > max_entries or directory.size > max_entries * MAX_ENTRY_BYTES
