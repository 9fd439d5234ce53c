"""The correctness bar: inside one mixed batch, every row's greedy tokens equal PEFT's output for
that request run alone, token for token, in float32 — for every architecture and adapter type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from server.engine.generation import BatchRow, run_batch
from server.engine.interface import FinishReason, SamplingParams
from tests.factories import (
    ARCHS,
    is_seq2seq,
    load_base,
    load_peft_reference,
    load_prompt_embeddings,
    make_adapter,
    peft_reference_generate,
    reference_greedy,
)

# (kind, num_virtual_tokens, seed): every PEFT type, several virtual-token counts.
ADAPTERS = (
    ("prompt_tuning", 3, 1),
    ("p_tuning_mlp", 6, 2),
    ("p_tuning_lstm", 9, 3),
    ("prompt_tuning", 1, 4),
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


# 11 rows: each adapter at least twice, two bare rows, text and output lengths all mixed.
REQUESTS = (
    Request(TEXTS[0], 0, 12),
    Request(TEXTS[1], 1, 9),
    Request(TEXTS[2], 2, 14),
    Request(TEXTS[3], None, 10),
    Request(TEXTS[4], 3, 11),
    Request(TEXTS[2], 0, 8),
    Request(TEXTS[0], 2, 13),
    Request(TEXTS[3], 1, 12),
    Request(TEXTS[1], None, 7),
    Request(TEXTS[4], 2, 10),
    Request(TEXTS[1], 3, 12),
)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_matches_peft_alone(arch: str, tiny_model_dirs, tmp_path: Path) -> None:
    model_dir = tiny_model_dirs[arch]
    seq2seq = is_seq2seq(arch)
    adapter_dirs = [
        make_adapter(model_dir, tmp_path / f"adapter-{i}", kind, num_virtual_tokens=n, seed=seed)
        for i, (kind, n, seed) in enumerate(ADAPTERS)
    ]
    model = load_base(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    embeds = [load_prompt_embeddings(d, seq2seq=seq2seq) for d in adapter_dirs]
    rows = [
        BatchRow(
            prompt_ids=tokenizer(r.text)["input_ids"],
            prompt_embeds=None if r.adapter is None else embeds[r.adapter],
            params=SamplingParams(max_new_tokens=r.max_new_tokens),
        )
        for r in REQUESTS
    ]

    outputs = run_batch(model, tokenizer, rows)

    # One PEFT model per adapter, reused across its requests (loading is the slow part).
    references = {None: load_base(model_dir)}
    references.update({i: load_peft_reference(model_dir, d) for i, d in enumerate(adapter_dirs)})
    for i, (request, row, out) in enumerate(zip(REQUESTS, rows, outputs, strict=True)):
        expected = reference_greedy(references[request.adapter], list(row.prompt_ids),
                                    request.max_new_tokens)
        assert list(out.token_ids) == expected, f"{arch} row {i} ({request})"
        eos = bool(expected) and expected[-1] == model.generation_config.eos_token_id
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
