"""vLLM's request extensions, checked through HTTP the same way on either engine.

tests/e2e/test_openai_vllm_extensions.py runs these against every engine (the built-in one in
process and in its own process, and vLLM where installed). The served model is a copy of a
tiny model whose generation config names a second end-of-sequence id, T: a printable byte
that the adapter's greedy continuation of PROMPT reaches at step K, and that the tokenizer
treats as a special token (as real models' eos is). So plain greedy output ends at step K,
ignore_eos must go through it, min_tokens must mask it, and skip_special_tokens decides
whether its text shows. Every expected value is recomputed here: greedy by full
recomputation in float32 over the adapter's rows (PEFT's get_prompt) and the text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import torch
from tokenizers import AddedToken
from transformers import AutoTokenizer

from server.engine.byte_tokenizer import EOS_ID
from tests.factories import load_base, peft_prompt

PROMPT = "Tweet: I love it. Label:"
LENGTH = 16


def byte_of_token(tokenizer: object) -> dict[int, int]:
    """Each byte token's byte, found by encoding characters whose UTF-8 bytes are known
    (one-, two-, three- and four-byte characters cover every byte UTF-8 uses)."""
    table: dict[int, int] = {}
    chars = [*map(chr, range(1, 0x800)), *map(chr, range(0x800, 0x10000, 64)),
             *map(chr, range(0x10000, 0x110000, 4096))]
    for char in chars:
        if 0xD800 <= ord(char) < 0xE000:
            continue
        ids = tokenizer(char, add_special_tokens=False)["input_ids"]
        data = char.encode()
        if len(ids) == len(data):
            table.update(zip(ids, data, strict=True))
    return table


class Definition:
    """The served model's greedy decoding, recomputed, with vLLM's masking rules."""

    def __init__(self, model_dir: Path, adapter_dir: Path) -> None:
        self.base = load_base(model_dir)
        self.rows = peft_prompt(model_dir, adapter_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.byte_of = byte_of_token(self.tokenizer)
        eos = json.loads((model_dir / "generation_config.json").read_text()).get(
            "eos_token_id", EOS_ID)
        self.eos = frozenset([eos] if isinstance(eos, int) else eos)

    def ids(self, text: str = PROMPT, *, specials: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=specials)["input_ids"])

    def greedy(self, text_ids: list[int], n: int = LENGTH, *, ends: frozenset[int] | None = None,
               min_tokens: int = 0, ignore_eos: bool = False) -> list[int]:
        """Greedy tokens: `ends` (default the eos ids) masked before min_tokens tokens exist
        and ending the output after; with ignore_eos, eos ids do not end it."""
        ends = self.eos if ends is None else ends
        masked = self.eos | ends
        stopping = ends - self.eos if ignore_eos else ends
        drawn: list[int] = []
        with torch.inference_mode():
            for step in range(n):
                x = self.base.get_input_embeddings()(torch.tensor([*text_ids, *drawn]))
                logits = self.base(inputs_embeds=torch.cat([self.rows, x])[None]).logits[0, -1]
                logits = logits.float().clone()
                if step < min_tokens:
                    logits[sorted(masked)] = float("-inf")
                drawn.append(int(logits.argmax()))
                if drawn[-1] in stopping and step + 1 > min_tokens:
                    break
        return drawn

    def text(self, ids: list[int], *, skip: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip,
                                     clean_up_tokenization_spaces=False)


def with_second_eos(model_dir: Path, adapter_dir: Path, out: Path) -> tuple[Path, int, int]:
    """A copy of model_dir whose generation config ends on a second id T too (T special in the
    tokenizer): the first printable letter the adapter's greedy continuation of PROMPT meets
    for the first time at a step K >= 2. Returns (the copy, T, K)."""
    original = Definition(model_dir, adapter_dir)
    plain = original.greedy(original.ids(), LENGTH, ends=frozenset())
    letters = {t for t, b in original.byte_of.items() if chr(b).isascii() and chr(b).isalpha()}
    k = next(i for i in range(2, LENGTH) if plain[i] not in plain[:i] and plain[i] in letters)
    token, letter = plain[k], chr(original.byte_of[plain[k]])
    shutil.copytree(model_dir, out)
    config = json.loads((out / "generation_config.json").read_text())
    config["eos_token_id"] = [EOS_ID, token]
    (out / "generation_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(out)
    # Marked special where it is (the byte's own id), as a real model's eos token is.
    tokenizer.backend_tokenizer.add_special_tokens([AddedToken(letter, special=True)])
    tokenizer.save_pretrained(out)
    assert tokenizer.convert_tokens_to_ids(letter) == token
    return out, token, k


def complete(http: httpx.Client, model: str, **body: object) -> dict:
    """A completion of PROMPT, greedy, its tokens named by id."""
    request = {"model": model, "prompt": PROMPT, "max_tokens": LENGTH, "temperature": 0,
               "logprobs": 0, "return_tokens_as_token_ids": True, **body}
    response = http.post("/v1/completions", json=request)
    assert response.status_code == 200, response.text
    return response.json()


def token_ids(choice: dict) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]


def events(http: httpx.Client, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        lines = [line.removeprefix("data: ") for line in response.iter_lines()
                 if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


# -- the checks ------------------------------------------------------------------------------


def check_ignore_eos_is_the_plain_greedy_continuation(http: httpx.Client, model: str,
                                                      ref: Definition, eos: int, k: int) -> None:
    plain = ref.greedy(ref.ids(), ends=frozenset())
    assert plain[k] == eos
    ended = complete(http, model)["choices"][0]
    assert (token_ids(ended), ended["finish_reason"]) == (plain[:k + 1], "stop")
    assert ended["text"] == ref.text(plain[:k])
    through = complete(http, model, ignore_eos=True)["choices"][0]
    assert (token_ids(through), through["finish_reason"]) == (plain, "length")  # eos drawn
    assert through["text"] == ref.text(plain)
    assert through["text"][k:k + 1] != chr(ref.byte_of[eos])  # special: skipped


def check_min_tokens_masks_the_end_ids_until_then(http: httpx.Client, model: str,
                                                  ref: Definition, eos: int, k: int) -> None:
    want = ref.greedy(ref.ids(), min_tokens=k + 2)
    assert eos not in want[:k + 2] and want[:k] == ref.greedy(ref.ids())[:k]
    got = complete(http, model, min_tokens=k + 2)["choices"][0]
    assert token_ids(got) == want
    assert len(want) >= k + 2
    # A stop token id masked the same way; once min_tokens exist it ends the output.
    stop = ref.greedy(ref.ids(), ends=frozenset())[1]
    want = ref.greedy(ref.ids(), ends=frozenset({stop}), min_tokens=2, ignore_eos=True)
    got = complete(http, model, min_tokens=2, stop_token_ids=[stop], ignore_eos=True)
    assert token_ids(got["choices"][0]) == want and stop not in want[:2]


def check_stop_token_ids_and_include_stop_str(http: httpx.Client, model: str,
                                              ref: Definition) -> None:
    plain = ref.greedy(ref.ids(), ends=frozenset())
    got = complete(http, model, stop_token_ids=[plain[1]])["choices"][0]
    assert (token_ids(got), got["finish_reason"], got["text"]) == (
        plain[:2], "stop", ref.text(plain[:1]))
    kept = complete(http, model, stop_token_ids=[plain[1]],
                    include_stop_str_in_output=True)["choices"][0]
    assert kept["text"] == ref.text(plain[:2])
    stop = ref.text(plain[1:2])
    cut = complete(http, model, stop=[stop], ignore_eos=True)["choices"][0]
    assert cut["text"] == ref.text(plain[:1]) and cut["finish_reason"] == "stop"
    body = {"stop": [stop], "ignore_eos": True, "include_stop_str_in_output": True}
    kept = complete(http, model, **body)["choices"][0]
    assert kept["text"] == ref.text(plain[:2])
    streamed = events(http, "/v1/completions", {"model": model, "prompt": PROMPT,
                                                "max_tokens": LENGTH, "temperature": 0,
                                                **body})
    assert "".join(e["choices"][0]["text"] for e in streamed if e["choices"]) == kept["text"]


def check_stop_strings_wait_for_min_tokens(http: httpx.Client, model: str,
                                           ref: Definition) -> None:
    plain = ref.greedy(ref.ids(), ends=frozenset())
    stop = ref.text(plain[1:2])
    m = 4
    drawn = ref.greedy(ref.ids(), min_tokens=m, ignore_eos=True)
    text, after = ref.text(drawn), len(ref.text(drawn[:m]))
    # The first match ending past the first m tokens' text; none: the whole text.
    ends = [i for i in range(len(text)) if text.startswith(stop, i) and i + len(stop) > after]
    want = text[:ends[0]] if ends else text
    for stream in (False, True):
        body = {"model": model, "prompt": PROMPT, "max_tokens": LENGTH, "temperature": 0,
                "stop": [stop], "ignore_eos": True, "min_tokens": m}
        if stream:
            got = "".join(e["choices"][0]["text"] for e in events(http, "/v1/completions", body)
                          if e["choices"])
        else:
            got = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
        assert got == want
    assert len(want) > len(ref.text(plain[:1]))  # without min_tokens it stops at once


def check_special_tokens_options(http: httpx.Client, model: str, ref: Definition,
                                 eos: int, k: int) -> None:
    plain = ref.greedy(ref.ids(), ends=frozenset())
    shown = complete(http, model, ignore_eos=True, skip_special_tokens=False)["choices"][0]
    assert shown["text"] == ref.text(plain, skip=False)
    assert shown["text"][k] == chr(ref.byte_of[eos])
    bare = complete(http, model, add_special_tokens=False, ignore_eos=True)
    assert bare["usage"]["prompt_tokens"] == len(ref.ids(specials=False)) == len(ref.ids()) - 1
    assert token_ids(bare["choices"][0]) == ref.greedy(ref.ids(specials=False), ends=frozenset())
    chat = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
    default = http.post("/v1/chat/completions", json=chat).json()["usage"]["prompt_tokens"]
    added = http.post("/v1/chat/completions", json={**chat, "add_special_tokens": True})
    assert added.json()["usage"]["prompt_tokens"] == default + 1  # the BOS the template lacks


def check_continuous_usage(http: httpx.Client, model: str) -> None:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "n": 2,
            "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    whole = http.post("/v1/completions", json={**body, "stream_options": None}).json()
    got = events(http, "/v1/completions", body)
    counts: dict[int, list[int]] = {0: [], 1: []}
    for event in got[:-1]:
        (choice,) = event["choices"]
        usage = event["usage"]
        assert usage["prompt_tokens"] == whole["usage"]["prompt_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        counts[choice["index"]].append(usage["completion_tokens"])
    for seen in counts.values():
        assert seen == sorted(seen) and seen[-1] == 5 and seen[0] >= 1
    # The counts, not the cache's hits: the earlier request may have filled the cache.
    assert got[-1]["choices"] == []
    assert {**got[-1]["usage"], "prompt_tokens_details": None} == {
        **whole["usage"], "prompt_tokens_details": None}
    assert "prompt_tokens_details" not in got[0]["usage"]
    chat = events(http, "/v1/chat/completions", {
        "model": model, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}],
        "ignore_eos": True, "stream_options": {"continuous_usage_stats": True}})
    assert chat[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chat[0]["usage"]["completion_tokens"] == 0
    assert all(e["usage"]["prompt_tokens"] == chat[0]["usage"]["prompt_tokens"] for e in chat)
    assert chat[-1]["usage"]["completion_tokens"] == 3


def check_cached_tokens(http: httpx.Client, model: str) -> None:
    """A repeated prompt reports what the prefix cache gave it: on the built-in engine, the
    adapter's virtual tokens; on vLLM, whole blocks only (128 positions on a CPU, more than
    this prompt), so none."""
    virtual = http.post("/v1/generate", json={"adapter_id": model, "text": PROMPT,
                                              "max_new_tokens": 1}).json()["usage"]
    expected = 0 if http.get("/version").json()["engine"] == "vllm" else virtual[
        "virtual_tokens"]
    assert virtual["virtual_tokens"] > 0
    again = http.post("/v1/generate", json={"adapter_id": model, "text": PROMPT,
                                            "max_new_tokens": 1}).json()["usage"]
    assert again["cached_tokens"] == expected
    plain = complete(http, model, max_tokens=1)["usage"]
    assert plain["prompt_tokens_details"] == {"cached_tokens": expected}
    streamed = events(http, "/v1/completions", {
        "model": model, "prompt": [PROMPT, PROMPT], "max_tokens": 1,
        "stream_options": {"include_usage": True}})
    assert streamed[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 2 * expected}


def check_logprobs_by_token_id_and_bytes(http: httpx.Client, model: str,
                                         byte_of: dict[int, int]) -> None:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
            "logprobs": 20, "ignore_eos": True}
    by_text = http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    by_id = http.post("/v1/completions", json={**body, "return_tokens_as_token_ids": True}
                      ).json()["choices"][0]["logprobs"]
    for texts, ids in zip(by_text["top_logprobs"], by_id["top_logprobs"], strict=True):
        assert len(ids) >= 20 and all(key.startswith("token_id:") for key in ids)
        # Distinct byte tokens that decode alone to U+FFFD share one key by text.
        partial = [key for key in ids if byte_of.get(int(key[9:]), 0) >= 0x80]
        if len(partial) > 1:
            assert len(texts) < len(ids)
    assert by_text["text_offset"] == by_id["text_offset"]
    chat = http.post("/v1/chat/completions", json={
        "model": model, "max_tokens": 4, "logprobs": True, "top_logprobs": 20,
        "return_tokens_as_token_ids": True, "ignore_eos": True,
        "messages": [{"role": "user", "content": "Hi"}]}).json()
    entries = [e for step in chat["choices"][0]["logprobs"]["content"]
               for e in (step, *step["top_logprobs"])]
    partial = 0
    for entry in entries:
        token = int(entry["token"].removeprefix("token_id:"))
        if token in byte_of:
            assert entry["bytes"] == [byte_of[token]]  # its own byte, not U+FFFD's three
            partial += byte_of[token] >= 0x80
    assert partial > 0
    plain = http.post("/v1/chat/completions", json={
        "model": model, "max_tokens": 4, "logprobs": True, "top_logprobs": 20,
        "ignore_eos": True, "messages": [{"role": "user", "content": "Hi"}]}).json()
    tops = plain["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert any(t["token"] == "\ufffd" and len(t["bytes"]) == 1 for t in tops)


def check_bad_extensions_are_named(http: httpx.Client, model: str, vocab: int) -> None:
    for body, param in (({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
                        ({"stop_token_ids": [vocab]}, "stop_token_ids"),
                        ({"stop_token_ids": [-1]}, "stop_token_ids"),
                        ({"min_tokens": -1}, "min_tokens"),
                        ({"stream_options": {"continuous_usage": True}, "stream": True},
                         "stream_options.continuous_usage")):
        response = http.post("/v1/completions", json={"model": model, "prompt": PROMPT, **body})
        assert response.status_code == 400, (body, response.text)
        assert param in (response.json()["error"]["param"] or "") + response.text, body
