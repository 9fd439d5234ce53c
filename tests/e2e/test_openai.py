"""The official openai client against the real server: completions, chat, streaming, models.

The tiny Llama-shaped model is given a chat template here (the plain one has none); two
tenants with API keys check that `model=` only reaches the caller's own adapters. On the
built-in engine, and on vLLM where installed.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.e2e.conftest import BUILTIN_AND_VLLM, upload
from tests.e2e.server_process import ServerProcess, metric

KEYS = {"acme": "acme-key-0123456789", "beta": "beta-key-0123456789"}
PROMPT = "Tweet: I love it. Label:"


@pytest.fixture(scope="module", **BUILTIN_AND_VLLM)
def oai_server(request, chat_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("oai-server")
    keys = root / "keys.json"
    keys.write_text(json.dumps({"tenants": [{"name": n, "keys": [k]}
                                            for n, k in KEYS.items()]}))
    with ServerProcess(chat_model_dir, root / "store", root / "server.log",
                       "--api-keys", str(keys), "--max-wait-ms", "5", *request.param) as proc:
        yield proc


@pytest.fixture(scope="module")
def http(oai_server):
    with httpx.Client(base_url=oai_server.url, timeout=60,
                      headers={"Authorization": f"Bearer {KEYS['acme']}"}) as c:
        yield c


@pytest.fixture(scope="module")
def oai(oai_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{oai_server.url}/v1", api_key=KEYS["acme"], max_retries=0)


@pytest.fixture(scope="module")
def base_name(oai) -> str:
    return oai.models.list().data[0].id


@pytest.fixture(scope="module")
def adapter(http, adapter_dirs) -> str:
    r = upload(http, "oai-pt", adapter_dirs["prompt_tuning"][0])
    assert r.status_code == 201, r.text
    return "oai-pt"


def test_completion_equals_native_generate(oai, http, adapter):
    native = http.post("/v1/generate", json={"adapter_id": adapter, "text": PROMPT,
                                             "max_new_tokens": 12}).json()
    got = oai.completions.create(model=adapter, prompt=PROMPT, max_tokens=12, temperature=0)
    assert got.object == "text_completion" and got.id.startswith("cmpl-")
    assert got.model == adapter
    assert got.choices[0].text == native["text"]
    assert got.choices[0].finish_reason == {"eos": "stop"}.get(native["finish_reason"],
                                                              native["finish_reason"])
    assert got.usage.prompt_tokens == native["usage"]["prompt_tokens"]
    assert got.usage.completion_tokens == native["usage"]["completion_tokens"]
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_base_model_by_name_and_stop_string(oai, http, base_name):
    native = http.post("/v1/generate", json={"text": "hello", "max_new_tokens": 10}).json()
    got = oai.completions.create(model=base_name, prompt=["hello"], max_tokens=10,
                                 temperature=0)
    assert got.choices[0].text == native["text"]
    stop = native["text"][2:4]
    if stop:  # the tiny model's text is random bytes; stop on a piece of it
        cut = oai.completions.create(model=base_name, prompt="hello", max_tokens=10,
                                     temperature=0, stop=stop)
        assert cut.choices[0].text == native["text"][:native["text"].index(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_completion_stream_equals_non_stream(oai, adapter):
    plain = oai.completions.create(model=adapter, prompt="hello", max_tokens=9, temperature=0)
    chunks = list(oai.completions.create(model=adapter, prompt="hello", max_tokens=9,
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == plain.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_chat_and_its_stream(oai, http, adapter, chat_model_dir):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                             {"type": "text", "text": "there"}]}]
    got = oai.chat.completions.create(model=adapter, messages=messages, max_tokens=8,
                                      temperature=0)
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
    assert got.choices[0].message.role == "assistant"
    # The rendered template, tokenized without a second BOS, is what the engine ran on.
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    flat = [messages[0], {"role": "user", "content": "Hi there"}]
    ids = tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    assert got.usage.prompt_tokens == len(ids)
    chunks = list(oai.chat.completions.create(model=adapter, messages=messages, max_tokens=8,
                                              temperature=0, stream=True))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) \
        == got.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == got.choices[0].finish_reason


def test_unknown_model_is_not_found(oai):
    with pytest.raises(openai.NotFoundError) as info:
        oai.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="not/a model", messages=[{"role": "user",
                                                                    "content": "x"}])


def test_another_tenants_adapter_is_not_found(oai_server, adapter):
    beta = openai.OpenAI(base_url=f"{oai_server.url}/v1", api_key=KEYS["beta"], max_retries=0)
    with pytest.raises(openai.NotFoundError):
        beta.completions.create(model=adapter, prompt="x", max_tokens=2)
    assert adapter not in [m.id for m in beta.models.list().data]


def test_one_adapter_id_in_two_tenants_serves_each_its_own(oai_server, adapter_dirs):
    """Tenants name adapters in their own namespaces, down to the engine's prompt rows: beta's
    "twin" must not run acme's rows (or the reverse), and the same files under two tenants give
    the same answer."""
    def client(tenant: str) -> httpx.Client:
        return httpx.Client(base_url=oai_server.url, timeout=60,
                            headers={"Authorization": f"Bearer {KEYS[tenant]}"})

    def complete(c: httpx.Client, model: str) -> str:
        r = c.post("/v1/completions", json={"model": model, "prompt": PROMPT,
                                            "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with client("acme") as acme, client("beta") as beta:
        assert upload(acme, "twin", adapter_dirs["prompt_tuning"][0]).status_code == 201
        assert upload(beta, "twin", adapter_dirs["p_tuning_lstm"][0]).status_code == 201
        assert upload(beta, "acme-copy", adapter_dirs["prompt_tuning"][0]).status_code == 201
        acme_twin, beta_twin = complete(acme, "twin"), complete(beta, "twin")
        assert complete(beta, "acme-copy") == acme_twin
        assert beta_twin != acme_twin
        assert complete(beta, "twin") == beta_twin and complete(acme, "twin") == acme_twin


def test_bad_key_is_authentication_error(oai_server):
    bad = openai.OpenAI(base_url=f"{oai_server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize("kwargs", [{"best_of": 2}, {"suffix": "x"},
                                    {"logit_bias": {"5": 1.0}}, {"max_tokens": 0},
                                    {"n": 129}, {"logprobs": 21}])
def test_unsupported_parameters_are_bad_requests(oai, adapter, kwargs):
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(**{"model": adapter, "prompt": "x", "max_tokens": 2} | kwargs)
    assert info.value.param == next(iter(kwargs))


def test_chat_unsupported_parameters_are_bad_requests(oai, adapter):
    for kwargs in ({"top_logprobs": 2}, {"response_format": {"type": "json_object"}},
                   {"tools": [{"type": "function", "function": {"name": "f"}}]}):
        with pytest.raises(openai.BadRequestError):
            oai.chat.completions.create(model=adapter, max_tokens=2, **kwargs,
                                        messages=[{"role": "user", "content": "x"}])


def test_models_lists_base_and_own_adapters(oai, adapter, base_name):
    models = oai.models.list().data
    assert models[0].id == base_name and models[0].owned_by == "softprompt-server"
    assert adapter in [m.id for m in models]
    assert all(m.object == "model" for m in models)


def test_retrieve_model(oai, adapter, base_name):
    assert oai.models.retrieve(base_name).id == base_name
    assert oai.models.retrieve(adapter).owned_by == "acme"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-adapter")


def test_streams_left_midway_are_aborted_and_counted(oai_server, base_name):
    """Same disconnect handling as /v1/generate: the engine forgets the rows, the tenant's
    concurrency slots come back, and the route is counted under its own endpoint label."""
    body = {"model": base_name, "prompt": "leave", "max_tokens": 400, "ignore_eos": True,
            "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEYS['acme']}"}

    async def open_and_leave(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break

    async def run() -> None:
        async with httpx.AsyncClient(base_url=oai_server.url, timeout=60) as client:
            await asyncio.gather(*(open_and_leave(client) for _ in range(6)))

    asyncio.run(run())
    deadline = time.monotonic() + 120  # the aborts take a moment; the bound is for a hang only
    while True:
        text = httpx.get(oai_server.url + "/metrics", timeout=60).text
        if metric(text, "softprompt_in_flight_requests") == 0 \
                and metric(text, "softprompt_queue_depth") == 0:
            break
        assert time.monotonic() < deadline, "aborted streams still in the engine"
        time.sleep(0.2)
    assert any(line.startswith("softprompt_requests_total{") and 'endpoint="/v1/completions"'
               in line for line in text.splitlines())
