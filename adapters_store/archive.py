"""Reading an adapter out of a .tar.gz/.tgz/.tar/.zip upload, in memory, defensively.

Nothing is extracted to disk. Member paths are checked (no absolute paths, no ``..``), links and
special files are refused, the member count is capped, and every decompressed byte is counted
as it is produced, so a zip or gzip bomb stops at ``limits.max_decompressed_bytes`` whatever
its headers claim. Only ``adapter_config.json`` and ``adapter_model.{safetensors,bin}`` at the
top level, or inside one top-level directory, are read; every other member (README.md,
tokenizer files, training_args.bin, ...) is skipped without being parsed.
"""

from __future__ import annotations

import gzip
import io
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from adapters_store.config import CONFIG_NAME
from adapters_store.errors import (
    FileTooLargeError,
    TooManyArchiveMembersError,
    UnsafeArchiveError,
)
from adapters_store.records import Limits
from adapters_store.weights import WEIGHTS_NAMES, size_limit
from adapters_store.zip_directory import directory_too_large, read_zip_directory

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
_WANTED = (CONFIG_NAME, *WEIGHTS_NAMES)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class AdapterFiles:
    """The files of one adapter found in an archive; None where absent."""

    config: bytes | None
    weights: bytes | None
    weights_name: str | None


def _too_big(limits: Limits) -> FileTooLargeError:
    return FileTooLargeError(
        f"the archive decompresses to more than {limits.max_decompressed_bytes} bytes "
        "(this server's limit): upload only the adapter files"
    )


class _CountingReader(io.RawIOBase):
    """Caps a decompressing stream: never returns, nor asks for, more than the limit allows."""

    def __init__(self, raw: BinaryIO, limits: Limits) -> None:
        self._raw, self._limits, self.count = raw, limits, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        room = self._limits.max_decompressed_bytes - self.count + 1
        size = room if size is None or size < 0 or size > room else size
        data = self._raw.read(size)
        self.count += len(data)
        if self.count > self._limits.max_decompressed_bytes:
            raise _too_big(self._limits)
        return data


