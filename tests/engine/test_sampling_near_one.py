"""A uniform draw at the very top of [0, 1) still picks a token the row's top-k and top-p
keep: a float64 draw rounds to 1.0 in float32, and a draw times the kept mass can round up
to that mass, so the sampler must keep its pick inside the kept tokens, in the engine core and
in static batching alike. The seeded draw is driven to exactly 1 - 2**-53 by a seed found by
inverting SplitMix64."""

from __future__ import annotations

import pytest
import torch

from server.engine.core.row_sampler import RowSampler
from server.engine.interface import SamplingParams
from server.engine.sampling import (
    _GOLDEN,
    _MIX1,
    _MIX2,
    PerRowLogitsProcessor,
    SamplingBatch,
    sample,
    uniforms,
)

_WORD = 1 << 64
LARGEST_BELOW_ONE = 1 - 2**-53  # float64; float32's nearest to it is 1.0
EOS = 4
# Best first: 1, 2, 3, 0, then the eos id (worst); top-k 2 and top-p 0.5 keep {1, 2}.
LOGITS = [0.0, 3.0, 2.9, 1.0, -1.0]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


def _unxorshift(x: int, shift: int) -> int:
    """The inverse of x ^ (x >> shift) on 64 bits."""
    y = x
    for _ in range(64 // shift + 1):
        y = x ^ (y >> shift)
    return y


def _seed_drawing_the_top(counter: int = 0) -> int:
    """A seed (in the API's range) whose draw at `counter` is the largest float64 below 1:
    SplitMix64 run backwards from an output whose top 53 bits are all ones."""
    for low in range(1 << 11):  # the 11 bits the draw drops are free
        z = _unxorshift((((1 << 53) - 1) << 11) | low, 31)
        z = _unxorshift(z * pow(_MIX2 % _WORD, -1, _WORD) % _WORD, 27)
        z = _unxorshift(z * pow(_MIX1 % _WORD, -1, _WORD) % _WORD, 30)
        seed = (z * pow(_GOLDEN % _WORD, -1, _WORD) - counter - 1) % _WORD
        if seed < 1 << 63:
            return seed
    raise AssertionError("no seed in range")


SEED = _seed_drawing_the_top()


def test_the_seed_draws_the_largest_float64_below_one():
    u = uniforms(torch.tensor([SEED]), torch.tensor([0]))
    assert float(u) == LARGEST_BELOW_ONE
    assert float(u.float()) == 1.0  # the rounding the samplers must survive


def _batch(device: str, *, top_k: int = 0, top_p: float = 1.0) -> SamplingBatch:
    def full(value, dtype):
        return torch.tensor([value], dtype=dtype, device=device)

    return SamplingBatch(temperature=full(1.0, torch.float32), top_k=full(top_k, torch.long),
                         top_p=full(top_p, torch.float32), seeds=full(SEED, torch.long),
                         counters=full(0, torch.long))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("params", "allowed"), [
    ({"top_k": 2}, {1, 2}),
    ({"top_p": 0.5}, {1, 2}),
    ({"top_k": 3, "top_p": 0.9}, {1, 2, 3}),
    ({}, {0, 1, 2, 3}),  # temperature alone: anything but the masked eos
])
def test_a_device_draw_at_the_top_stays_inside_the_kept_tokens(device, params, allowed):
    logits = torch.tensor([LOGITS], device=device)
    logits[0, EOS] = float("-inf")  # as min_tokens masks it
    drawn = int(sample(logits, _batch(device, **params))[0])
    assert drawn in allowed


@pytest.mark.parametrize("device", DEVICES)
def test_the_engine_cores_sampler_keeps_a_seeded_row_in_its_top_k(device):
    sampler = RowSampler(slots=2, vocab=len(LOGITS), eos_ids=[EOS], device=torch.device(device))
    params = SamplingParams(temperature=1.0, top_k=2, seed=SEED)
    sampler.join([1], [params], [SEED])
    logits = torch.tensor([LOGITS], device=device)
    assert int(sampler.draw(logits, [params], [1], [0], [False])[0]) in {1, 2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("params", "allowed"), [
    ({"top_k": 2}, {1, 2}),
    ({"top_p": 0.5}, {1, 2}),
    ({"min_tokens": 1}, {0, 1, 2, 3}),  # the whole vocabulary, the eos masked by min_tokens
])
def test_static_batchings_processor_keeps_a_seeded_row_in_its_kept_tokens(device, params,
                                                                          allowed):
    """The same draw at the top through generate's logits processor: its one-hot is on a kept
    token."""
    processor = PerRowLogitsProcessor([SamplingParams(temperature=1.0, seed=SEED, **params)],
                                      eos_ids=[EOS], finished=[False],
                                      device=torch.device(device))
    out = processor(None, torch.tensor([LOGITS], device=device))
    assert int(out[0].argmax()) in allowed and float(out[0].max()) == 0.0
