"""Multipart uploads are parsed as they stream: limits stop reading early, temp files vanish."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from tests.api.conftest import assert_envelope

BOUNDARY = "sp-test-boundary"


@pytest.fixture(autouse=True)
def own_temp_dir(tmp_path, monkeypatch) -> None:
    """Spools go to a directory of this test's own, so another process's uploads (a server
    that another test runs meanwhile) are never counted as this one's leftovers."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def _leftover_spools() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("softprompt-upload-*")}


class CountingBody:
    """An async request body that records how much of it the server pulled."""

    def __init__(self, head: bytes, chunk: bytes, chunks: int) -> None:
        self.head, self.chunk, self.chunks, self.sent = head, chunk, chunks, 0

    async def __aiter__(self):
        yield self.head
        for _ in range(self.chunks):
            self.sent += 1
            yield self.chunk


def _head(*parts: tuple[str, str | None, bytes]) -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"'
                                                     if filename else "")
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data
        out += b"\r\n"
    return out


async def test_oversized_file_is_refused_before_the_body_is_read(client):
    before = _leftover_spools()
    # A 'weights' part that would be 64 MB; the limit in this app is 200 kB.
    head = _head(("adapter_id", None, b"big"))
    head += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"weights\"; "
             f"filename=\"adapter_model.safetensors\"\r\n\r\n").encode()
    body = CountingBody(head, b"\0" * 65536, 1024)
    r = await client.post("/v1/adapters", content=body,
                          headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert_envelope(r, 413, "payload_too_large")
    assert body.sent < 10, f"server read {body.sent} chunks of 64 kB before refusing"
    assert _leftover_spools() == before


async def test_declared_oversized_body_is_refused_without_reading(client):
    body = CountingBody(b"", b"\0" * 65536, 100)
    r = await client.post("/v1/adapters", content=body, headers={
        "content-type": f"multipart/form-data; boundary={BOUNDARY}",
        "content-length": str(10**9)})
    assert_envelope(r, 413)
    assert body.sent == 0


async def test_too_many_parts_is_413(client):
    parts = [(f"extra{i}", None, b"x") for i in range(20)]
    r = await client.post("/v1/adapters", content=_head(*parts) + f"--{BOUNDARY}--\r\n".encode(),
                          headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert_envelope(r, 413)


async def test_framing_errors_are_400(client):
    files = {"config": ("adapter_config.json", b"{}"), "weights": ("w.safetensors", b"x"),
             "archive": ("a.tar.gz", b"x")}
    r = await client.post("/v1/adapters", data={"adapter_id": "both"}, files=files)
    assert_envelope(r, 400, "invalid_upload")
    r = await client.post("/v1/adapters", content=b"--nope\r\n garbage",
                          headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert_envelope(r, 400, "invalid_upload")
    r = await client.post("/v1/adapters", content=b"x", headers={"content-type": "text/plain"})
    assert_envelope(r, 400, "invalid_upload")
    r = await client.post("/v1/adapters", content=b"x",
                          headers={"content-type": "multipart/form-data"})
    assert_envelope(r, 400, "invalid_upload")


async def test_garbage_archive_is_400_and_nothing_is_stored(client):
    r = await client.post("/v1/adapters", data={"adapter_id": "junk"},
                          files={"archive": ("junk.tar.gz", b"\x1f\x8b not really gzip")})
    assert_envelope(r, 400)
    assert_envelope(await client.get("/v1/adapters/junk"), 404, "adapter_not_found")
