"""Logprobs, prompt logprobs and penalties in both loops, against recomputation in float32.

A token's logprob is the log-softmax of the raw logits at its position, whatever penalties
and sampling did; a penalized greedy row takes the argmax of its logits after OpenAI's
presence/frequency and transformers' repetition penalty, written out here independently of
the engine's code.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from server.engine.interface import SamplingParams
from server.engine.rows import BatchRow
from tests.engine.conftest import make_core, run_core
from tests.factories import load_base, penalized_greedy

TEXT = "The quick brown fox jumps over the lazy dog"


def _embeds(base, prompt: torch.Tensor | None, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        x = base.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))
    return x if prompt is None else torch.cat([prompt, x])


def _step_logps(base, prompt, text_ids: list[int], drawn: list[int]) -> list[torch.Tensor]:
    """The raw log-softmax before each drawn token, by recomputation (decoder-only)."""
    out = []
    with torch.inference_mode():
        for i in range(len(drawn)):
            x = _embeds(base, prompt, [*text_ids, *drawn[:i]])
            out.append(torch.log_softmax(base(inputs_embeds=x[None]).logits[0, -1].float(), -1))
    return out


def _check_logprobs(out, logps: list[torch.Tensor], top: int) -> None:
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    for token, lp, ref in zip(out.token_ids, out.logprobs, logps, strict=True):
        assert lp.token_id == token
        assert math.isclose(lp.logprob, float(ref[token]), abs_tol=1e-4)
        best = ref.topk(top)
        assert [t for t, _ in lp.top] == best.indices.tolist()
        assert all(math.isclose(v, float(r), abs_tol=1e-4)
                   for (_, v), r in zip(lp.top, best.values, strict=True))


def _row(ids, prompt, **params) -> BatchRow:
    soft = 0 if prompt is None else prompt.shape[0]
    return BatchRow(ids, prompt, SamplingParams(**params), text_span=(soft, soft + len(ids)))


@pytest.fixture
def rows_prompt(llama):
    model, tokenizer = llama
    torch.manual_seed(3)
    return torch.randn(4, model.config.hidden_size) * 0.5, tokenizer(TEXT)["input_ids"]


def test_logprobs_of_greedy_sampled_and_penalized_rows(run, llama, rows_prompt):
    model, tokenizer = llama
    prompt, ids = rows_prompt
    penalties = {"presence_penalty": 0.7, "frequency_penalty": 0.9, "repetition_penalty": 1.6}
    rows = [_row(ids, None, max_new_tokens=6, logprobs=3, ignore_eos=True),
            _row(ids[:3], prompt, max_new_tokens=5, logprobs=0, ignore_eos=True),
            _row(ids, prompt, max_new_tokens=8, logprobs=2, ignore_eos=True, **penalties),
            _row(ids, prompt, max_new_tokens=6, temperature=0.9, seed=7, logprobs=5,
                 ignore_eos=True),
            _row(ids, prompt, max_new_tokens=4, ignore_eos=True)]
    outs = run(model, tokenizer, rows)
    base = load_base(Path(model.name_or_path))
    for row, out in zip(rows, outs, strict=True):
        assert out.error is None and not out.aborted
        if row.params.logprobs is None:
            assert out.logprobs is None
            continue
        _check_logprobs(out, _step_logps(base, row.prompt_embeds, list(row.prompt_ids),
                                         list(out.token_ids)), row.params.logprobs)
    expected = penalized_greedy(base, prompt, ids, 8, presence=0.7, frequency=0.9,
                                 repetition=1.6)
    assert list(outs[2].token_ids) == expected
    unpenalized = [int(lp.top[0][0]) for lp in outs[2].logprobs]
    assert unpenalized != expected  # the penalties changed what greedy picks


def test_prompt_logprobs_score_the_text(run, llama, rows_prompt):
    model, tokenizer = llama
    prompt, ids = rows_prompt
    rows = [_row(ids, prompt, max_new_tokens=1, prompt_logprobs=2),
            _row(ids, None, max_new_tokens=2, prompt_logprobs=0, logprobs=1)]
    outs = run(model, tokenizer, rows)
    base = load_base(Path(model.name_or_path))
    for row, out in zip(rows, outs, strict=True):
        with torch.inference_mode():
            x = _embeds(base, row.prompt_embeds, list(row.prompt_ids))
            logp = torch.log_softmax(base(inputs_embeds=x[None]).logits[0].float(), -1)
        scored = out.prompt_logprobs
        assert scored is not None and len(scored) == len(ids)
        start = row.text_span[0]
        if start == 0:
            assert scored[0] is None  # nothing precedes the first token
        for k, value in enumerate(scored):
            if start + k == 0:
                continue
            ref = logp[start + k - 1]
            assert value.token_id == ids[k]
            assert math.isclose(value.logprob, float(ref[ids[k]]), abs_tol=1e-4)
            best = ref.topk(row.params.prompt_logprobs).indices.tolist()
            assert [t for t, _ in value.top] == best


def test_core_scores_prompts_across_chunks_preemption_and_the_prefix_cache(llama, rows_prompt):
    """A prompt cut into chunks by a small budget, a row preempted and recomputed, and a row
    whose soft prompt comes from the prefix cache score exactly what a lone row scores."""
    model, tokenizer = llama
    prompt, ids = rows_prompt
    alone = run_core(model, tokenizer, [_row(ids, prompt, max_new_tokens=4, prompt_logprobs=1,
                                             logprobs=1, ignore_eos=True)])[0]
    chunked = run_core(model, tokenizer, [
        _row(ids, prompt, max_new_tokens=4, prompt_logprobs=1, logprobs=1, ignore_eos=True),
        _row(ids[:2], None, max_new_tokens=9, ignore_eos=True)],
        max_batch_tokens=3, preempt={2: [0], 5: [0]}, resume={4: [0]})[0]
    for got in (chunked,):
        assert got.token_ids == alone.token_ids
        assert [v and v.token_id for v in got.prompt_logprobs] == \
            [v and v.token_id for v in alone.prompt_logprobs]
        for a, b in zip(got.prompt_logprobs, alone.prompt_logprobs, strict=True):
            assert math.isclose(a.logprob, b.logprob, abs_tol=1e-4)

    embedding = model.get_input_embeddings()
    table, core = make_core(model, tokenizer, slots=2, max_batch_tokens=64, prefix_tokens=16,
                            graphs=False)
    try:
        entry = table.insert("t", "a", "v", prompt)
        virtual = list(entry.ids)
        with torch.inference_mode():
            core.add("warm", BatchRow(ids, None, SamplingParams(max_new_tokens=1)),
                     [*virtual, *ids])
            while len(core):
                core.step()
            core.step()  # stores the prefix
            assert core.prefixes is not None and core.prefixes.stats().entries == 1
            row = BatchRow([*virtual, *ids], None, SamplingParams(
                max_new_tokens=4, prompt_logprobs=1, logprobs=1, ignore_eos=True),
                text_span=(len(virtual), len(virtual) + len(ids)))
            core.add("scored", row, [*virtual, *ids])
            out = {}
            while len(core):
                out.update(core.step())
        hits = core.prefixes.stats().hits
    finally:
        model.set_input_embeddings(embedding)
    got = out["scored"]
    assert hits == 1
    assert got.token_ids == alone.token_ids
    for a, b in zip(got.prompt_logprobs, alone.prompt_logprobs, strict=True):
        assert math.isclose(a.logprob, b.logprob, abs_tol=1e-4)


def test_seq2seq_rows_with_prompt_logprobs_fail_alone(model_and_tokenizer):
    from server.engine.generation import run_batch

    model, tokenizer = model_and_tokenizer
    if not model.config.is_encoder_decoder:
        pytest.skip("decoder-only models score prompts")
    ids = tokenizer(TEXT)["input_ids"]
    outs = run_batch(model, tokenizer, [
        _row(ids, None, max_new_tokens=3, prompt_logprobs=1),
        _row(ids, None, max_new_tokens=3, logprobs=2, repetition_penalty=1.5)])
    assert outs[0].aborted and "decoder-only" in str(outs[0].error)
    assert outs[1].error is None and len(outs[1].logprobs) == len(outs[1].token_ids)
