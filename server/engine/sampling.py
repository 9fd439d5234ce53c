"""The one sampler: per-row token choice, so rows with different sampling parameters share one
model batch, for both runners.

Greedy, temperature, top-k, top-p and per-row seeds in one batch of tensor ops of fixed shape
(a captured graph can replay it). Every row's randomness is a pure function of (its seed, the
index of the token it draws): a counter-based generator (SplitMix64) evaluated with integer
tensor ops, so a seeded row draws the same tokens whatever else shares the step, whatever order
rows are in, after being preempted and recomputed, and whichever runner runs it: the engine
core (server.engine.core.row_sampler, parameters resident per KV slot) or static batching.
Static batching runs `generate`, which accepts one GenerationConfig per call: it runs greedy,
and PerRowLogitsProcessor replaces a sampled row's logits by a one-hot (0 on the token this
sampler chose, -inf elsewhere) so generate's argmax picks exactly that token.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from server.engine.interface import SamplingParams

log = logging.getLogger(__name__)

def stop_ids_to_mask(params: Sequence[SamplingParams], drawn: Sequence[int],
                     eos_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """(rows, ids) to mask this step: the eos and stop token ids of each row that has drawn
    fewer than its min_tokens tokens (`drawn[i]` so far), so nothing ends it sooner."""
    rows: list[int] = []
    ids: list[int] = []
    for i, (p, n) in enumerate(zip(params, drawn, strict=True)):
        if n < p.min_tokens:
            banned = sorted({*eos_ids, *p.stop_token_ids})
            rows += [i] * len(banned)
            ids += banned
    return rows, ids


def mask_ids(scores: torch.Tensor, rows: Sequence[int], ids: Sequence[int]) -> torch.Tensor:
    """`scores` [batch, vocab] with -inf at each (rows[j], ids[j]): a copy when any, so the
    raw logits stay what logprobs report."""
    if not rows:
        return scores
    scores = scores.clone()
    at = torch.tensor([list(rows), list(ids)], dtype=torch.long, device=scores.device)
    scores[at[0], at[1]] = float("-inf")
    return scores


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


# The per-row parameters `sample` reads, as tensors: name -> (dtype, the value that is off).
# The engine core's per-slot tensors (core.device_sampling.SlotSampling) and static batching
# (batch_of) are built from this table, so a new parameter is a field of SamplingParams, an
# entry here, a field of SamplingBatch and its use in `sample`.
TENSOR_PARAMS: dict[str, tuple[torch.dtype, float]] = {
    "temperature": (torch.float32, 0.0),  # 0: greedy
    "top_k": (torch.long, 0),  # 0: off
    "top_p": (torch.float32, 1.0),  # 1: off
}


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of a step, as device tensors ([rows] each): one field per
    TENSOR_PARAMS entry, and each row's seed and draw counter."""

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
    # top_p 1 is off: tail tokens whose preceding mass merely rounds to 1 in float32 stay.
    keep = (before < batch.top_p[:, None]) | (rank == 0) | (batch.top_p[:, None] >= 1)
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


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Every row's argmax [rows] (float32 comparison)."""
    return logits.float().argmax(dim=-1)


def seed_of(params: SamplingParams) -> int:
    """The row's seed: its own, or a fresh random one (an unseeded row still draws from a
    stream of its own)."""
    return params.seed if params.seed is not None else secrets.randbits(63)


def param_tensors(params: Sequence[SamplingParams], device: torch.device | str
                  ) -> dict[str, torch.Tensor]:
    """The rows' TENSOR_PARAMS as tensors on `device` ([rows] each), keyed as SamplingBatch's
    fields."""
    return {name: torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=device)
            for name, (dtype, _off) in TENSOR_PARAMS.items()}


def batch_of(params: Sequence[SamplingParams], seeds: Sequence[int], counters: Sequence[int],
             device: torch.device) -> SamplingBatch:
    """The rows' parameters as one SamplingBatch on `device`."""
    return SamplingBatch(
        **param_tensors(params, device),
        seeds=torch.tensor(list(seeds), dtype=torch.long, device=device),
        counters=torch.tensor(list(counters), dtype=torch.long, device=device))


class PerRowLogitsProcessor(LogitsProcessor):
    """Applies each row's min_tokens, temperature, top-k, top-p and seeded sampling.

    `finished` is shared with the stopping criteria (same row order): rows already finished
    are skipped, so a finished row costs nothing here while generate pads the batch.
    Per step the Python work is proportional to the number of sampled rows, never the vocab.
    """

    def __init__(
        self,
        params: Sequence[SamplingParams],
        *,
        eos_ids: Sequence[int],
        finished: list[bool],
        device: torch.device,
        on_error: Callable[[int, Exception], None] | None = None,
    ) -> None:
        self._finished = finished
        self._on_error = on_error  # a row whose sampling failed: (row index, error)
        self._params = list(params)
        self._eos_ids = sorted(set(eos_ids))
        self._step = 0  # tokens each row has drawn: generate draws one per row per call
        self._sampled = [(i, p, seed_of(p)) for i, p in enumerate(params) if p.temperature > 0]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # scores: [batch, vocab], float32 (generate upcasts); modified in place, it is a copy.
        scores = scores.float()
        rows, ids = stop_ids_to_mask(self._params, [self._step] * len(self._params),
                                     self._eos_ids)
        scores = mask_ids(scores, rows, ids)
        drawn = self._step
        self._step += 1
        active = [(i, p, seed) for i, p, seed in self._sampled if not self._finished[i]]
        if active:
            rows = torch.tensor([i for i, _, _ in active], dtype=torch.long,
                                device=scores.device)  # [n]
            chosen = self._choose(scores.index_select(0, rows), active, drawn)
            # A one-hot (0 on the chosen token, -inf elsewhere): generate's argmax takes it.
            scores.index_fill_(0, rows, float("-inf"))
            scores[rows, chosen] = 0.0
        return scores

    def _choose(self, scores: torch.Tensor, active: list[tuple[int, SamplingParams, int]],
                drawn: int) -> torch.Tensor:
        """One draw per active row; a row whose sampling raises fails alone (reported through
        on_error, its token a placeholder): its batch mates' draws depend on their own seeds
        and counters only, so sampling them one by one gives the same tokens."""
        def draw(at: slice) -> torch.Tensor:
            part = active[at]
            return sample(scores[at], batch_of([p for _, p, _ in part], [s for _, _, s in part],
                                               [drawn] * len(part), scores.device))
        try:
            return draw(slice(None))
        except Exception as batch_error:  # noqa: BLE001 - find the rows that cause it
            log.warning("sampling %d rows failed (%s); sampling them one by one", len(active),
                        type(batch_error).__name__)
        chosen = scores.argmax(dim=-1)
        for j, (i, _, _) in enumerate(active):
            try:
                chosen[j] = draw(slice(j, j + 1))[0]
            except Exception as e:  # noqa: BLE001 - reported to this row's request only
                if self._on_error is not None:
                    self._on_error(i, e)
        return chosen
