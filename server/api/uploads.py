"""Streaming multipart parsing for adapter uploads: parts go to temp files as bytes arrive.

Starlette's `request.form()` spools file parts with no size limit, so a client could make the
server write gigabytes before any check runs. Here python-multipart's incremental parser is fed
from `request.stream()` and every limit (per file, whole body, number of parts, text fields) is
checked on each chunk; the first excess aborts with UploadTooLargeError (413) before the rest is
read. Temp files live in one directory that is removed when the context exits, whatever happens.

The `template` field is the exception: its limit is the template grammar's, in characters, so
an overlong one is an InvalidTemplateError (400) naming that limit, as is one that is not UTF-8.
It is buffered up to the most bytes MAX_TEMPLATE_CHARS characters can take; what fits is
decoded and the grammar counts its characters.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from server.api.errors import InvalidUploadError, UploadTooLargeError
from server.engine.errors import InvalidTemplateError
from server.engine.prompt_layout import MAX_TEMPLATE_CHARS

MAX_FIELD_BYTES = 4096  # a text field (adapter_id) is short
# A template of MAX_TEMPLATE_CHARS characters takes at most 4 UTF-8 bytes per character.
MAX_TEMPLATE_BYTES = 4 * MAX_TEMPLATE_CHARS
FILE_NAMES = frozenset({"config", "weights", "archive"})
TEXT_NAMES = frozenset({"adapter_id", "template"})


@dataclass(frozen=True)
class SpooledFile:
    path: str
    filename: str  # basename the client gave, "" when none
    size: int


@dataclass
class SpooledUpload:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, SpooledFile] = field(default_factory=dict)


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    size: int = 0
    out: BinaryIO | None = None  # open temp file for a known file part
    text: bytearray | None = None  # for a known text field
    path: str = ""


class _Spooler:
    """Receives python-multipart callbacks and enforces the limits on every piece of data."""

    def __init__(self, tmp_dir: Path, *, max_file_bytes: int, max_parts: int) -> None:
        self.tmp_dir = tmp_dir
        self.max_file_bytes = max_file_bytes
        self.max_parts = max_parts
        self.parts = 0
        self.result = SpooledUpload()
        self._part = _Part()
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._value = b""

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._add("_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._add("_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _add(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise UploadTooLargeError(f"more than {self.max_parts} multipart parts "
                                      "(--max-upload-parts)")
        self._part = _Part()
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[self._field.strip().lower()] = self._value.strip()
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        part = self._part
        part.name = options.get(b"name", b"").decode("utf-8", "replace")
        raw_filename = options.get(b"filename")
        if raw_filename is not None:
            part.filename = Path(raw_filename.decode("utf-8", "replace")
                                 .replace("\\", "/")).name
        if part.name in self.result.fields or part.name in self.result.files:
            raise InvalidUploadError(f"multipart field {part.name!r} given twice")
        if part.name in FILE_NAMES:
            part.path = str(self.tmp_dir / f"{self.parts}-{part.name}")
            part.out = open(part.path, "wb")  # noqa: SIM115 - closed in _part_end/close
        elif part.name in TEXT_NAMES:
            part.text = bytearray()
        # Anything else is read and dropped (still counted against the body limit).

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        part.size += end - start
        if part.out is not None:
            if part.size > self.max_file_bytes:
                raise UploadTooLargeError(
                    f"file {part.name!r} is larger than {self.max_file_bytes} bytes "
                    "(--max-upload-bytes)")
            part.out.write(data[start:end])
        elif part.text is not None:
            if part.name == "template" and part.size > MAX_TEMPLATE_BYTES:
                raise InvalidTemplateError(
                    f"template is longer than {MAX_TEMPLATE_BYTES} bytes, so more than "
                    f"{MAX_TEMPLATE_CHARS} characters; at most {MAX_TEMPLATE_CHARS} characters "
                    "are allowed")
            if part.name != "template" and part.size > MAX_FIELD_BYTES:
                raise UploadTooLargeError(f"field {part.name!r} is longer than "
                                          f"{MAX_FIELD_BYTES} bytes")
            part.text += data[start:end]

    def _part_end(self) -> None:
        part = self._part
        if part.out is not None:
            part.out.close()
            part.out = None
            self.result.files[part.name] = SpooledFile(part.path, part.filename or "", part.size)
        elif part.text is not None:
            try:
                self.result.fields[part.name] = part.text.decode("utf-8")
            except UnicodeDecodeError as e:
                if part.name == "template":
                    raise InvalidTemplateError(f"template is not UTF-8: {e.reason} at byte "
                                               f"{e.start}") from e
                raise InvalidUploadError(f"field {part.name!r} is not UTF-8") from e

    def close(self) -> None:
        if self._part.out is not None:
            self._part.out.close()


def _boundary(request: Request) -> bytes:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise InvalidUploadError(
            "expected Content-Type multipart/form-data with a text field 'adapter_id' and files "
            "'config' + 'weights', or one file 'archive'")
    boundary = options.get(b"boundary")
    if not boundary:
        raise InvalidUploadError("multipart/form-data without a boundary")
    return boundary


@asynccontextmanager
async def spool_multipart(request: Request, *, max_file_bytes: int, max_body_bytes: int,
                          max_parts: int) -> AsyncIterator[SpooledUpload]:
    """Parse the request body into temp files; they exist only inside the `async with`."""
    boundary = _boundary(request)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise UploadTooLargeError(f"body of {declared} bytes is larger than {max_body_bytes}")
    tmp_dir = Path(tempfile.mkdtemp(prefix="softprompt-upload-"))
    spooler = _Spooler(tmp_dir, max_file_bytes=max_file_bytes, max_parts=max_parts)
    try:
        try:
            parser = MultipartParser(boundary, spooler.callbacks())
        except ValueError as e:
            raise InvalidUploadError(f"bad multipart boundary: {e}") from e
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_body_bytes:
                raise UploadTooLargeError(f"body is larger than {max_body_bytes} bytes")
            try:
                parser.write(chunk)
            except MultipartParseError as e:
                raise InvalidUploadError(f"malformed multipart body: {e}") from e
        try:
            parser.finalize()
        except MultipartParseError as e:
            raise InvalidUploadError(f"malformed multipart body: {e}") from e
        spooler.close()
        yield spooler.result
    finally:
        spooler.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
