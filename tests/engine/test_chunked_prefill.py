"""A long prompt prefilled a chunk per step beside running rows (--max-prefill-tokens) gives
exactly the tokens of the same row prefilled in one pass, soft prompt included, on every
decoder architecture; the running row is not disturbed; an abort mid-prefill stops it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from server.engine.decoding import RunningBatch
from server.engine.generation import BatchRow
from server.engine.interface import SamplingParams
from tests.factories import load_base

TEXT = "a long prompt that goes on and on, " * 4


def _row(ids: tuple[int, ...], embeds: torch.Tensor | None, n: int, *,
         aborted=None) -> BatchRow:
    return BatchRow(prompt_ids=ids, prompt_embeds=embeds, is_aborted=aborted,
                    params=SamplingParams(max_new_tokens=n, ignore_eos=True))


def _run(batch: RunningBatch, outputs: dict) -> None:
    while len(batch) or batch.chunked is not None:
        outputs.update(batch.advance_chunk())
        outputs.update(batch.step())


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "bloom"])
def test_chunked_prefill_equals_one_pass(arch: str, tiny_model_dirs) -> None:
    model = load_base(tiny_model_dirs[arch])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs[arch])
    hidden = model.get_input_embeddings().weight.shape[1]
    ids = tuple(tokenizer(TEXT)["input_ids"])
    soft = torch.randn(5, hidden, generator=torch.Generator().manual_seed(3)) * 0.1
    short = tuple(tokenizer("Hi!")["input_ids"])

    def beside_a_running_row(chunk: int | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        batch: RunningBatch[str] = RunningBatch(model, tokenizer)
        outputs: dict = dict(batch.admit([("running", _row(short, None, 30))]))
        outputs.update(batch.step())
        if chunk is None:
            outputs.update(batch.admit([("long", _row(ids, soft, 12))]))
        else:
            outputs.update(batch.admit_chunked("long", _row(ids, soft, 12), chunk))
            assert batch.chunked == "long" and len(batch) == 1  # not running yet
        _run(batch, outputs)
        return outputs["long"].token_ids, outputs["running"].token_ids

    one_pass = beside_a_running_row(None)
    for chunk in (7, 16):
        assert beside_a_running_row(chunk) == one_pass, chunk


def test_a_row_aborted_mid_prefill_stops_and_leaves_aborted(tiny_model_dirs) -> None:
    model = load_base(tiny_model_dirs["llama"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    ids = tuple(tokenizer(TEXT)["input_ids"])
    stop = {"now": False}
    batch: RunningBatch[str] = RunningBatch(model, tokenizer)
    assert batch.admit_chunked("long", _row(ids, None, 5, aborted=lambda: stop["now"]), 8) == []
    assert batch.advance_chunk() == [] and batch.chunked == "long"
    stop["now"] = True
    (handle, out), = batch.advance_chunk()
    assert handle == "long" and out.aborted and batch.chunked is None and len(batch) == 0
