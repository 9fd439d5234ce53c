"""The harness's `--engine` and its vllm-peer baseline where vLLM may be missing: the choice
is served by the real server, the peer's request is what vLLM decodes, and what cannot run
is refused before anything is built. The vLLM runs themselves are in
tests/vllm/test_vllm_benchmarks.py."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch

from benchmarks.harness.cli import main
from benchmarks.harness.engine_runner import settings_for
from benchmarks.harness.fixtures import RequestSpec
from benchmarks.harness.vllm_peer import completion_body
from benchmarks.harness.workloads import WORKLOADS

SMALL = ["--layers", "1", "--repeats", "1", "--no-progress", "--requests", "2", "--adapters",
         "2", "--new-tokens", "2"]
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_the_peers_request_carries_the_adapter_rows_before_the_texts_embeddings() -> None:
    words = torch.arange(10 * 4, dtype=torch.float32).reshape(10, 4)  # [vocab, hidden]
    rows = {3: torch.full((2, 4), -1.0)}  # [virtual, hidden]
    spec = RequestSpec(index=0, adapter=3, prompt_ids=(7, 1, 7), new_tokens=5)
    body = json.loads(completion_body("m", spec, words, rows))
    sent = torch.load(io.BytesIO(base64.b64decode(body["prompt_embeds"])), weights_only=True)
    assert torch.equal(sent, torch.cat([rows[3], words[[7, 1, 7]]]))
    assert (body["max_tokens"], body["ignore_eos"], body["temperature"]) == (5, True, 0.0)
    assert "prompt" not in body  # with a prompt too, vLLM would serve it as a second one


def test_vllm_engine_refuses_the_in_process_engine_system(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--modes http"):
        main(["cpu-ref", "--engine", "vllm", "--modes", "engine,http", *SMALL,
              "--json", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
@pytest.mark.parametrize("args", [["--engine", "vllm"], ["--baselines", "vllm-peer",
                                                         "--modes", "http"]])
def test_without_vllm_the_vllm_systems_exit_with_the_install_line(args, tmp_path) -> None:
    with pytest.raises(SystemExit, match="pip install"):
        main(["cpu-ref", *args, *SMALL, "--json", str(tmp_path / "r.json")])


@pytest.mark.slow
def test_engine_builtin_serves_the_http_system_and_records_its_bytes(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert main(["cpu-ref", "--engine", "builtin", "--modes", "http", "--baselines", "",
                 *SMALL, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    http = result["systems"]["http"]
    assert (http["tokens"], http["requests"]) == (4, 2)
    assert result["extra"]["engine"] == "builtin"
    assert 0 < http["request_bytes"] < 1000 and http["response_bytes"] > 0


@pytest.mark.parametrize(("workload", "expected"), [("cpu-ref", "1GiB"), ("gpu-8b", "4GiB")])
def test_the_vllm_servers_kv_cache_holds_every_row_twice_in_whole_gib(workload, expected,
                                                                      tmp_path) -> None:
    settings = settings_for(WORKLOADS[workload], tmp_path, tmp_path, 0.0, engine="vllm")
    assert settings.kv_cache_memory == expected
    assert settings_for(WORKLOADS[workload], tmp_path, tmp_path, 0.0).kv_cache_memory == "auto"
