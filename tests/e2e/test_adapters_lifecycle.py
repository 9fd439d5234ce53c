"""Adapter lifecycle over HTTP on the real server: upload, list, get, delete, restart, bad input,
on the built-in engine and on vLLM where it is installed (the restart on the built-in engine
only: the store it reads back is the same whichever engine serves)."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from tests.e2e.conftest import BUILTIN_AND_VLLM, SERVER_FLAGS, upload
from tests.e2e.server_process import ServerProcess
from tests.factories import make_adapter

RECORD_KEYS = {"adapter_id", "peft_type", "task_type", "num_virtual_tokens", "token_dim",
               "sha256", "size_bytes", "created_at", "template"}


@pytest.fixture(scope="module", **BUILTIN_AND_VLLM)
def server(request, model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    with ServerProcess(model_dir, root / "store", root / "server.log", *SERVER_FLAGS,
                       *request.param) as proc:
        yield proc


def assert_envelope(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"type", "message"} and error["message"]
    return error


def test_upload_get_list_delete_then_404(client, adapter_dirs):
    r = upload(client, "life-1", adapter_dirs["p_tuning_mlp"][0])
    assert r.status_code == 201, r.text
    record = r.json()
    assert set(record) == RECORD_KEYS
    assert record["peft_type"] == "P_TUNING" and record["token_dim"] == 64
    assert client.get("/v1/adapters/life-1").json() == record
    assert record in client.get("/v1/adapters").json()["adapters"]
    gen = client.post("/v1/generate", json={"adapter_id": "life-1", "text": "hi"})
    assert gen.status_code == 200
    assert gen.json()["usage"]["virtual_tokens"] == record["num_virtual_tokens"] == 5

    assert client.delete("/v1/adapters/life-1").status_code == 204
    assert_envelope(client.get("/v1/adapters/life-1"), 404)
    assert_envelope(client.delete("/v1/adapters/life-1"), 404)
    assert_envelope(client.post("/v1/generate", json={"adapter_id": "life-1", "text": "hi"}), 404)


def test_same_id_conflicts_unless_overwrite(client, adapter_dirs):
    assert upload(client, "life-dup", adapter_dirs["prompt_tuning"][0]).status_code == 201
    err = assert_envelope(upload(client, "life-dup", adapter_dirs["p_tuning_mlp"][0]), 409)
    assert err["type"] == "adapter_exists"
    r = upload(client, "life-dup", adapter_dirs["p_tuning_mlp"][0], overwrite=True)
    assert r.status_code == 201 and r.json()["peft_type"] == "P_TUNING"


def _files(config: bytes, weights: bytes) -> dict:
    return {"config": ("adapter_config.json", config, "application/json"),
            "weights": ("adapter_model.safetensors", weights, "application/octet-stream")}


def test_bad_uploads_get_4xx_envelopes(client, adapter_dirs, tiny_model_dirs, tmp_path):
    good = adapter_dirs["prompt_tuning"][0]
    config = (good / "adapter_config.json").read_bytes()
    weights = (good / "adapter_model.safetensors").read_bytes()
    lora = json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8}).encode()
    narrow = make_adapter(tiny_model_dirs["qwen2"], tmp_path / "qwen", "prompt_tuning")
    cases = {
        "lora": (400, _files(lora, weights)),
        "hidden-size": (400, _files((narrow / "adapter_config.json").read_bytes(),
                                    (narrow / "adapter_model.safetensors").read_bytes())),
        "garbage": (400, _files(config, os.urandom(4096))),
        "not-json": (400, _files(b"{not json", weights)),
        "too-big": (413, _files(config, b"\0" * 1_200_000)),
    }
    for adapter_id, (status, files) in cases.items():
        r = client.post("/v1/adapters", data={"adapter_id": f"bad-{adapter_id}"}, files=files)
        assert_envelope(r, status)
        assert_envelope(client.get(f"/v1/adapters/bad-{adapter_id}"), 404)
    missing = {"config": ("adapter_config.json", config, "application/json")}
    assert_envelope(client.post("/v1/adapters", data={"adapter_id": "bad-missing"},
                                files=missing), 400)
    assert_envelope(client.post("/v1/adapters", files=_files(config, weights)), 422)
    assert_envelope(client.post("/v1/adapters", data={"adapter_id": "../etc"},
                                files=_files(config, weights)), 422)
    assert_envelope(client.post("/v1/adapters", json={"adapter_id": "x"}), 400)


def test_generate_validation_errors(client):
    for body in ({"text": "x", "max_new_tokens": 0}, {"text": "x", "temperature": -1},
                 {"text": "x", "top_p": 0}, {"text": "x", "top_k": -1}, {},
                 {"text": "x", "adapter_id": "bad/id"}, {"text": "x", "max_new_tokens": 10**6}):
        assert_envelope(client.post("/v1/generate", json=body), 422)
    r = client.post("/v1/generate", content=b"{oops", headers={"content-type": "application/json"})
    assert_envelope(r, 422)


@pytest.mark.slow
def test_adapters_survive_a_restart(model_dir, adapter_dirs, tmp_path):
    store, body = tmp_path / "store", {"adapter_id": "keep", "text": "persist", "max_new_tokens": 6}
    with ServerProcess(model_dir, store, tmp_path / "first.log") as first, \
            httpx.Client(base_url=first.url, timeout=60) as c:
        assert upload(c, "keep", adapter_dirs["p_tuning_lstm"][0]).status_code == 201
        before = c.post("/v1/generate", json=body).json()
    with ServerProcess(model_dir, store, tmp_path / "second.log") as second, \
            httpx.Client(base_url=second.url, timeout=60) as c:
        assert [a["adapter_id"] for a in c.get("/v1/adapters").json()["adapters"]] == ["keep"]
        after = c.post("/v1/generate", json=body)
        assert after.status_code == 200 and after.json() == before
