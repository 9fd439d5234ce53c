"""Sampling on the device: the draws follow the distribution the parameters define, and a
row's draw depends only on its seed and its token index."""

from __future__ import annotations

import torch

from server.engine.core.device_sampling import SlotSampling
from server.engine.core.row_sampler import RowSampler
from server.engine.interface import SamplingParams
from server.engine.sampling import TENSOR_PARAMS, SamplingBatch, greedy, sample, uniforms

EOS = 2


def _batch(n: int, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           seeds: torch.Tensor | None = None,
           counters: torch.Tensor | None = None) -> SamplingBatch:
    return SamplingBatch(temperature=torch.full((n,), temperature), top_k=torch.full((n,), top_k),
                         top_p=torch.full((n,), top_p),
                         seeds=torch.arange(n) if seeds is None else seeds,
                         counters=(torch.zeros(n, dtype=torch.long) if counters is None
                                   else counters))


def test_uniforms_are_in_range_deterministic_and_spread():
    seeds = torch.arange(10_000)
    u = uniforms(seeds, torch.zeros_like(seeds))
    assert torch.equal(u, uniforms(seeds, torch.zeros_like(seeds)))
    assert float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert not torch.equal(u, uniforms(seeds, torch.ones_like(seeds)))  # the counter matters
    huge = torch.tensor([2**63 - 1, -(2**63)])  # any 64-bit seed
    assert torch.isfinite(uniforms(huge, torch.zeros(2, dtype=torch.long))).all()


def test_draws_follow_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20_000, 1)
    drawn = sample(logits, _batch(20_000, temperature=0.7))
    freq = torch.bincount(drawn, minlength=4).float() / 20_000
    expected = (logits[0] / 0.7).softmax(-1)
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)


def test_top_k_and_top_p_keep_only_the_best_tokens():
    logits = torch.tensor([[0.0, 3.0, 2.9, 1.0, 2.8]]).repeat(4000, 1)
    assert set(sample(logits, _batch(4000, top_k=2)).tolist()) == {1, 2}
    # p=0.5: token 1 (about 0.36) is not enough alone, 1 and 2 (about 0.69) are
    assert set(sample(logits, _batch(4000, top_p=0.5)).tolist()) == {1, 2}
    assert set(sample(logits, _batch(4000, top_k=1)).tolist()) == {1}  # greedy


def test_temperature_zero_rows_are_greedy_even_onto_eos():
    logits = torch.tensor([[0.0, 0.0, 5.0, 1.0]] * 3)
    assert sample(logits, _batch(3, temperature=0.0)).tolist() == [2, 2, 2]
    assert greedy(logits).tolist() == [2, 2, 2]


def test_min_tokens_masks_eos_and_stop_ids_only_before_it_and_only_in_its_row():
    sampler = RowSampler(slots=3, vocab=4, eos_ids=[EOS], device=torch.device("cpu"))
    logits = torch.tensor([[0.0, 4.0, 5.0, 1.0]] * 3)  # eos best, then the stop token 1
    raw = logits.clone()
    held = SamplingParams(min_tokens=2, stop_token_ids=(1,))
    params = [held, held, SamplingParams(stop_token_ids=(1,))]
    # Rows 0 and 1 drew 1 and 2 tokens: row 0 is short of its min_tokens, row 1 is not.
    drawn = sampler.draw(logits, params, [0, 1, 2], [1, 2, 0], [False] * 3)
    assert drawn.tolist() == [3, EOS, EOS]
    assert torch.equal(logits, raw)  # the raw logits (what logprobs read) are untouched
    seeded = SamplingParams(temperature=1.0, top_k=2, seed=3, min_tokens=1,
                            stop_token_ids=(1,))
    sampler.join([0], [seeded], [3])
    assert int(sampler.draw(logits[:1], [seeded], [0], [0], [False])[0]) in {0, 3}


def test_a_rows_draw_does_not_depend_on_its_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    seeds, counters = torch.tensor([5, 6, 7, 8, 9, 10]), torch.tensor([0, 3, 1, 4, 1, 9])
    together = sample(logits, _batch(6, seeds=seeds, counters=counters))
    for i in range(6):
        alone = sample(logits[i:i + 1], _batch(1, seeds=seeds[i:i + 1],
                                               counters=counters[i:i + 1]))
        assert int(alone) == int(together[i])


def test_slots_hold_each_rows_parameters_until_another_row_takes_the_slot():
    slots = SlotSampling(4, "cpu")
    off = slots.batch(torch.arange(4), torch.zeros(4, dtype=torch.long))
    for name, (_dtype, value) in TENSOR_PARAMS.items():
        assert getattr(off, name).tolist() == [value] * 4, name
    slots.assign([1, 3], [SamplingParams(temperature=0.5, top_k=7, top_p=0.9),
                          SamplingParams(temperature=1.5, top_k=2, top_p=0.5)], [10, 20])
    slots.assign([1], [SamplingParams(temperature=0.25, top_k=3, top_p=0.75)], [30])
    got = slots.batch(torch.tensor([3, 1, 0]), torch.tensor([5, 6, 7]))
    assert got.temperature.tolist() == [1.5, 0.25, 0.0]
    assert got.top_k.tolist() == [2, 3, 0]
    assert got.top_p.tolist() == [0.5, 0.75, 1.0]
    assert got.seeds.tolist() == [20, 30, 0]
    assert got.counters.tolist() == [5, 6, 7]
