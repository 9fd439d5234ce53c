"""The correctness bar: inside one mixed batch, every row's greedy tokens equal PEFT's output for
that request run alone, token for token, in float32 — for every architecture and adapter type,
with static batching and (decoder-only models) with the engine core: rows joining running rows at
different steps, prompts cut into chunks by a small token budget, rows preempted mid-output and
recomputed, and rows leaving as they finish. BLOOM (its ALiBi attention does not go through
transformers' attention interface) runs static batching only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from adapters_store import ModelSpec, parse_directory
from server.engine.generation import run_batch
from server.engine.interface import FinishReason, SamplingParams
from server.engine.rows import BatchRow, RowOutput
from tests.engine.conftest import run_core
from tests.factories import (
    ARCHS,
    is_seq2seq,
    load_base,
    load_peft_reference,
    load_prompt_embeddings,
    make_adapter,
    make_encoder_checkpoint,
    peft_reference_generate,
    reference_greedy,
)


@dataclass(frozen=True)
class AdapterSpec:
    kind: str  # a tests.factories ADAPTER_KINDS entry
    num_virtual_tokens: int
    seed: int
    # A raw P-tuning training checkpoint (encoder weights, not collapsed): served through
    # adapters_store's collapse, checked against PEFT's save_pretrained of the same model.
    raw_encoder: bool = False
    strip_prefix: bool = False


# Every PEFT type, raw encoders too, and several virtual-token counts.
ADAPTERS = (
    AdapterSpec("prompt_tuning", 3, 1),
    AdapterSpec("p_tuning_mlp", 6, 2),
    AdapterSpec("p_tuning_lstm", 9, 3),
    AdapterSpec("prompt_tuning", 1, 4),
    AdapterSpec("p_tuning_mlp", 5, 5, raw_encoder=True),
    AdapterSpec("p_tuning_lstm", 4, 6, raw_encoder=True, strip_prefix=True),
)
TEXTS = (
    "Tweet: I love it. Label:",
    "a",
    "The quick brown fox jumps over the lazy dog",
    "Hi!",
    "Résumé: naïve café ☕",
)


@dataclass(frozen=True)
class Request:
    text: str
    adapter: int | None  # index into ADAPTERS, None: bare model
    max_new_tokens: int


# 14 rows: each adapter at least twice, two bare rows, text and output lengths all mixed.
# Every token drawn wins by at least 1e-4 in float32 on the tiny models, so a GPU's different
# (and equally right) rounding cannot flip one: the second row stops before the GPT-2 step
# whose top two logits are 5e-6 apart.
REQUESTS = (
    Request(TEXTS[0], 0, 12),
    Request(TEXTS[1], 1, 5),
    Request(TEXTS[2], 2, 14),
    Request(TEXTS[3], None, 10),
    Request(TEXTS[4], 3, 11),
    Request(TEXTS[2], 0, 8),
    Request(TEXTS[0], 4, 13),
    Request(TEXTS[3], 1, 12),
    Request(TEXTS[1], None, 7),
    Request(TEXTS[4], 2, 10),
    Request(TEXTS[1], 3, 12),
    Request(TEXTS[2], 5, 9),
    Request(TEXTS[3], 5, 12),
    Request(TEXTS[4], 4, 6),
)


def _make_adapter(model_dir: Path, root: Path, i: int, spec: AdapterSpec, *,
                  seq2seq: bool, hidden: int) -> tuple[Path, torch.Tensor]:
    """(PEFT output dir for the reference, the soft prompt the server would serve)."""
    peft_dir = root / f"adapter-{i}"
    if not spec.raw_encoder:
        make_adapter(model_dir, peft_dir, spec.kind, num_virtual_tokens=spec.num_virtual_tokens,
                     seed=spec.seed)
        return peft_dir, load_prompt_embeddings(peft_dir, seq2seq=seq2seq)
    raw_dir = make_encoder_checkpoint(
        model_dir, root / f"raw-{i}", spec.kind, num_virtual_tokens=spec.num_virtual_tokens,
        seed=spec.seed, strip_prefix=spec.strip_prefix, reference_dir=peft_dir)
    parsed = parse_directory(raw_dir, spec=ModelSpec(token_dim=hidden))
    return peft_dir, parsed.embeddings[: parsed.num_virtual_tokens]


CORE_ARCHS = ("gpt2", "llama", "qwen2")  # the models the engine core serves
# The engine core: how many of REQUESTS join before each step (the rest join at the end) ...
JOINS = (3, 0, 1, 4, 0, 0, 2, 1, 0, 0, 0, 3)
PREEMPT = {2: (1, 4), 5: (3, 7)}  # ... at step k, preempt the rows of these REQUESTS ...
RESUME = {4: (1,), 6: (4,), 9: (3, 7)}  # ... and at step k resume these


def run_staggered(model, tokenizer, rows: list[BatchRow], *, slots: int) -> list[RowOutput]:
    """The engine core as the scheduler drives it: rows join in JOINS-sized groups, a budget of
    16 tokens per step cuts the longer prompts into chunks, some rows are preempted for a few
    steps and recomputed when they resume, and with fewer slots than rows some wait."""
    stats: list = []
    outputs = run_core(model, tokenizer, rows, max_batch_tokens=16, slots=slots, joins=JOINS,
                       preempt=PREEMPT, resume=RESUME, stats=stats)
    assert any(s.decodes and s.prefill_tokens for s in stats)  # chunks beside decodes
    assert any(s.prefill_tokens == 16 for s in stats)  # the budget cut a step's prefill
    return outputs


CUDA = pytest.param("cuda", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_matches_peft_alone(arch: str, device: str, tiny_model_dirs,
                                        tmp_path: Path) -> None:
    """The engine on `device`; the PEFT reference always on the CPU, float32. The engine core
    runs twice: with a slot for every row, and with four slots (rows wait for one)."""
    model_dir = tiny_model_dirs[arch]
    seq2seq = is_seq2seq(arch)
    model = load_base(model_dir).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hidden = model.get_input_embeddings().weight.shape[1]
    made = [_make_adapter(model_dir, tmp_path, i, spec, seq2seq=seq2seq, hidden=hidden)
            for i, spec in enumerate(ADAPTERS)]
    adapter_dirs = [d for d, _ in made]
    embeds = [e.to(device) for _, e in made]
    rows = [
        BatchRow(
            prompt_ids=tokenizer(r.text)["input_ids"],
            prompt_embeds=None if r.adapter is None else embeds[r.adapter],
            params=SamplingParams(max_new_tokens=r.max_new_tokens),
        )
        for r in REQUESTS
    ]

    outputs = run_batch(model, tokenizer, rows)
    modes = {"static": outputs}
    if arch in CORE_ARCHS:
        modes["core"] = run_staggered(model, tokenizer, rows, slots=len(rows))
        modes["core, 4 slots"] = run_staggered(model, tokenizer, rows, slots=4)

    # One PEFT model per adapter, reused across its requests (loading is the slow part).
    references = {None: load_base(model_dir)}
    references.update({i: load_peft_reference(model_dir, d) for i, d in enumerate(adapter_dirs)})
    for i, (request, row) in enumerate(zip(REQUESTS, rows, strict=True)):
        expected = reference_greedy(references[request.adapter], list(row.prompt_ids),
                                    request.max_new_tokens)
        eos = bool(expected) and expected[-1] == model.generation_config.eos_token_id
        for mode, outs in modes.items():
            out = outs[i]
            assert list(out.token_ids) == expected, f"{arch} {mode} row {i} ({request})"
            assert out.finish_reason is (FinishReason.EOS if eos else FinishReason.LENGTH)

    # Anchor the reused-model helper to the factory's reference itself, for one adapter row.
    assert list(outputs[2].token_ids) == peft_reference_generate(
        model_dir, adapter_dirs[2], list(rows[2].prompt_ids), REQUESTS[2].max_new_tokens)

    # A degenerate tiny model (one token repeated) would make this test vacuous.
    distinct_outputs = {out.token_ids for out in outputs}
    varied_rows = sum(len(set(out.token_ids)) > 2 for out in outputs)
    assert len(distinct_outputs) >= len(outputs) - 2, f"{arch}: outputs barely depend on input"
    assert varied_rows >= len(outputs) // 2, f"{arch}: outputs are mostly one repeated token"


def test_rows_at_the_context_limit_can_finish_while_others_run(tiny_model_dirs) -> None:
    """GPT-2's position table ends at n_positions: a row that uses the whole context must not
    be fed a position past it, nor disturb the rows still running."""
    model_dir = tiny_model_dirs["gpt2"]
    model, tokenizer = load_base(model_dir), AutoTokenizer.from_pretrained(model_dir)
    limit = model.config.n_positions

    def row(ids: list[int], extra: int = 0) -> BatchRow:
        return BatchRow(ids, None, SamplingParams(max_new_tokens=limit - len(ids) - extra,
                                                  ignore_eos=True))

    rows = [row([5] * 10, extra=3)] + [row([7 + i] * 6) for i in range(5)]
    outputs = run_core(model, tokenizer, rows)
    assert [len(o.token_ids) for o in outputs] == [limit - 13] + [limit - 6] * 5
