"""Fixtures shared by the run_batch tests: tiny models with their tokenizers, and row helpers."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

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
