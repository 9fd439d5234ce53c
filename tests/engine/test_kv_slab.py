"""The running rows' KV cache (server.engine.kv_slab): rows join, step, move and leave in place,
and the model must always see exactly the right-aligned cache a DynamicCache would hold."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer
from transformers.cache_utils import DynamicLayer

from server.engine import kv_slab
from server.engine.decoding import RunningBatch
from server.engine.generation import BatchRow, run_batch
from server.engine.interface import SamplingParams
from server.engine.kv_slab import KVSlab
from tests.factories import load_base

HEADS, DIM, LAYERS = 2, 3, 2


def _source(rows: list[list[float]]) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                              torch.Tensor]:
    """Right-aligned keys, values (= -keys) and mask for rows of token values."""
    width = max(len(r) for r in rows)
    keys = torch.zeros(len(rows), HEADS, width, DIM)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            keys[i, :, width - len(r):] = torch.tensor(r)[None, :, None]
            mask[i, width - len(r):] = 1
    return [keys * (n + 1) for n in range(LAYERS)], [-keys * (n + 1) for n in range(LAYERS)], mask


def _check(slab: KVSlab, expected: list[list[float]]) -> None:
    """The views hold each row right-aligned, mask 1 on its tokens and 0 in front."""
    assert slab.rows == len(expected)
    assert slab.width >= max((len(r) for r in expected), default=0)
    mask = slab.mask_view()
    for n, layer in enumerate(slab.layers):
        assert layer.keys.shape == (len(expected), HEADS, slab.width, DIM)
        assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()
        for i, r in enumerate(expected):
            want = torch.tensor(r)[None, :, None].expand(HEADS, len(r), DIM) * (n + 1)
            assert torch.equal(layer.keys[i, :, slab.width - len(r):], want)
            assert torch.equal(layer.values[i, :, slab.width - len(r):], -want)
    for i, r in enumerate(expected):
        assert mask[i].tolist() == [0] * (slab.width - len(r)) + [1] * len(r)


@pytest.mark.parametrize("seed", range(6))
def test_random_joins_steps_moves_and_trims_keep_every_row_intact(seed: int,
                                                                  monkeypatch) -> None:
    monkeypatch.setattr(kv_slab, "MIN_SPARE", 2)  # regrow often
    rng = random.Random(seed)
    slab = KVSlab()
    expected: list[list[float]] = []
    counter = iter(range(1, 10**6))
    regrown = 0
    for _ in range(120):
        op = rng.choice(["put", "put", "step", "step", "step", "remove", "trim"])
        if not expected:
            op = "put"
        buffer = slab.mask.data_ptr() if slab.mask is not None else None
        if op == "put":
            rows = [[float(next(counter)) for _ in range(rng.randint(1, 12))]
                    for _ in range(rng.randint(1, 4))]
            replace = rng.sample(range(len(expected)),
                                 min(len(expected), len(rows), rng.randint(0, 2)))
            at = replace + list(range(len(expected), len(expected) + len(rows) - len(replace)))
            slab.put(at, *_source(rows))
            for i, r in zip(at, rows, strict=True):
                if i < len(expected):
                    expected[i] = r
                else:
                    expected.append(r)
        elif op == "step":
            mask = slab.step_mask()
            new = [float(next(counter)) for _ in expected]
            column = torch.tensor(new)[:, None, None, None].expand(len(new), HEADS, 1, DIM)
            for n, layer in enumerate(slab.layers):
                keys, values = layer.update(column * (n + 1), -column * (n + 1))
                assert keys.shape[2] == mask.shape[1] == slab.width + 1
            slab.advance()
            for r, v in zip(expected, new, strict=True):
                r.append(v)
        elif op == "remove":
            gone = rng.sample(range(len(expected)), rng.randint(1, len(expected)))
            moves = slab.remove(gone)
            for src, dst in moves:
                expected[dst] = expected[src]
            expected = expected[:len(expected) - len(gone)]
            if not expected:
                slab = KVSlab()
                continue
        else:
            slab.trim(max(len(r) for r in expected))
            assert slab.width == max(len(r) for r in expected)
        regrown += buffer is not None and slab.mask.data_ptr() != buffer
        _check(slab, expected)
    assert regrown >= 3


def test_a_step_writes_in_place_and_returns_what_a_dynamic_layer_returns() -> None:
    slab = KVSlab()
    keys, values, mask = _source([[1.0, 2.0], [3.0]])
    slab.put([0, 1], keys, values, mask)
    plain = DynamicLayer()
    plain.update(slab.layers[0].keys.clone(), slab.layers[0].values.clone())
    buffers = {slab.keys[0].data_ptr()}
    for step in range(5):
        slab.step_mask()
        assert slab.layers[0].get_mask_sizes(1) == plain.get_mask_sizes(1)  # what HF asks first
        k = torch.full((2, HEADS, 1, DIM), 10.0 + step)
        want, got = plain.update(k, -k), slab.layers[0].update(k, -k)
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
        slab.advance()
        assert slab.layers[0].get_seq_length() == plain.get_seq_length()
        buffers.add(slab.keys[0].data_ptr())
    assert len(buffers) == 1  # room reserved: no step reallocated


def test_joiners_take_the_places_of_finished_rows_and_match_static_batching(
        tiny_model_dirs) -> None:
    """A row that finished stays in the slab until a joiner takes its place; every row's
    output equals static batching's for it alone."""
    model_dir = tiny_model_dirs["llama"]
    model, tokenizer = load_base(model_dir), AutoTokenizer.from_pretrained(model_dir)

    def row(text: str, new: int) -> BatchRow:
        return BatchRow(tokenizer(text)["input_ids"], None,
                        SamplingParams(max_new_tokens=new, ignore_eos=True))

    first = [row("short", 2)] + [row(f"a longer prompt number {i}", 12) for i in range(7)]
    later = [row("a joiner whose prompt is longer than any running row's cache", 6),
             row("x", 9)]
    batch: RunningBatch[int] = RunningBatch(model, tokenizer)
    outputs = dict(batch.admit(list(enumerate(first))))
    outputs.update(batch.step())  # row 0 finishes: 1 of 8 retired, no compaction
    assert batch._running.retired == 1 and batch.rows == 8
    outputs.update(batch.admit([(8 + i, r) for i, r in enumerate(later)]))
    assert batch.rows == 9 and batch._running.retired == 0  # one joiner took row 0's place
    while len(batch):
        outputs.update(batch.step())
    rows = first + later
    for i, r in enumerate(rows):
        assert outputs[i].token_ids == run_batch(model, tokenizer, [r])[0].token_ids, i


