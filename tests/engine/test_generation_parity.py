"""The correctness bar: inside one mixed batch, every row's greedy tokens equal PEFT's output for
that request run alone, token for token, in float32 — for every architecture and adapter type,
with static batching and (decoder-only models) with continuous batching, rows joining a running
batch at different steps and leaving as they finish.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from adapters_store import ModelSpec, parse_directory
from server.engine import kv_slab
from server.engine.decoding import RunningBatch, unsupported_reason
from server.engine.generation import BatchRow, RowOutput, run_batch
from server.engine.interface import FinishReason, SamplingParams
from tests.engine.conftest import run_continuous
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
REQUESTS = (
    Request(TEXTS[0], 0, 12),
    Request(TEXTS[1], 1, 9),
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


# Continuous batching: how many of REQUESTS join before each step (the rest join at the end).
JOINS = (3, 0, 1, 4, 0, 0, 2, 1, 0, 0, 0, 3)
PARK = {2: (1, 4), 5: (3, 7)}  # at step k, park the rows of these REQUESTS indices ...
RESUME = {4: (1,), 6: (4,), 9: (3, 7)}  # ... and at step k resume these


def run_staggered(model, tokenizer, rows: list[BatchRow]) -> list[RowOutput]:
    """Rows join a RunningBatch in JOINS-sized groups between steps, some are parked for a
    few steps and resumed (as a fair scheduler does); outputs in row order."""
    batch: RunningBatch[int] = RunningBatch(model, tokenizer)
    outputs: dict[int, RowOutput] = {}
    pending = list(enumerate(rows))
    joins = list(JOINS)
    widths, parked, retired = [], [], []
    for k in itertools.count():
        if not (pending or len(batch) or batch.parked):
            break
        take = joins.pop(0) if joins else len(pending)
        admitted, pending = pending[:take], pending[take:]
        if admitted:
            outputs.update(batch.admit(admitted))
        batch.park([i for i in PARK.get(k, ()) if i in batch.handles])
        batch.resume([i for i in RESUME.get(k, ()) if i in batch.parked])
        if k > max(RESUME):
            batch.resume(batch.parked)
        parked.append(len(batch.parked))
        retired.append(batch._running.retired)  # finished rows not yet compacted away
        outputs.update(batch.step())
        widths.append(batch.cache_length)
    # Rows of different lengths shared the cache, and finished rows were trimmed away.
    assert max(widths) > 0 and widths[-1] == 0
    assert max(parked) >= 2 and parked[-1] == 0
    assert max(retired) >= 1  # some steps ran with finished rows still in the cache
    return [outputs[i] for i in range(len(rows))]


CUDA = pytest.param("cuda", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_matches_peft_alone(arch: str, device: str, tiny_model_dirs,
                                        tmp_path: Path, monkeypatch) -> None:
    """The engine on `device`; the PEFT reference always on the CPU, float32. Continuous
    batching runs twice: as configured, and with the KV cache's spare room cut to a few
    columns so that layers are regrown every few steps."""
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
    if not seq2seq:
        assert unsupported_reason(model, tokenizer) is None
        modes["continuous"] = run_staggered(model, tokenizer, rows)
        with monkeypatch.context() as m:
            m.setattr(kv_slab, "MIN_SPARE", 1)
            modes["continuous, regrowing"] = run_staggered(model, tokenizer, rows)

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
            assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)

    # Anchor the reused-model helper to the factory's reference itself, for one adapter row.
    assert list(outputs[2].token_ids) == peft_reference_generate(
        model_dir, adapter_dirs[2], list(rows[2].prompt_ids), REQUESTS[2].max_new_tokens)

    # A degenerate tiny model (one token repeated) would make this test vacuous.
    distinct_outputs = {out.token_ids for out in outputs}
    varied_rows = sum(len(set(out.token_ids)) > 2 for out in outputs)
    assert len(distinct_outputs) >= len(outputs) - 2, f"{arch}: outputs barely depend on input"
    assert varied_rows >= len(outputs) // 2, f"{arch}: outputs are mostly one repeated token"


def test_rows_at_the_context_limit_can_finish_while_others_run(tiny_model_dirs) -> None:
    """GPT-2's position table ends at n_positions: a row that uses the whole context and then
    rides along, finished, until the next compaction must not be fed a position past it."""
    model_dir = tiny_model_dirs["gpt2"]
    model, tokenizer = load_base(model_dir), AutoTokenizer.from_pretrained(model_dir)
    limit = model.config.n_positions

    def row(ids: list[int], extra: int = 0) -> BatchRow:
        return BatchRow(ids, None, SamplingParams(max_new_tokens=limit - len(ids) - extra,
                                                  ignore_eos=True))

    rows = [row([5] * 10, extra=3)] + [row([7 + i] * 6) for i in range(5)]
    outputs = run_continuous(model, tokenizer, rows)
    assert [len(o.token_ids) for o in outputs] == [limit - 13] + [limit - 6] * 5
