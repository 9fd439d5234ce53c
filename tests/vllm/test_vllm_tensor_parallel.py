"""Tensor parallelism through vLLM's own executor: two CPU workers, one server, the same
tokens as the definition."""

from __future__ import annotations

import httpx
from transformers import AutoTokenizer

from tests.factories import greedy_by_recomputation, load_base, make_adapter, peft_prompt
from tests.vllm.conftest import auth, upload, vllm_server


def test_two_way_tensor_parallel_serves_the_definition(model_dir, tmp_path):
    adapter = make_adapter(model_dir, tmp_path / "pt", "prompt_tuning", num_virtual_tokens=5,
                           seed=4)
    base, tokenizer = load_base(model_dir), AutoTokenizer.from_pretrained(model_dir)
    with vllm_server(model_dir, tmp_path, "--tensor-parallel-size", "2") as proc, \
            httpx.Client(base_url=proc.url, timeout=300) as client:
        assert upload(client, "tenant-a", "pt", adapter).status_code == 201
        for adapter_id, rows in (("pt", peft_prompt(model_dir, adapter)), (None, None)):
            for text in ("hello", "The quick brown fox"):
                r = client.post("/v1/generate", headers=auth("tenant-a"), json={
                    "adapter_id": adapter_id, "text": text, "max_new_tokens": 8})
                assert r.status_code == 200, r.text
                ids = tokenizer(text)["input_ids"]
                assert r.json()["token_ids"] == greedy_by_recomputation(base, rows, ids, 8)
        log = proc.log_path.read_text(errors="replace")
        assert "tensor 2 x pipeline 1 x data 1" in log
