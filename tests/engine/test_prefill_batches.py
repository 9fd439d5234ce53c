"""Prefill runs batched for attention: which runs share a batch, and what each query sees."""

from __future__ import annotations

import torch

from server.engine.core.prefill_batches import Prefill, prefill_batches

MAX_LEN = 1000


def test_similar_runs_share_a_batch_and_a_long_chunk_runs_alone():
    short = [Prefill(start=10 * i, count=10, slot=i, position=0) for i in range(6)]
    long = Prefill(start=60, count=300, slot=7, position=500)  # a later chunk of a long prompt
    batches = prefill_batches([long, *short], MAX_LEN, "cpu")
    assert [(b.runs, b.queries, b.width) for b in batches] == [(6, 10, 10), (1, 300, 800)]


def test_each_query_sees_its_own_row_up_to_its_position_and_nothing_else():
    runs = [Prefill(start=0, count=3, slot=2, position=4),  # a chunk after 4 computed positions
            Prefill(start=3, count=5, slot=0, position=0)]
    (batch,) = prefill_batches(runs, MAX_LEN, "cpu")
    assert (batch.runs, batch.queries, batch.width) == (2, 5, 7)
    mask = batch.mask[:, 0]
    for k, run in enumerate(sorted(runs, key=lambda r: r.end)):
        for c in range(batch.queries):
            if c < run.count:
                assert batch.tokens[k, c] == run.start + c
                assert mask[k, c].tolist() == [e <= run.position + c for e in range(7)]
            else:  # padding: one key, so the softmax stays finite; its output is dropped
                assert mask[k, c].tolist() == [e == 0 for e in range(7)]
        for e in range(run.end):
            assert batch.keys[k, e] == run.slot * MAX_LEN + e
    # Every real query lands once, at its own token.
    assert sorted(batch.into.tolist()) == list(range(8))
    flat = batch.tokens.view(-1)
    assert flat[batch.valid].tolist() == batch.into.tolist()


def test_the_attention_mask_is_additive_and_repeats_per_query_head_of_a_kv_head():
    (batch,) = prefill_batches([Prefill(0, 4, 0, 0)], MAX_LEN, "cpu")
    folded = batch.attn_mask(3, torch.bfloat16)
    assert folded.shape == (1, 1, 12, 4) and folded.dtype == torch.bfloat16
    assert torch.equal(folded[0, 0, 8:] == 0, batch.mask[0, 0])  # 0 where seen, -inf elsewhere
    assert torch.isinf(folded[0, 0, 0, 1:]).all()
    assert batch.attn_mask(3, torch.bfloat16) is folded  # built once per step, for every layer
