"""What OpenAI-client and vLLM users expect, through the official openai client (and plain
HTTP) against the real server: logprobs (completions, chat, echo, streams), n, penalties,
token-id and batched prompts, the context-sized default of chat's max_tokens, served-model
aliases, /tokenize and /detokenize, and the edges a new user hits first (typos, bad JSON,
/docs offline, a stream's first event). On the built-in engine, and on vLLM where installed.

Every value is checked against the definition recomputed here in float32: the adapter's rows
(PEFT's get_prompt) before the text's embeddings, the logits of the whole sequence so far.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer

from tests.e2e.conftest import BUILTIN_AND_VLLM, upload
from tests.e2e.server_process import ServerProcess
from tests.e2e.vllm_extensions import byte_of_token
from tests.factories import load_base, peft_prompt, penalized_greedy

PROMPT = "Tweet: I love it. Label:"
CONTEXT = 96  # --max-model-len: chat's default max_tokens is what this leaves
ALIASES = ["tiny-base", "tiny-alias"]
ALIAS_FLAGS = ("--served-model-name", ALIASES[0], "--served-model-name", ALIASES[1])


@pytest.fixture(scope="module", **BUILTIN_AND_VLLM)
def server(request, chat_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("oai-features")
    with ServerProcess(chat_model_dir, root / "store", root / "server.log", *request.param,
                       "--max-model-len", str(CONTEXT), *ALIAS_FLAGS) as proc:
        yield proc


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def adapter(http, adapter_dirs) -> str:
    assert upload(http, "feat-pt", adapter_dirs["prompt_tuning"][0]).status_code == 201
    return "feat-pt"


class Reference:
    """The definition, recomputed: log-softmax of the raw logits in float32."""

    def __init__(self, model_dir: Path, adapter_dir: Path) -> None:
        self.base = load_base(model_dir)
        self.rows = peft_prompt(model_dir, adapter_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def logps(self, ids: list[int], *, adapter: bool = True) -> torch.Tensor:
        """[len(ids), vocab]: row q is the distribution of the token after ids[:q + 1]."""
        with torch.inference_mode():
            x = self.base.get_input_embeddings()(torch.tensor(ids))
            if adapter:
                x = torch.cat([self.rows, x])
            logits = self.base(inputs_embeds=x[None]).logits[0].float()
        return torch.log_softmax(logits, -1)[-len(ids):]

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=True)


@pytest.fixture(scope="module")
def ref(model_dir, adapter_dirs) -> Reference:
    return Reference(model_dir, adapter_dirs["prompt_tuning"][0])


def _close(a: float | None, b: float) -> bool:
    return a is not None and math.isclose(a, b, abs_tol=1e-3)


def _generated_logps(ref: Reference, prompt_ids: list[int], drawn: list[int]) -> torch.Tensor:
    """The distribution before each drawn token."""
    return ref.logps([*prompt_ids, *drawn])[len(prompt_ids) - 1:-1]


def test_completion_logprobs_are_the_models(oai, adapter, ref):
    got = oai.completions.create(model=adapter, prompt=PROMPT, max_tokens=6, temperature=0,
                                 logprobs=3, extra_body={"ignore_eos": True})
    lp = got.choices[0].logprobs
    ids = ref.tokenizer(PROMPT)["input_ids"]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    # Greedy: each token is the reference's argmax given the tokens before it.
    drawn = []
    for step in range(6):
        row = ref.logps([*ids, *drawn])[-1]
        best = row.topk(3)
        token = int(best.indices[0])
        assert lp.tokens[step] == ref.text(token)
        assert _close(lp.token_logprobs[step], float(row[token]))
        # Keyed by token text: two ids with the same text share one entry (OpenAI's shape).
        top = lp.top_logprobs[step]
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(float(best.values[0]),
                                                                         abs=1e-3)
        assert all(any(_close(v, float(b)) for b in best.values) for v in top.values())
        drawn.append(token)
    assert "".join(lp.tokens) == got.choices[0].text
    assert lp.text_offset[0] == len(PROMPT)
    assert lp.text_offset[1] == len(PROMPT) + len(lp.tokens[0])


def test_echo_scores_the_prompt(oai, adapter, base_name, ref):
    ids = ref.tokenizer(PROMPT)["input_ids"]
    scored = oai.completions.create(model=adapter, prompt=PROMPT, max_tokens=0, echo=True,
                                    logprobs=1, temperature=0)
    choice = scored.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(ids) and lp.text_offset[0] == 0
    logps = ref.logps(ids)
    # With an adapter the first text token follows the virtual tokens: it has a logprob.
    with torch.inference_mode():
        first = torch.log_softmax(ref.base(inputs_embeds=ref.rows[None]).logits[0, -1], -1)
    assert _close(lp.token_logprobs[0], float(first[ids[0]]))
    for k in range(1, len(ids)):
        assert _close(lp.token_logprobs[k], float(logps[k - 1, ids[k]]))
        assert lp.tokens[k] == ref.text(ids[k])
    # The bare model: nothing precedes the first token; one token is generated after it.
    bare = oai.completions.create(model=base_name, prompt=PROMPT, max_tokens=1, echo=True,
                                  logprobs=0, temperature=0).choices[0]
    assert bare.logprobs.token_logprobs[0] is None and bare.logprobs.top_logprobs[0] is None
    assert len(bare.logprobs.tokens) == len(ids) + 1
    bare_logps = ref.logps(ids, adapter=False)
    assert _close(bare.logprobs.token_logprobs[1], float(bare_logps[0, ids[1]]))
    generated = int(bare_logps[-1].argmax())
    assert bare.text == PROMPT + ref.text(generated)
    assert _close(bare.logprobs.token_logprobs[-1], float(bare_logps[-1, generated]))


def test_stream_logprobs_equal_the_whole_responses(oai, adapter):
    kwargs = {"model": adapter, "prompt": PROMPT, "max_tokens": 7, "temperature": 0,
              "logprobs": 2, "echo": True}
    whole = oai.completions.create(**kwargs).choices[0]
    chunks = [c for c in oai.completions.create(**kwargs, stream=True) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    streamed = [v for c in chunks if c.choices[0].logprobs
                for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(whole.logprobs.token_logprobs, abs=1e-6)
    offsets = [v for c in chunks if c.choices[0].logprobs
               for v in c.choices[0].logprobs.text_offset]
    assert offsets == whole.logprobs.text_offset


def test_chat_logprobs_and_their_stream(oai, adapter, ref, chat_model_dir):
    messages = [{"role": "user", "content": "Hi"}]
    got = oai.chat.completions.create(model=adapter, messages=messages, max_tokens=5,
                                      temperature=0, logprobs=True, top_logprobs=2)
    content = got.choices[0].logprobs.content
    chat_ids = AutoTokenizer.from_pretrained(chat_model_dir).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    drawn: list[int] = []
    byte_of = byte_of_token(ref.tokenizer)
    for entry in content:
        row = ref.logps([*chat_ids, *drawn])[-1]
        token = int(row.argmax())
        # A byte token's own byte, also where its text alone is U+FFFD.
        own = [byte_of[token]] if token in byte_of else list(ref.text(token).encode())
        assert entry.token == ref.text(token) and entry.bytes == own
        assert _close(entry.logprob, float(row[token]))
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            row.topk(2).values.tolist(), abs=1e-3)
        drawn.append(token)
    assert bytes(b for e in content for b in e.bytes).decode(errors="replace") == (
        got.choices[0].message.content)
    stream = list(oai.chat.completions.create(model=adapter, messages=messages, max_tokens=5,
                                              temperature=0, logprobs=True, top_logprobs=2,
                                              stream=True))
    streamed = [e.logprob for c in stream if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in content], abs=1e-6)
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=adapter, messages=messages, top_logprobs=2)
    assert info.value.param == "top_logprobs"


def test_n_choices_are_reproducible_with_a_seed_and_counted(oai, adapter):
    kwargs = {"model": adapter, "prompt": PROMPT, "max_tokens": 5, "temperature": 1.0,
              "n": 3, "seed": 11, "extra_body": {"ignore_eos": True}}
    first = oai.completions.create(**kwargs)
    again = oai.completions.create(**kwargs)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # distinct seeds per choice
    single = oai.completions.create(**kwargs | {"n": 1})
    assert single.choices[0].text == texts[0]  # choice 0 runs with the request's seed
    assert first.usage.completion_tokens == 15
    assert first.usage.prompt_tokens == single.usage.prompt_tokens
    chunks = [c for c in oai.completions.create(**kwargs, stream=True) if c.choices]
    by_index = {i: "".join(c.choices[0].text for c in chunks if c.choices[0].index == i)
                for i in range(3)}
    assert [by_index[i] for i in range(3)] == texts
    chat = oai.chat.completions.create(model=adapter, n=2, seed=3, temperature=1.0,
                                       max_tokens=4, messages=[{"role": "user", "content": "x"}])
    assert [c.index for c in chat.choices] == [0, 1]


def test_token_id_and_batched_prompts(oai, http, adapter, ref):
    ids = ref.tokenizer(PROMPT)["input_ids"]
    other = "a"
    by_text = oai.completions.create(model=adapter, prompt=PROMPT, max_tokens=6, temperature=0)
    by_ids = oai.completions.create(model=adapter, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    alone = oai.completions.create(model=adapter, prompt=other, max_tokens=6, temperature=0)
    both = oai.completions.create(model=adapter, prompt=[PROMPT, other], max_tokens=6,
                                  temperature=0, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [by_text.choices[0].text] * 2 + \
        [alone.choices[0].text] * 2
    assert both.usage.prompt_tokens == by_text.usage.prompt_tokens + alone.usage.prompt_tokens
    lists = oai.completions.create(model=adapter, prompt=[ids, ids[:3]], max_tokens=3,
                                   temperature=0)
    assert len(lists.choices) == 2 and lists.choices[0].text == by_text.choices[0].text[
        :len(lists.choices[0].text)]
    r = http.post("/v1/completions", json={"model": adapter, "prompt": [1, 10**6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_penalties_change_greedy_as_defined(oai, http, adapter, ref):
    ids = ref.tokenizer(PROMPT)["input_ids"]
    expected = penalized_greedy(ref.base, ref.rows, ids, 10, presence=-2.0, frequency=-1.0,
                                repetition=1.8)
    got = oai.completions.create(model=adapter, prompt=PROMPT, max_tokens=10, temperature=0,
                                 presence_penalty=-2.0, frequency_penalty=-1.0, logprobs=0,
                                 extra_body={"repetition_penalty": 1.8, "ignore_eos": True})
    assert got.choices[0].logprobs.tokens == [ref.text(t) for t in expected]
    native = http.post("/v1/generate", json={
        "adapter_id": adapter, "text": PROMPT, "max_new_tokens": 10, "ignore_eos": True,
        "presence_penalty": -2.0, "frequency_penalty": -1.0, "repetition_penalty": 1.8}).json()
    assert native["token_ids"] == expected
    plain = http.post("/v1/generate", json={"adapter_id": adapter, "text": PROMPT,
                                            "max_new_tokens": 10, "ignore_eos": True}).json()
    assert plain["token_ids"] != expected


def test_generate_logprobs_in_body_and_stream(http, adapter, ref):
    body = {"adapter_id": adapter, "text": PROMPT, "max_new_tokens": 5, "logprobs": 2}
    whole = http.post("/v1/generate", json=body).json()
    ids = ref.tokenizer(PROMPT)["input_ids"]
    logps = _generated_logps(ref, ids, whole["token_ids"])
    assert len(whole["logprobs"]) == len(whole["token_ids"])
    for entry, token, row in zip(whole["logprobs"], whole["token_ids"], logps, strict=True):
        assert entry["token_id"] == token and _close(entry["logprob"], float(row[token]))
        assert [t["token_id"] for t in entry["top"]] == row.topk(2).indices.tolist()
    assert "logprobs" not in http.post("/v1/generate", json=body | {"logprobs": None}).json()
    with http.stream("POST", "/v1/generate", json=body | {"stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    streamed = [e for event in events for e in event.get("logprobs") or []]
    assert streamed == whole["logprobs"]


def test_chat_max_tokens_defaults_to_what_the_context_leaves(oai, adapter, chat_model_dir):
    messages = [{"role": "user", "content": "Hi"}]
    chat_ids = AutoTokenizer.from_pretrained(chat_model_dir).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    virtual = 4  # the prompt_tuning adapter's
    got = oai.chat.completions.create(model=adapter, messages=messages, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert got.usage.completion_tokens == CONTEXT - len(chat_ids) - virtual
    assert got.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=adapter, messages=messages, max_tokens=CONTEXT)
    assert info.value.param == "max_tokens"
    assert "max_tokens" in str(info.value) and "max_new_tokens" not in str(info.value)


@pytest.fixture(scope="module")
def base_name(oai) -> str:
    return oai.models.list().data[0].id


def test_served_model_names_replace_the_model_path(oai, http, adapter, chat_model_dir):
    listed = [m.id for m in oai.models.list().data]
    assert listed[:2] == ALIASES and adapter in listed and str(chat_model_dir) not in listed
    one = oai.completions.create(model=ALIASES[0], prompt=PROMPT, max_tokens=4, temperature=0)
    two = oai.completions.create(model=ALIASES[1], prompt=PROMPT, max_tokens=4, temperature=0)
    assert one.choices[0].text == two.choices[0].text and two.model == ALIASES[1]
    assert oai.models.retrieve(ALIASES[1]).id == ALIASES[1]
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model=str(chat_model_dir), prompt=PROMPT, max_tokens=1)


def test_tokenize_counts_virtual_tokens_and_detokenize_inverts(http, adapter, ref,
                                                               adapter_dirs, chat_model_dir):
    ids = ref.tokenizer(PROMPT)["input_ids"]
    base = http.post("/tokenize", json={"prompt": PROMPT}).json()
    assert base == {"count": len(ids), "max_model_len": CONTEXT, "tokens": ids,
                    "token_strs": None, "virtual_tokens": 0}
    with_adapter = http.post("/tokenize", json={"model": adapter, "prompt": PROMPT,
                                                "return_token_strs": True}).json()
    assert with_adapter["tokens"] == ids and with_adapter["virtual_tokens"] == 4
    assert with_adapter["count"] == len(ids) + 4
    assert with_adapter["token_strs"] == [ref.text(i) for i in ids]
    bare = http.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()
    assert bare["tokens"] == ref.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    # A templated adapter: its anchors count in `count`, as usage.prompt_tokens counts them;
    # `virtual_tokens` is the adapter's rows alone, as /v1/generate's usage says.
    template = "{soft:2} Review: {text}{soft}"
    files = {name: (name, (adapter_dirs["prompt_tuning"][0] / name).read_bytes())
             for name in ("adapter_config.json", "adapter_model.safetensors")}
    r = http.post("/v1/adapters", data={"adapter_id": "feat-tpl", "template": template},
                  files={"config": files["adapter_config.json"],
                         "weights": files["adapter_model.safetensors"]})
    assert r.status_code == 201, r.text
    anchors = len(ref.tokenizer(" Review: ", add_special_tokens=False)["input_ids"])
    templated = http.post("/tokenize", json={"model": "feat-tpl", "prompt": PROMPT}).json()
    assert templated["virtual_tokens"] == 4
    assert templated["count"] == len(ids) + 4 + anchors
    # Chat messages: the ids chat completions would send, with or without the assistant turn.
    messages = [{"role": "user", "content": "Hi"}]
    chat_tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    for generation in (True, False):
        got = http.post("/tokenize", json={"messages": messages,
                                           "add_generation_prompt": generation}).json()
        assert got["tokens"] == chat_tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation, tokenize=True, return_dict=False)
    back = http.post("/detokenize", json={"model": adapter, "tokens": ids}).json()
    assert back == {"prompt": ref.tokenizer.decode(ids, skip_special_tokens=True)}


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/tokenize", {"model": "no-such-adapter", "prompt": "x"}, 404, "model"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 400,
     "prompt"),
    ("/tokenize", {"text": "x"}, 400, "text"),
    ("/detokenize", {"tokens": [1, -5]}, 400, "tokens"),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
])
def test_tokenizer_routes_refuse_bad_input_in_openai_shape(http, path, body, status, param):
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_an_unknown_generate_field_is_422_naming_it(http):
    r = http.post("/v1/generate", json={"text": "x", "max_tokens": 5})
    assert r.status_code == 422
    message = r.json()["error"]["message"]
    assert "'max_tokens'" in message and "did you mean 'max_new_tokens'?" in message
    r = http.post("/v1/generate", json={"text": "x", "temprature": 0.5, "max_new_tokens": 1})
    assert r.status_code == 422 and "did you mean 'temperature'?" in r.json()["error"]["message"]


def test_invalid_json_says_where(http, base_name):
    bad = b'{"text": "x",\n "max_new_tokens": }'
    headers = {"Content-Type": "application/json"}
    r = http.post("/v1/generate", content=bad, headers=headers)
    assert r.status_code == 422
    assert r.json()["error"]["message"].startswith("invalid JSON body at line 2 column 20")
    r = http.post("/v1/completions", content=b'{"model": "' + base_name.encode() + b'",,}',
                  headers=headers)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"].startswith("invalid JSON body at line 1 column ")
    assert error["type"] == "invalid_request_error"


def test_interactive_docs_are_off_and_the_schema_is_served(http):
    assert http.get("/docs").status_code == 404 and http.get("/redoc").status_code == 404
    assert "/tokenize" in http.get("/openapi.json").json()["paths"]


def test_a_streams_first_event_is_its_first_token(http, adapter):
    """Text held back (here: it could be the start of a stop string) does not hold the token:
    the first event carries exactly the first token."""
    body = {"adapter_id": adapter, "text": PROMPT, "max_new_tokens": 6, "ignore_eos": True}
    first = http.post("/v1/generate", json=body).json()
    first_text = http.post("/detokenize", json={"tokens": first["token_ids"][:1]}).json()
    assert first_text["prompt"], "the first token has text"
    stop = first_text["prompt"] + "\u2603\u2603"  # never completed: its start is held
    with http.stream("POST", "/v1/generate", json=body | {"stream": True, "stop": [stop]}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    assert events[0]["token_ids"] == first["token_ids"][:1] and events[0]["text"] == ""
    assert [t for e in events for t in e["token_ids"]] == first["token_ids"]
    assert "".join(e["text"] for e in events) == first["text"]


def test_what_does_not_fit_the_context_is_named_as_openai_names_it(oai, adapter):
    """A prompt that leaves no room is the prompt's fault; one that fits but leaves too little
    for max_tokens is max_tokens'."""
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=adapter, prompt=[5] * CONTEXT, max_tokens=1)
    assert info.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=adapter, prompt=[5] * 10, max_tokens=CONTEXT - 10)
    assert info.value.param == "max_tokens" and "max_new_tokens" not in str(info.value)
