"""Hostile input through HTTP against the real server: every case is a 4xx with the error
envelope and a message, nothing lands in the store, and the server still answers afterwards,
on the built-in engine and on vLLM where it is installed."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import torch
from safetensors.torch import save as save_safetensors

from tests.e2e.conftest import BUILTIN_AND_VLLM
from tests.e2e.server_process import ServerProcess

PWNED = Path("/tmp/softprompt-hostile-pwned")


class _Evil:
    """Unpickling this runs a shell command (it would create PWNED)."""

    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


@pytest.fixture(scope="module", **BUILTIN_AND_VLLM)
def hostile(request, model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    with ServerProcess(model_dir, root / "store", root / "server.log",
                       "--max-upload-bytes", "1000000", *request.param) as proc:
        yield proc, root / "store"


@pytest.fixture()
def hclient(hostile):
    with httpx.Client(base_url=hostile[0].url, timeout=60) as c:
        yield c


def _stored(store: Path) -> set[str]:
    return {str(p.relative_to(store)) for p in store.rglob("*")} if store.exists() else set()


def _good(adapter_dirs) -> tuple[bytes, bytes, dict]:
    d = adapter_dirs["prompt_tuning"][0]
    config = (d / "adapter_config.json").read_bytes()
    return config, (d / "adapter_model.safetensors").read_bytes(), json.loads(config)


def _tensor(adapter_dirs) -> torch.Tensor:
    from safetensors.torch import load
    return load(_good(adapter_dirs)[1])["prompt_embeddings"]


def _pair(config: bytes, weights: bytes, name: str = "adapter_model.safetensors") -> dict:
    return {"files": {"config": ("adapter_config.json", config, "application/json"),
                      "weights": (name, weights, "application/octet-stream")}}


def _archive(kind: str, members: Callable) -> bytes:
    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            members(z)
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as t:
            members(t)
    return buf.getvalue()


def _tar_add(t: tarfile.TarFile, name: str, data: bytes, **kw) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    t.addfile(info, io.BytesIO(data))


def _upload_cases(adapter_dirs) -> dict[str, dict]:
    config, weights, cfg = _good(adapter_dirs)
    t = _tensor(adapter_dirs)
    evil = io.BytesIO()
    torch.save({"prompt_embeddings": _Evil()}, evil)
    nan, inf = t.clone(), t.clone()
    nan[0, 0], inf[-1, -1] = float("nan"), float("inf")
    zeros = b"\0" * (64 << 20)

    def zip_bomb(z):
        z.writestr("adapter_config.json", config)
        z.writestr("adapter_model.safetensors", zeros)

    def gzip_bomb(t_):
        _tar_add(t_, "adapter_config.json", config)
        _tar_add(t_, "adapter_model.safetensors", zeros)

    def dotdot(t_):
        _tar_add(t_, "../adapter_config.json", config)
        _tar_add(t_, "../adapter_model.safetensors", weights)

    def absolute(z):
        z.writestr("/tmp/adapter_config.json", config)
        z.writestr("/tmp/adapter_model.safetensors", weights)

    def link(t_):
        _tar_add(t_, "adapter_config.json", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        _tar_add(t_, "adapter_model.safetensors", weights)

    def archive(kind: str, members: Callable) -> dict:
        name = "a.zip" if kind == "zip" else "a.tar.gz"
        return {"files": {"archive": (name, _archive(kind, members), "application/octet-stream")}}

    return {
        "pickle-bin": _pair(config, evil.getvalue(), "adapter_model.bin"),
        "zip-bomb": archive("zip", zip_bomb),
        "gzip-bomb": archive("tgz", gzip_bomb),
        "dotdot-member": archive("tgz", dotdot),
        "absolute-member": archive("zip", absolute),
        "link-member": archive("tgz", link),
        "nan-tensor": _pair(config, save_safetensors({"prompt_embeddings": nan})),
        "inf-tensor": _pair(config, save_safetensors({"prompt_embeddings": inf})),
        "1e9-virtual-tokens": _pair(json.dumps(cfg | {"num_virtual_tokens": 10**9}).encode(),
                                    weights),
        "wrong-hidden-size": _pair(config, save_safetensors(
            {"prompt_embeddings": torch.zeros(t.shape[0], t.shape[1] + 3)})),
        "json-not-multipart": {"json": {"adapter_id": "x", "config": cfg}},
        "text-plain": {"content": b"adapter_id=x", "headers": {"content-type": "text/plain"}},
    }


UPLOAD_CASES = ["pickle-bin", "zip-bomb", "gzip-bomb", "dotdot-member", "absolute-member",
                "link-member", "nan-tensor", "inf-tensor", "1e9-virtual-tokens",
                "wrong-hidden-size", "json-not-multipart", "text-plain"]


def _assert_4xx(r: httpx.Response) -> str:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    return body["error"]["message"]


def _still_serves(client: httpx.Client) -> None:
    r = client.post("/v1/generate", json={"text": "still there?", "max_new_tokens": 2})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("case", UPLOAD_CASES)
def test_hostile_upload(hclient, hostile, adapter_dirs, case):
    store = hostile[1]
    before = _stored(store)
    kwargs = _upload_cases(adapter_dirs)[case]
    data = None if "json" in kwargs or "content" in kwargs else {"adapter_id": f"h-{case}"}
    r = hclient.post("/v1/adapters", data=data, **kwargs)
    _assert_4xx(r)
    assert not PWNED.exists()
    assert _stored(store) == before
    assert hclient.get(f"/v1/adapters/h-{case}").status_code == 404
    _still_serves(hclient)


@pytest.mark.parametrize("adapter_id", ["../etc", "a/b", "/abs", "..", "a" * 129, "x\0y",
                                        " lead", "ünï"])
def test_path_like_and_overlong_ids(hclient, hostile, adapter_dirs, adapter_id):
    config, weights, _ = _good(adapter_dirs)
    before = _stored(hostile[1])
    _assert_4xx(hclient.post("/v1/adapters", data={"adapter_id": adapter_id},
                             **_pair(config, weights)))
    assert _stored(hostile[1]) == before
    r = hclient.get("/v1/adapters/" + quote(adapter_id, safe=""))
    assert r.status_code in (404, 422), r.text
    _assert_4xx(hclient.post("/v1/generate", json={"adapter_id": adapter_id, "text": "x"}))
    _still_serves(hclient)


def _nested(depth: int) -> bytes:
    return b'{"text": "x", "stop": ' + b"[" * depth + b"]" * depth + b"}"


GENERATE_BODIES = {
    "negative-max-new-tokens": {"json": {"text": "x", "max_new_tokens": -5}},
    "enormous-max-new-tokens": {"json": {"text": "x", "max_new_tokens": 10**40}},
    "float-max-new-tokens": {"json": {"text": "x", "max_new_tokens": 1e308}},
    "huge-body": {"json": {"text": "x" * (40 << 20)}},
    "deeply-nested": {"content": _nested(100_000),
                      "headers": {"content-type": "application/json"}},
    "invalid-utf8": {"content": b'{"text": "\xff\xfe\xc3\x28"}',
                     "headers": {"content-type": "application/json"}},
    "text-plain": {"content": b"hello", "headers": {"content-type": "text/plain"}},
    "form-encoded": {"data": {"text": "x"}},
    "not-an-object": {"json": ["text", "x"]},
}


@pytest.mark.parametrize("case", list(GENERATE_BODIES))
def test_hostile_generate_bodies(hclient, case):
    message = _assert_4xx(hclient.post("/v1/generate", **GENERATE_BODIES[case]))
    assert len(message) < 2000  # the message describes, it does not echo a 40 MB body
    _still_serves(hclient)


@pytest.mark.parametrize("text", ["\ud800 lone surrogate", "\u202eevil\u202c", "a\u200b\u200db",
                                  "\x00\x01\x7f", "🧪" * 50, "e\u0301" * 20, "\ufeff\ufffe"])
def test_odd_unicode_text_is_served_or_refused_never_a_5xx(hclient, text):
    body = json.dumps({"text": text, "max_new_tokens": 2}).encode()  # escapes surrogates
    r = hclient.post("/v1/generate", content=body,
                     headers={"content-type": "application/json"})
    if r.status_code != 200:
        _assert_4xx(r)
    _still_serves(hclient)
