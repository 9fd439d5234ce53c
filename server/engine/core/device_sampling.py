"""Sampling for a whole step on the device: greedy, temperature, top-k, top-p, per-row seeds.

Every row's randomness is a pure function of (its seed, the index of the token it draws): a
counter-based generator (SplitMix64) evaluated with integer tensor ops, so a seeded row draws
the same tokens whatever else shares the step, whatever order rows are in, and after being
preempted and recomputed. There are no per-row generator objects and no host round trip; the
whole step is one batch of tensor ops of fixed shape, which a captured graph can replay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.engine.interface import SamplingParams

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """[n] float64 in [0, 1): SplitMix64 of seed and counter, the top 53 bits. In float32 the
    top of the range rounds to 1.0: a caller comparing in float32 must keep it below 1."""
    z = seeds * _GOLDEN + (counters + 1) * _GOLDEN  # wraps modulo 2**64
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 11).to(torch.float64) * (1.0 / (1 << 53))


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of a step, as device tensors ([rows] each).

    temperature 0 means greedy; top_k 0 and top_p 1 mean off."""

    temperature: torch.Tensor  # float32
    top_k: torch.Tensor  # long
    top_p: torch.Tensor  # float32
    seeds: torch.Tensor  # long
    counters: torch.Tensor  # long: tokens the row has drawn so far


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The next token of each row [rows] from its logits [rows, vocab] (float32 internally).

    Semantics as Hugging Face's warpers: temperature divides the logits, top-k keeps the k
    best, top-p keeps the smallest set of best tokens whose probability reaches p (at least
    one); the draw is inverse-CDF on the kept, renormalised distribution."""
    scores = logits.float()
    greedy = scores.argmax(dim=-1)
    hot = batch.temperature > 0
    scaled = scores / torch.where(hot, batch.temperature, 1.0)[:, None]
    ordered, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(scores.shape[-1], device=scores.device)[None, :]
    k = torch.where(batch.top_k > 0, batch.top_k, scores.shape[-1])[:, None]
    ordered = ordered.masked_fill(rank >= k, float("-inf"))
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the better tokens
    keep = (before < batch.top_p[:, None]) | (rank == 0)
    probs = probs * keep
    cdf = probs.cumsum(dim=-1)
    # A float64 draw within 2**-25 of 1 rounds to 1.0 in float32, and a draw of 1 times the
    # kept mass is the mass, past every kept token: the draw stays below 1 in cdf's dtype
    # (then, rounding to nearest, the product stays below the mass), and the pick stays on
    # the last token with mass whatever the rounding.
    below_one = 1.0 - torch.finfo(cdf.dtype).eps / 2
    u = uniforms(batch.seeds, batch.counters).to(cdf.dtype).clamp(max=below_one) * cdf[:, -1]
    last = torch.where(probs > 0, rank, 0).amax(dim=-1, keepdim=True)  # [rows, 1]
    pick = torch.minimum(torch.searchsorted(cdf, u[:, None], right=True), last)
    drawn = order.gather(-1, pick)[:, 0]
    return torch.where(hot, drawn, greedy)


class SlotSampling:
    """Each KV slot's sampling parameters, resident on the device: written once when a row
    takes the slot, gathered by slot index at each step, so a step sends only the rows' slots
    and draw counters to the device."""

    def __init__(self, slots: int, device: torch.device | str) -> None:
        self.temperature = torch.zeros(slots, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(slots, dtype=torch.long, device=device)
        self.top_p = torch.ones(slots, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(slots, dtype=torch.long, device=device)

    def assign(self, slots: Sequence[int], params: Sequence[SamplingParams],
               seeds: Sequence[int]) -> None:
        """Rows taking these slots (one copy to the device per kind of parameter)."""
        if not slots:
            return
        device = self.seeds.device
        at = torch.tensor(list(slots), dtype=torch.long, device=device)
        self.temperature[at] = torch.tensor([p.temperature for p in params],
                                            dtype=torch.float32, device=device)
        self.top_k[at] = torch.tensor([p.top_k for p in params], dtype=torch.long,
                                      device=device)
        self.top_p[at] = torch.tensor([p.top_p for p in params], dtype=torch.float32,
                                      device=device)
        self.seeds[at] = torch.tensor(list(seeds), dtype=torch.long, device=device)

    def batch(self, slots: torch.Tensor, counters: torch.Tensor) -> SamplingBatch:
        """The parameters of the rows in these slots ([rows] long each)."""
        return SamplingBatch(temperature=self.temperature[slots], top_k=self.top_k[slots],
                             top_p=self.top_p[slots], seeds=self.seeds[slots],
                             counters=counters)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Every row's argmax [rows] (float32 comparison)."""
    return logits.float().argmax(dim=-1)