def test_a_put_that_fails_leaves_the_rows_the_model_sees_as_they_were() -> None:
    """A failed admission (here a malformed source; out of memory in practice) must not
    corrupt the running rows: the scheduler goes on stepping them."""
    slab = KVSlab()
    rows = [[1.0, 2.0, 3.0], [4.0]]
    slab.put([0, 1], *_source(rows))
    keys, values, mask = _source([[9.0] * 8])  # wider: the others would get zeros in front
    bad = [k[:, :1] for k in keys]  # one head where the slab has two
    with pytest.raises(RuntimeError):
        slab.put([2], bad, values, mask)
    _check(slab, rows)
    slab.put([2], keys, values, mask)  # and it still takes rows
    _check(slab, rows + [[9.0] * 8])


@pytest.mark.parametrize("arch,seed", [("llama", 0), ("llama", 1), ("gpt2", 2), ("bloom", 3),
                                       ("qwen2", 4)])
def test_a_random_schedule_of_joins_parks_resumes_and_discards_matches_static_batching(
        arch: str, seed: int, tiny_model_dirs, monkeypatch) -> None:
    """What the scheduler does to a RunningBatch, in a random order, with the slab's spare room
    cut so that it regrows often: every row that is not discarded ends with the tokens static
    batching gives it alone."""
    monkeypatch.setattr(kv_slab, "MIN_SPARE", 2)
    model_dir = tiny_model_dirs[arch]
    model, tokenizer = load_base(model_dir), AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "in", "rain"]
    rows = [BatchRow(tokenizer(" ".join(rng.choices(words, k=rng.randint(1, 9))))["input_ids"],
                     None, SamplingParams(max_new_tokens=rng.randint(1, 14), ignore_eos=True))
            for _ in range(14)]
    batch: RunningBatch[int] = RunningBatch(model, tokenizer)
    pending = list(enumerate(rows))
    outputs: dict = {}
    discarded: set[int] = set()
    for _ in range(400):
        if not (pending or len(batch) or batch.parked):
            break
        op = rng.random()
        if pending and op < 0.3:
            take = rng.randint(1, 3)
            outputs.update(batch.admit(pending[:take]))
            pending = pending[take:]
        elif batch.handles and op < 0.4:
            batch.park(rng.sample(batch.handles, rng.randint(1, len(batch.handles))))
        elif batch.parked and op < 0.55:
            batch.resume(rng.sample(batch.parked, rng.randint(1, len(batch.parked))))
        elif batch.parked and op < 0.58:
            gone = rng.choice(batch.parked)
            batch.discard_parked([gone])
            discarded.add(gone)
        if not len(batch) and batch.parked and not pending:
            batch.resume(batch.parked)
        outputs.update(batch.step())
    assert not pending and not len(batch) and not batch.parked
    for i, row in enumerate(rows):
        if i not in discarded:
            assert outputs[i].token_ids == run_batch(model, tokenizer, [row])[0].token_ids, i
