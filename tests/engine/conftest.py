"""Fixtures shared by the batch-runner tests: tiny models with their tokenizers, row helpers, and
`run`: static batching (run_batch) or the continuous loop run to the end."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from server.engine.decoding import RunningBatch
from server.engine.generation import BatchRow, RowOutput, run_batch
from server.engine.interface import SamplingParams
from tests.factories import load_base


@pytest.fixture(params=["llama", "t5"])
def model_and_tokenizer(request, tiny_model_dirs):
    model_dir = tiny_model_dirs[request.param]
    return load_base(model_dir), AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def llama(tiny_model_dirs):
    model_dir = tiny_model_dirs["llama"]
    return load_base(model_dir), AutoTokenizer.from_pretrained(model_dir)


def make_row(tokenizer, text: str, **params) -> BatchRow:
    return BatchRow(tokenizer(text)["input_ids"], None, SamplingParams(**params))


def run_one(model, tokenizer, row: BatchRow) -> RowOutput:
    return run_batch(model, tokenizer, [row])[0]


def run_continuous(model, tokenizer, rows: list[BatchRow]) -> list[RowOutput]:
    """Every row admitted at once into a RunningBatch, stepped until all have left."""
    if model.config.is_encoder_decoder:
        pytest.skip("seq2seq models run static batching")
    batch: RunningBatch[int] = RunningBatch(model, tokenizer)
    outputs = dict(batch.admit(list(enumerate(rows))))
    while len(batch):
        outputs.update(batch.step())
    return [outputs[i] for i in range(len(rows))]


@pytest.fixture(params=["static", "continuous"])
def run(request):
    """The batch runner under test: same rows in, same outputs out."""
    return run_batch if request.param == "static" else run_continuous
