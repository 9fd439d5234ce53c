"""The vllm engine behind the same API: outputs equal the definition, token for token, for
every adapter kind, templates and mixed concurrent batches; seeded sampling is batch
independent; the OpenAI features either work or are refused naming the engine; an aborted
request leaves vLLM; an adapter version's rows share vLLM's prefix cache, a new version never
hits the old blocks; tenants stay apart."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from tests.e2e.server_process import metric, summed_metric
from tests.factories import (
    greedy_by_recomputation,
    greedy_from_embeddings,
    load_base,
    make_adapter,
    make_encoder_checkpoint,
    peft_prompt,
    penalized_greedy,
    spliced_embeddings,
)
from tests.vllm.conftest import auth, upload, vllm_server

TEXTS = ["Tweet: I love it. Label:", "hello", "The quick brown fox", "a", "2 + 2 =",
         "Once upon a time"]
TEMPLATE = "{soft:2} Review: {text} {soft} Sentiment:"
PATIENCE_S = 120.0


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-serving")
    adapters = {kind: make_adapter(model_dir, root / kind, kind, num_virtual_tokens=4 + i,
                                   seed=10 + i)
                for i, kind in enumerate(("prompt_tuning", "p_tuning_mlp", "p_tuning_lstm"))}
    reference = root / "encoder-reference"
    adapters["encoder_raw"] = make_encoder_checkpoint(
        model_dir, root / "encoder-raw", "p_tuning_mlp", num_virtual_tokens=6, seed=21,
        reference_dir=reference)
    references = {**{k: v for k, v in adapters.items() if k != "encoder_raw"},
                  "encoder_raw": reference}
    with vllm_server(model_dir, root) as proc, \
            httpx.Client(base_url=proc.url, timeout=PATIENCE_S) as c:
        for kind, path in adapters.items():
            assert upload(c, "tenant-a", kind, path).status_code == 201
        assert upload(c, "tenant-a", "templated", adapters["p_tuning_mlp"],
                      template=TEMPLATE).status_code == 201
        yield proc, references


@pytest.fixture()
def client(served):
    with httpx.Client(base_url=served[0].url, timeout=PATIENCE_S) as c:
        yield c


@pytest.fixture(scope="module")
def base(model_dir):
    return load_base(model_dir)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def prompts(model_dir, served):
    """adapter id -> its rows as PEFT's get_prompt gives them (None: the bare model)."""
    return {None: None, **{k: peft_prompt(model_dir, d) for k, d in served[1].items()}}


def test_the_startup_log_names_the_engine(served):
    log = served[0].log_path.read_text(errors="replace")
    assert "engine: vllm (--engine vllm)" in log and "vllm engine started" in log
    assert "this process builds prompts on 1 torch thread" in log


def test_concurrent_mixed_adapters_equal_the_definition(served, base, tokenizer, prompts):
    rng = random.Random(0)
    jobs = [(a, TEXTS[i % len(TEXTS)], rng.randint(3, 12))
            for i, a in enumerate(list(prompts) * 3)]
    rng.shuffle(jobs)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served[0].url, timeout=PATIENCE_S) as ac:
            return await asyncio.gather(*(ac.post(
                "/v1/generate", headers=auth("tenant-a"),
                json={"adapter_id": a, "text": t, "max_new_tokens": n}) for a, t, n in jobs))

    for (adapter, text, n), r in zip(jobs, asyncio.run(run()), strict=True):
        assert r.status_code == 200, r.text
        got = r.json()
        ids = tokenizer(text)["input_ids"]
        assert got["token_ids"] == greedy_by_recomputation(base, prompts[adapter], ids, n), \
            (adapter, text)
        assert got["usage"]["prompt_tokens"] == len(ids)
        assert got["usage"]["virtual_tokens"] == (0 if adapter is None
                                                  else prompts[adapter].shape[0])


