"""Through HTTP on the real server: every adapter type, concurrent and mixed, equals PEFT."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest
from transformers import AutoTokenizer

from tests.e2e.conftest import ENGINE_MODES, SERVER_FLAGS, tar_gz, upload, upload_archive
from tests.e2e.server_process import ServerProcess, metric, summed_metric
from tests.factories import load_peft_reference, reference_greedy

PROMPTS = ["Tweet: I love it. Label:", "hello", "The quick brown fox", "a", "2 + 2 =",
           "Once upon a time", "zzz", "Soft prompts!"]


# The engine (its core, the default) in process and in its own process (--engine-process).
@pytest.fixture(scope="module", **ENGINE_MODES)
def server(request, model_dir, tmp_path_factory):
    """Every test here runs against each engine mode."""
    root = tmp_path_factory.mktemp("server")
    with ServerProcess(model_dir, root / "store", root / "server.log", *SERVER_FLAGS,
                       *request.param) as proc:
        yield proc


def test_concurrent_generate_across_adapters_equals_peft(server, client, adapter_dirs,
                                                         model_dir, tmp_path):
    ids: dict[str | None, object] = {None: None}
    for name, (upload_dir, reference_dir) in adapter_dirs.items():
        r = upload(client, f"par-{name}", upload_dir)
        assert r.status_code == 201, r.text
        ids[f"par-{name}"] = reference_dir
    archive = tar_gz(adapter_dirs["p_tuning_lstm"][0], tmp_path / "lstm.tar.gz")
    r = upload_archive(client, "par-archive", archive)
    assert r.status_code == 201, r.text
    ids["par-archive"] = adapter_dirs["p_tuning_lstm"][1]

    rng = random.Random(0)
    jobs = [(adapter_id, PROMPTS[i % len(PROMPTS)], rng.randint(3, 12))
            for i, adapter_id in enumerate(list(ids) * 4)]  # 24 requests, 6 adapters + bare
    rng.shuffle(jobs)

    async def run_all() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:
            responses = await asyncio.gather(*(
                ac.post("/v1/generate", json={"adapter_id": a, "text": t, "max_new_tokens": n,
                                              "ignore_eos": True})
                for a, t, n in jobs))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        return [r.json() for r in responses]

    results = asyncio.run(run_all())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    references = {a: load_peft_reference(model_dir, d) for a, d in ids.items()}
    for (adapter_id, text, n), got in zip(jobs, results, strict=True):
        prompt_ids = tokenizer(text)["input_ids"]  # the tokenizer's defaults, as DESIGN says
        expected = reference_greedy(references[adapter_id], prompt_ids, n)
        assert got["token_ids"] == expected, (adapter_id, text)
        assert got["adapter_id"] == adapter_id
        assert got["finish_reason"] == "length"
        assert got["usage"]["completion_tokens"] == n
        assert got["usage"]["prompt_tokens"] == len(prompt_ids)


def test_stream_matches_non_stream(client, adapter_dirs):
    assert upload(client, "stream-pt", adapter_dirs["prompt_tuning"][0]).status_code == 201
    body = {"adapter_id": "stream-pt", "text": "hello", "max_new_tokens": 9, "ignore_eos": True}
    plain = client.post("/v1/generate", json=body).json()
    events = []
    with client.stream("POST", "/v1/generate", json=body | {"stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert all(e["finish_reason"] is None for e in parsed[:-1])
    final = parsed[-1]
    assert final["finish_reason"] == plain["finish_reason"]
    # The same counts; the second request found the adapter's soft prompt in the prefix cache
    # (vLLM caches whole blocks only, 128 positions on a CPU: none of this prompt).
    cached = 0 if client.get("/version").json()["engine"] == "vllm" else plain["usage"][
        "virtual_tokens"]
    assert plain["usage"]["cached_tokens"] == 0
    assert final["usage"] == plain["usage"] | {"cached_tokens": cached}
    assert [t for e in parsed for t in e["token_ids"]] == plain["token_ids"]
    assert "".join(e["text"] for e in parsed) == plain["text"]


def test_generated_tokens_counter_rises_by_completion_tokens(client, server):
    before = client.get("/metrics").text
    total = 0
    for n in (1, 4, 7):
        r = client.post("/v1/generate", json={"text": "metrics", "max_new_tokens": n})
        assert r.status_code == 200
        total += r.json()["usage"]["completion_tokens"]
    after = client.get("/metrics").text
    tenant = {"tenant": "default"}  # single-tenant mode
    assert (metric(after, "softprompt_generated_tokens_total", tenant)
            - metric(before, "softprompt_generated_tokens_total", tenant)) == total
    labels = {"endpoint": "/v1/generate", "method": "POST", "status": "200"} | tenant
    assert (metric(after, "softprompt_requests_total", labels)
            - metric(before, "softprompt_requests_total", labels)) == 3
    if "vllm" in server.args:
        # The batch histograms are the built-in engine's; vLLM counts its own steps' tokens.
        after = _wait_for_rise(client, before, "vllm:generation_tokens_total", total)
        assert summed_metric(after, "vllm:generation_tokens_total") - summed_metric(
            before, "vllm:generation_tokens_total") == total
    else:
        assert (metric(after, "softprompt_batch_size_count")
                > metric(before, "softprompt_batch_size_count"))
        steps = "softprompt_batch_row_steps_total"  # one request per batch here: no padding
        # A batch reports itself just after its rows are answered; the bound is for a hang.
        deadline = time.monotonic() + 60
        while (metric(after, steps, {"kind": "generated"}) - metric(
                before, steps, {"kind": "generated"})) < total and time.monotonic() < deadline:
            time.sleep(0.02)
            after = client.get("/metrics").text
        assert (metric(after, steps, {"kind": "generated"})
                - metric(before, steps, {"kind": "generated"})) == total
        assert (metric(after, steps, {"kind": "padding"})
                == metric(before, steps, {"kind": "padding"}))
    assert metric(after, "softprompt_queue_capacity") == 1024  # the default --max-queue
    assert "_created" not in after  # no per-series creation timestamps
    info = [line for line in after.splitlines() if line.startswith("softprompt_model_info{")]
    assert len(info) == 1 and 'architecture="LlamaForCausalLM"' in info[0]
    assert 'adapter_id="' not in after and "par-" not in after  # no adapter-id labels


def _wait_for_rise(client: httpx.Client, before: str, name: str, by: float) -> str:
    """The scrape once `name` rose by `by` (vLLM's stats reach its counters a moment after the
    answers); the bound is for a hang only."""
    deadline = time.monotonic() + 60
    while True:
        after = client.get("/metrics").text
        rose = summed_metric(after, name) - summed_metric(before, name)
        if rose >= by or time.monotonic() > deadline:
            return after
        time.sleep(0.05)