def _member_parts(name: str) -> tuple[str, ...]:
    """Path components of a member, or UnsafeArchiveError for an absolute or escaping path."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or "\\" in name:
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path; refused")
    parts = tuple(p for p in PurePosixPath(name).parts if p != ".")
    if ".." in parts:
        raise UnsafeArchiveError(f"archive member {name!r} has a '..' path component; refused")
    return parts


class _Collector:
    """Counts members and keeps the wanted files, keyed by (top directory or "", name)."""

    def __init__(self, limits: Limits) -> None:
        self.limits, self.members, self.files = limits, 0, {}
        self.decompressed = 0  # zip only: tar counts in its _CountingReader

    def too_many(self) -> TooManyArchiveMembersError:
        return TooManyArchiveMembersError(
            f"the archive has more than {self.limits.max_archive_members} members: upload "
            f"only {CONFIG_NAME} and the adapter_model file"
        )

    def admit(self, name: str) -> tuple[str, str] | None:
        """Check one member; return its key when it is a file worth reading."""
        self.members += 1
        if self.members > self.limits.max_archive_members:
            raise self.too_many()
        parts = _member_parts(name)
        if not parts or len(parts) > 2 or parts[-1] not in _WANTED:
            return None
        key = ("" if len(parts) == 1 else parts[0], parts[-1])
        if key in self.files:
            raise UnsafeArchiveError(f"archive holds {'/'.join(parts)} twice")
        return key

    def read(self, key: tuple[str, str], stream: BinaryIO, declared_size: int,
             count: bool) -> None:
        cap = size_limit(key[1], self.limits)
        if declared_size > cap:
            raise FileTooLargeError(f"{key[1]} is {declared_size} bytes, above the {cap} limit")
        chunks, total = [], 0
        while chunk := stream.read(_CHUNK):
            total += len(chunk)
            if count:
                self.decompressed += len(chunk)
                if self.decompressed > self.limits.max_decompressed_bytes:
                    raise _too_big(self.limits)
            if total > cap:
                raise FileTooLargeError(f"{key[1]} is more than {cap} bytes, above the limit")
            chunks.append(chunk)
        self.files[key] = b"".join(chunks)

    def result(self) -> AdapterFiles:
        dirs = sorted({d for d, name in self.files if name == CONFIG_NAME})
        if not dirs:
            return AdapterFiles(None, None, None)
        if "" in dirs:
            chosen = ""  # the adapter at the top level, whatever checkpoints sit beside it
        elif len(dirs) == 1:
            chosen = dirs[0]
        else:
            raise UnsafeArchiveError(
                f"the archive holds several adapters ({', '.join(dirs)}): upload one at a time"
            )
        for name in WEIGHTS_NAMES:
            if (chosen, name) in self.files:
                return AdapterFiles(self.files[(chosen, CONFIG_NAME)], self.files[(chosen, name)],
                                    name)
        return AdapterFiles(self.files[(chosen, CONFIG_NAME)], None, None)


def _read_tar(src: BinaryIO, limits: Limits, *, gzipped: bool) -> AdapterFiles:
    raw = gzip.GzipFile(fileobj=src, mode="rb") if gzipped else src
    counter = _CountingReader(raw, limits)
    collector = _Collector(limits)
    with tarfile.open(fileobj=counter, mode="r|") as tar:
        for member in tar:
            key = collector.admit(member.name)
            if member.issym() or member.islnk():
                raise UnsafeArchiveError(f"archive member {member.name!r} is a link; refused")
            if member.isdir():
                continue
            if not member.isfile():
                raise UnsafeArchiveError(
                    f"archive member {member.name!r} is a device or special file; refused"
                )
            if key is not None:
                stream = tar.extractfile(member)
                assert stream is not None
                collector.read(key, stream, member.size, count=False)
    return collector.result()


def _read_zip(src: BinaryIO, size: int, limits: Limits) -> AdapterFiles:
    collector = _Collector(limits)
    # From the end records first: zipfile builds its whole entry list before we could count.
    if directory_too_large(read_zip_directory(src, size), limits.max_archive_members):
        raise collector.too_many()
    with zipfile.ZipFile(src) as zf:
        infos = zf.infolist()
        if len(infos) > limits.max_archive_members:
            raise collector.too_many()
        if sum(i.file_size for i in infos) > limits.max_decompressed_bytes:
            raise _too_big(limits)  # early reject only; actual bytes are counted below
        for info in infos:
            key = collector.admit(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsafeArchiveError(f"archive member {info.filename!r} is a link; refused")
            if info.is_dir():
                continue
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: no Unix type recorded
                raise UnsafeArchiveError(
                    f"archive member {info.filename!r} is a device or special file; refused"
                )
            if key is None:
                continue
            if info.flag_bits & 0x1:
                raise UnsafeArchiveError(f"archive member {info.filename!r} is encrypted")
            with zf.open(info) as stream:
                collector.read(key, stream, info.file_size, count=True)
    return collector.result()


def read_archive(source: bytes | str | Path, *, archive_name: str,
                 limits: Limits) -> AdapterFiles:
    """The adapter files inside an archive; the format is chosen by archive_name's suffix."""
    lower = archive_name.lower()
    if not lower.endswith(ARCHIVE_SUFFIXES):
        raise UnsafeArchiveError(
            f"archive {archive_name!r} is not a supported archive: upload a "
            f"{', '.join(ARCHIVE_SUFFIXES)} file"
        )
    if isinstance(source, bytes | bytearray | memoryview):
        size, src = len(source), io.BytesIO(source)
    else:
        size, src = Path(source).stat().st_size, open(source, "rb")  # noqa: SIM115
    with src:
        if size > limits.max_decompressed_bytes:
            raise FileTooLargeError(
                f"archive {archive_name!r} is {size} bytes, above this server's limit of "
                f"{limits.max_decompressed_bytes} bytes"
            )
        try:
            if lower.endswith(".zip"):
                return _read_zip(src, size, limits)
            return _read_tar(src, limits, gzipped=not lower.endswith(".tar"))
        except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError,
                ValueError, NotImplementedError, RuntimeError) as e:
            raise UnsafeArchiveError(
                f"archive {archive_name!r} is corrupt or not a {archive_name.rsplit('.', 1)[-1]} "
                f"file: {e}"
            ) from e
