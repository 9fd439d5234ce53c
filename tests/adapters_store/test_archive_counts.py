"""Archives with hundreds of thousands of members are refused at once: a zip from its end
records (before zipfile lists a single entry), a tar as soon as one member too many is read.
What is asserted is the work done (zipfile never opens the archive; the tar reader stops at
the first member over the limit), not how long it took."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest

from adapters_store import (
    ConfigMissingError,
    Limits,
    TooManyArchiveMembersError,
    UnsafeArchiveError,
    parse_archive,
)
from tests.adapters_store.conftest import spec_for
from tests.adapters_store.helpers import zip_of_empty_entries

GPT2 = spec_for("gpt2")


def _zip_opens(monkeypatch) -> list[object]:
    """From now on, what each zipfile.ZipFile is opened on (opening reads the whole directory)."""
    opened: list[object] = []

    class ZipFile(zipfile.ZipFile):
        def __init__(self, file, *args, **kwargs) -> None:
            opened.append(file)
            super().__init__(file, *args, **kwargs)

    monkeypatch.setattr(zipfile, "ZipFile", ZipFile)
    return opened


def test_a_zip_of_200k_entries_is_refused_from_its_end_records(monkeypatch):
    data = zip_of_empty_entries(200_000, prefix="junk/")
    assert len(zipfile.ZipFile(io.BytesIO(data)).namelist()) == 200_000  # a valid zip
    opened = _zip_opens(monkeypatch)
    with pytest.raises(TooManyArchiveMembersError, match="more than 16 members"):
        parse_archive(data, archive_name="a.zip", spec=GPT2)
    assert opened == []


def test_a_zip_whose_end_record_understates_its_entries_is_refused_fast(monkeypatch):
    """The count says 3; the directory's size says otherwise, and zipfile reads by size."""
    data = zip_of_empty_entries(200_000, claimed=3, prefix="junk/")
    opened = _zip_opens(monkeypatch)
    with pytest.raises(TooManyArchiveMembersError):
        parse_archive(data, archive_name="a.zip", spec=GPT2)
    assert opened == []


def test_a_zip_from_a_path_is_counted_the_same_way(tmp_path):
    path = tmp_path / "a.zip"
    path.write_bytes(zip_of_empty_entries(100_000, prefix="junk/"))
    with pytest.raises(TooManyArchiveMembersError):
        parse_archive(path, archive_name="a.zip", spec=GPT2)


def test_a_zip_within_the_member_limit_is_read_on():
    data = zip_of_empty_entries(20, prefix="junk/")
    with pytest.raises(TooManyArchiveMembersError, match="more than 16 members"):
        parse_archive(data, archive_name="a.zip", spec=GPT2)
    with pytest.raises(ConfigMissingError):  # read, and found to hold no adapter
        parse_archive(data, archive_name="a.zip", spec=GPT2,
                      limits=Limits(max_archive_members=20))


def test_a_file_ending_without_an_end_record_is_a_corrupt_archive():
    data = zip_of_empty_entries(3, prefix="junk/")[:-22]
    with pytest.raises(UnsafeArchiveError, match="a.zip' is corrupt"):
        parse_archive(data, archive_name="a.zip", spec=GPT2)


def test_a_tar_of_100k_entries_stops_at_the_first_member_over_the_limit(monkeypatch):
    header = tarfile.TarInfo("junk.txt").tobuf(format=tarfile.USTAR_FORMAT)
    data = header * 100_000 + bytes(1024)  # 100k empty members, then the end-of-archive
    headers_read: set[int] = set()  # each member's offset in the archive
    real_next = tarfile.TarFile.next

    def next_member(self):
        member = real_next(self)
        if member is not None:
            headers_read.add(member.offset)
        return member

    monkeypatch.setattr(tarfile.TarFile, "next", next_member)
    with pytest.raises(TooManyArchiveMembersError, match="more than 16 members"):
        parse_archive(data, archive_name="a.tar", spec=GPT2)
    assert len(headers_read) == 17
