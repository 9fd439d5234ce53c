"""Fixtures shared by the batch-runner tests: tiny models with their tokenizers, row helpers,
`run`: static batching (run_batch) or the engine core run to the end, and `served`: rows run
through a runner and the frontend, as a client gets them (text, stop strings, chunks)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from server.engine.core.engine_core import EngineCore, StepStats
from server.engine.core.kv_cache import SlotKVCache, cache_shape
from server.engine.core.prefix_cache import PrefixCache
from server.engine.generation import run_batch
from server.engine.interface import GenerationRequest, GenerationResult, SamplingParams, TokenChunk
from server.engine.output_processor import RequestOutput
from server.engine.prompt_table import PromptTable, install
from server.engine.rows import BatchRow, RowOutput, is_live
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


def make_core(model, tokenizer, *, slots: int, max_batch_tokens: int, max_len: int = 128,
              table_bytes: int = 1 << 22, prefix_tokens: int = 0,
              **kw: Any) -> tuple[PromptTable, EngineCore]:
    """An EngineCore over `model` with its input embedding wrapped by a new prompt table, in
    the model's dtype and on its device: `slots` KV slots of `max_len` (one more when decode
    steps are padded, for the scratch slot), a prefix cache of `prefix_tokens` (0: none).
    The caller gives the model back (model.set_input_embeddings(table's base))."""
    embedding = model.get_input_embeddings()
    vocab, hidden = embedding.weight.shape
    dtype, device = embedding.weight.dtype, embedding.weight.device
    table = PromptTable(vocab_size=vocab, hidden=hidden, capacity_bytes=table_bytes, dtype=dtype,
                        device=device)
    install(model, table)
    shape = cache_shape(model.config)
    padded = kw.get("pad_decodes") or kw.get("graphs", device.type == "cuda")
    cache = SlotKVCache(shape, slots=slots + bool(padded), max_len=max_len, dtype=dtype,
                        device=device)
    prefixes = None
    if prefix_tokens:
        prefixes = PrefixCache(shape, tokens=prefix_tokens, dtype=dtype, device=device)
    return table, EngineCore(model, tokenizer, cache, max_batch_tokens=max_batch_tokens,
                             prefixes=prefixes, **kw)


def run_core(model, tokenizer, rows: list[BatchRow], *, max_batch_tokens: int = 2048,
             slots: int | None = None, joins: Sequence[int] = (),
             preempt: Mapping[int, Sequence[int]] | None = None,
             resume: Mapping[int, Sequence[int]] | None = None,
             stats: list[StepStats] | None = None) -> list[RowOutput]:
    """Rows added to an EngineCore (soft prompts as table ids) and stepped until all have left;
    the model is given back as it was.

    By default every row is added at once. `joins`: how many rows are added before each step
    (the rest before the step after the last); `preempt`/`resume`: at step k, the row indices
    to preempt and to resume (rows still preempted after the last resume step resume then).
    `stats` collects each step's StepStats."""
    if model.config.is_encoder_decoder:
        pytest.skip("seq2seq models run static batching")
    embedding = model.get_input_embeddings()
    dtype = embedding.weight.dtype
    attn = model.config._attn_implementation
    preempt, resume = preempt or {}, resume or {}
    last_resume = max(resume, default=-1)
    try:
        table, core = make_core(model, tokenizer, slots=slots or max(1, len(rows)),
                                max_batch_tokens=max_batch_tokens, max_len=512, graphs=False)
        outputs: dict[int, RowOutput] = {}
        pending = list(enumerate(rows))
        schedule = list(joins)
        held: dict[int, Any] = {}
        with torch.inference_mode():
            for k in itertools.count():
                if not (pending or len(core) or held):
                    break
                take = schedule.pop(0) if schedule else len(pending)
                for i, row in pending[:take]:
                    virtual: tuple[int, ...] = ()
                    if row.prompt_embeds is not None:
                        entry = table.insert("t", f"row{i}", "v", row.prompt_embeds.to(dtype))
                        assert entry is not None
                        virtual = tuple(entry.ids)
                    if (out := core.add(i, row, [*virtual, *row.prompt_ids])) is not None:
                        outputs[i] = out
                pending = pending[take:]
                for taken in core.preempt([i for i in preempt.get(k, ()) if i in core.handles]):
                    held[taken.handle] = taken
                back = list(held) if k >= last_resume else resume.get(k, ())
                core.resume([held.pop(i) for i in back if i in held])
                outputs.update(core.step())
                if stats is not None:
                    stats.append(core.last)
    finally:
        model.set_input_embeddings(embedding)
        model.set_attn_implementation(attn)
    return [outputs[i] for i in range(len(rows))]


@pytest.fixture(params=["static", "core"])
def run(request):
    """The batch runner under test: same rows in, same outputs out."""
    return run_batch if request.param == "static" else run_core


@dataclasses.dataclass
class Served:
    """A row as its client sees it: the frontend's result (None: the row never finished) and
    its stream's chunks."""

    result: GenerationResult | None = None
    chunks: list[TokenChunk] = dataclasses.field(default_factory=list)

    @property
    def text(self) -> str:
        assert self.result is not None
        return self.result.text

    @property
    def token_ids(self) -> tuple[int, ...]:
        assert self.result is not None
        return self.result.token_ids

    @property
    def finish_reason(self):
        assert self.result is not None
        return self.result.finish_reason


def served(runner: Callable[..., list[RowOutput]], model, tokenizer, rows: list[BatchRow], *,
           stream: bool = True) -> list[Served]:
    """Rows run by `runner` with their deltas going to a RequestOutput each, which aborts a
    row whose stop string completed, as the engine's frontend does."""
    outputs = [RequestOutput(GenerationRequest(str(i), tuple(row.prompt_ids), None,
                                               params=row.params),
                             tokenizer, stream=stream, prompt_tokens=len(row.prompt_ids),
                             virtual_tokens=0)
               for i, row in enumerate(rows)]
    got = [Served() for _ in rows]

    def wired(i: int, row: BatchRow) -> BatchRow:
        def on_delta(delta) -> None:
            for item in outputs[i].add(delta):
                if isinstance(item, TokenChunk):
                    got[i].chunks.append(item)
                else:
                    got[i].result = item

        def is_aborted() -> bool:
            return outputs[i].finished or (row.is_aborted is not None and row.is_aborted())

        return dataclasses.replace(row, on_delta=on_delta, live=is_live(stream, row.params),
                                   is_aborted=is_aborted)

    runner(model, tokenizer, [wired(i, row) for i, row in enumerate(rows)])
    return got