def test_a_template_places_the_rows_around_the_text(client, base, tokenizer, prompts):
    rows = prompts["p_tuning_mlp"]

    def anchor(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for text in ("I love it.", "ok"):
        ids = tokenizer(text)["input_ids"]
        embeds = spliced_embeddings(base, [rows[:2], anchor(" Review: "), ids, anchor(" "),
                                           rows[2:], anchor(" Sentiment:")])
        r = client.post("/v1/generate", headers=auth("tenant-a"),
                        json={"adapter_id": "templated", "text": text, "max_new_tokens": 8})
        assert r.status_code == 200, r.text
        assert r.json()["token_ids"] == greedy_from_embeddings(base, embeds, 8)


def test_stream_equals_non_stream(client):
    body = {"adapter_id": "prompt_tuning", "text": "hello", "max_new_tokens": 9,
            "ignore_eos": True}
    plain = client.post("/v1/generate", json=body, headers=auth("tenant-a")).json()
    ids: list[int] = []
    final: dict = {}
    with client.stream("POST", "/v1/generate", json=body | {"stream": True},
                       headers=auth("tenant-a")) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                ids += event.get("token_ids", [])
                final = event
    assert ids == plain["token_ids"] and len(ids) == 9
    assert final["finish_reason"] == "length"


def test_a_seed_draws_the_same_tokens_alone_and_in_a_crowd(served):
    body = {"adapter_id": "p_tuning_lstm", "text": "Once upon a time", "max_new_tokens": 12,
            "temperature": 0.9, "top_p": 0.95, "seed": 1234, "ignore_eos": True}

    async def run(crowd: int) -> list[dict]:
        async with httpx.AsyncClient(base_url=served[0].url, timeout=PATIENCE_S) as ac:
            others = [ac.post("/v1/generate", headers=auth("tenant-a"), json={
                "adapter_id": "prompt_tuning", "text": f"noise {i}", "max_new_tokens": 12,
                "temperature": 1.0, "ignore_eos": True}) for i in range(crowd)]
            answers = await asyncio.gather(ac.post("/v1/generate", json=body,
                                                   headers=auth("tenant-a")), *others)
        assert all(a.status_code == 200 for a in answers)
        return [a.json() for a in answers]

    alone = asyncio.run(run(0))[0]["token_ids"]
    crowded = asyncio.run(run(6))[0]["token_ids"]
    assert alone == crowded and len(alone) == 12


def test_penalties_follow_their_definition(client, base, tokenizer, prompts):
    ids = tokenizer("the the the cat")["input_ids"]
    r = client.post("/v1/generate", headers=auth("tenant-a"), json={
        "adapter_id": "prompt_tuning", "text": "the the the cat", "max_new_tokens": 10,
        "repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.3,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["token_ids"] == penalized_greedy(
        base, prompts["prompt_tuning"], ids, 10, presence=0.5, frequency=0.3, repetition=1.3)


def _logprobs_along(base, rows, text_ids: list[int], drawn: list[int]) -> torch.Tensor:
    """log-softmax (float32) of one forward over [rows; text; drawn], per position."""
    with torch.inference_mode():
        x = base.get_input_embeddings()(torch.tensor([*text_ids, *drawn]))
        if rows is not None:
            x = torch.cat([rows, x])
        return torch.log_softmax(base(inputs_embeds=x[None]).logits[0].float(), -1)


def test_completion_logprobs_and_echo_equal_the_model(client, base, tokenizer, prompts):
    rows = prompts["prompt_tuning"]
    text = "The quick brown fox"
    ids = tokenizer(text)["input_ids"]
    r = client.post("/v1/completions", headers=auth("tenant-a"), json={
        "model": "prompt_tuning", "prompt": text, "max_tokens": 6, "logprobs": 2,
        "echo": True, "temperature": 0})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    drawn = greedy_by_recomputation(base, rows, ids, 6)
    table = _logprobs_along(base, rows, ids, drawn)
    virtual = rows.shape[0]
    # echo: the text's tokens (the first has nothing before it in the text's own scoring)
    # then the drawn ones, each scored where it was predicted.
    sequence = [*ids, *drawn]
    got = lp["token_logprobs"]
    assert len(got) == len(sequence)
    for i, token in enumerate(sequence):
        if got[i] is None:
            assert i == 0
            continue
        want = float(table[virtual + i - 1, token])
        assert abs(got[i] - want) < 1e-4, (i, got[i], want)


def test_echo_with_a_repetition_penalty_on_an_adapter_is_refused_naming_the_engine(client):
    r = client.post("/v1/completions", headers=auth("tenant-a"), json={
        "model": "prompt_tuning", "prompt": "hi", "max_tokens": 2, "logprobs": 1,
        "echo": True, "repetition_penalty": 1.2})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "vllm engine" in message and "--engine builtin" in message


def test_n_choices_stop_strings_and_token_id_prompts(client, tokenizer):
    r = client.post("/v1/completions", headers=auth("tenant-a"), json={
        "model": "p_tuning_mlp", "prompt": [5, 6, 7, 8], "max_tokens": 5, "n": 3,
        "temperature": 0.8, "seed": 3})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 3
    plain = client.post("/v1/completions", headers=auth("tenant-a"), json={
        "model": "p_tuning_mlp", "prompt": "hello", "max_tokens": 12, "temperature": 0,
        "ignore_eos": True}).json()["choices"][0]["text"]
    stop = plain[3:5]
    if stop:
        cut = client.post("/v1/completions", headers=auth("tenant-a"), json={
            "model": "p_tuning_mlp", "prompt": "hello", "max_tokens": 12, "temperature": 0,
            "stop": [stop]}).json()["choices"][0]
        assert cut["finish_reason"] == "stop" and stop not in cut["text"]
        assert plain.startswith(cut["text"])


def test_an_aborted_stream_leaves_vllm(client, served):
    """The client leaves after the first event: vLLM stops the request there (it draws far
    fewer than its 480 tokens) and nothing of it keeps running. vLLM's gauges are published
    after its outputs, so what is read is its token counter once the request is gone, not a
    gauge while it runs."""
    tokens = 480
    body = {"adapter_id": "prompt_tuning", "text": "go on", "max_new_tokens": tokens,
            "ignore_eos": True, "stream": True}
    before = summed_metric(client.get("/metrics").text, "vllm:generation_tokens_total")
    with client.stream("POST", "/v1/generate", json=body, headers=auth("tenant-a")) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    deadline = time.monotonic() + PATIENCE_S
    while time.monotonic() < deadline:
        text = client.get("/metrics").text
        drawn = summed_metric(text, "vllm:generation_tokens_total") - before
        if (drawn >= 1 and summed_metric(text, "vllm:num_requests_running") == 0
                and metric(text, "softprompt_in_flight_requests") == 0):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the aborted request was still running in vllm")
    assert drawn < tokens, f"the request ran to its end ({drawn} tokens): it was not aborted"


def test_an_adapter_version_shares_the_prefix_cache_and_a_new_version_does_not(
        client, model_dir, tmp_path):
    """vLLM caches whole blocks (128 positions on a CPU), so the soft prompt fills one."""
    big = make_adapter(model_dir, tmp_path / "big", "prompt_tuning", num_virtual_tokens=160,
                       seed=5)
    other = make_adapter(model_dir, tmp_path / "big2", "prompt_tuning",
                         num_virtual_tokens=160, seed=6)
    assert upload(client, "tenant-a", "long-prompt", big).status_code == 201

    cached: list[int] = []

    def hits_after(text: str) -> float:
        """The hits counter once vLLM has counted this request's prefix lookup: its queries
        counter has grown by the soft prompt at least (both come in the same stats record)."""
        queried = summed_metric(client.get("/metrics").text, "vllm:prefix_cache_queries_total")
        r = client.post("/v1/generate", headers=auth("tenant-a"), json={
            "adapter_id": "long-prompt", "text": text, "max_new_tokens": 2})
        assert r.status_code == 200, r.text
        cached.append(r.json()["usage"]["cached_tokens"])
        deadline = time.monotonic() + PATIENCE_S
        while time.monotonic() < deadline:
            scrape = client.get("/metrics").text
            if summed_metric(scrape, "vllm:prefix_cache_queries_total") >= queried + 160:
                return summed_metric(scrape, "vllm:prefix_cache_hits_total")
            time.sleep(0.1)
        pytest.fail("vLLM never counted the request's prefix-cache lookup")

    first = hits_after("one")
    second = hits_after("two")
    assert second - first >= 128, (first, second)
    assert upload(client, "tenant-a", "long-prompt", other, overwrite=True).status_code == 201
    third = hits_after("three")
    assert third == second  # the new version's rows are new bytes: no old block matches
    assert hits_after("four") - third >= 128
    # Each response reports what vLLM's counter counted for it.
    assert cached == [0, second - first, 0, cached[3]] and cached[3] >= 128, cached


def test_tenants_stay_apart(client):
    r = client.post("/v1/generate", headers=auth("tenant-b"), json={
        "adapter_id": "prompt_tuning", "text": "hi", "max_new_tokens": 2})
    assert r.status_code == 404
    assert client.get("/v1/adapters", headers=auth("tenant-b")).json()["adapters"] == []


def test_softprompt_metrics_keep_their_names(client):
    text = client.get("/metrics").text
    for name in ("softprompt_requests_total", "softprompt_time_to_first_token_seconds",
                 "softprompt_prompt_cache_hits_total", "softprompt_queue_depth",
                 "vllm:prefix_cache_queries_total"):
        assert name in text, name
    # Every request of an adapter served so far had its prompt embeddings built and timed.
    assert summed_metric(text, "softprompt_prompt_build_seconds_count") >= 1


def test_a_second_tenant_goes_before_the_first_tenants_backlog(served):
    """8 places (--max-batch-size 8): tenant a fills them and queues two more; tenant b's
    request, queued after those, starts first when a place frees."""
    order: list[str] = []

    async def stream(ac: httpx.AsyncClient, tenant: str, name: str, tokens: int,
                     started: asyncio.Event | None = None) -> None:
        body = {"adapter_id": None, "text": name, "max_new_tokens": tokens, "ignore_eos": True,
                "stream": True}
        async with ac.stream("POST", "/v1/generate", json=body, headers=auth(tenant)) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and name not in order:
                    order.append(name)
                    if started is not None:
                        started.set()

    async def run() -> None:
        async with httpx.AsyncClient(base_url=served[0].url, timeout=PATIENCE_S) as ac:
            first = [asyncio.Event() for _ in range(8)]
            running = [asyncio.create_task(stream(ac, "tenant-a", f"a{i}", 200, first[i]))
                       for i in range(8)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first)), PATIENCE_S)
            backlog = [asyncio.create_task(stream(ac, "tenant-a", f"a{i}", 4))
                       for i in (8, 9)]
            await _until_queued(ac, "tenant-a", 2)  # a8 and a9 wait before b arrives
            late = asyncio.create_task(stream(ac, "tenant-b", "b0", 4))
            await asyncio.wait_for(asyncio.gather(*running, *backlog, late), PATIENCE_S)

    asyncio.run(run())
    assert order.index("b0") < order.index("a8") and order.index("b0") < order.index("a9"), \
        order


async def _until_queued(ac: httpx.AsyncClient, tenant: str, count: int) -> None:
    labels = {"tenant": tenant, "state": "queued"}
    for _ in range(int(PATIENCE_S / 0.05)):
        text = (await ac.get("/metrics")).text
        if metric(text, "softprompt_tenant_requests", labels) >= count:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"{tenant} never had {count} requests queued")
