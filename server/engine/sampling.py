"""Per-row token choice, so rows with different sampling parameters share one model batch.

Greedy rows take the argmax of their logits; sampled rows are sampled here, each from its own
seeded generator (RowSampler), so a row's random stream never depends on its batch mates.
This is static batching's sampling (the engine core samples on the device, server.engine.core.
device_sampling): static batching runs `generate`, which accepts one GenerationConfig per call:
it runs greedy, and PerRowLogitsProcessor replaces a sampled row's logits by a one-hot (0 on
the chosen token, -inf elsewhere) so generate's argmax picks exactly that token.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Sequence

import torch
from transformers import LogitsProcessor

from server.engine.interface import SamplingParams
from server.engine.sampling_limits import MAX_LOGPROBS, MAX_PENALTY, MAX_REPETITION_PENALTY

log = logging.getLogger(__name__)

_SEED_MASK = (1 << 63) - 1


# What the engine can represent: counts go into int64 tensors, seeds into 64-bit generators.
_MAX_INT = 2**31 - 1
_MAX_SEED = 2**63 - 1


def validate_params(params: SamplingParams, *, vocab_size: int = 0) -> None:
    """Reject values no processor could honour (the API validates first; this is the backstop
    that keeps one request's parameters from ever reaching a batch it would fail)."""
    if not 1 <= params.max_new_tokens <= _MAX_INT:
        raise ValueError(f"max_new_tokens must be in [1, {_MAX_INT}], got "
                         f"{params.max_new_tokens}")
    if not (math.isfinite(params.temperature) and params.temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0, got {params.temperature}")
    if not (math.isfinite(params.top_p) and 0 < params.top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    top_k_max = vocab_size or _MAX_INT
    if not 0 <= params.top_k <= top_k_max:
        raise ValueError(f"top_k must be in [0, {top_k_max}], got {params.top_k}")
    if params.seed is not None and not 0 <= params.seed <= _MAX_SEED:
        raise ValueError(f"seed must be in [0, {_MAX_SEED}], got {params.seed}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        if not (math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
            raise ValueError(f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {value}")
    if not (math.isfinite(params.repetition_penalty)
            and 0 < params.repetition_penalty <= MAX_REPETITION_PENALTY):
        raise ValueError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY}], got "
                         f"{params.repetition_penalty}")
    if not 0 <= params.min_tokens <= _MAX_INT:
        raise ValueError(f"min_tokens must be in [0, {_MAX_INT}], got {params.min_tokens}")
    id_max = vocab_size or _MAX_INT
    if any(not 0 <= t < id_max for t in params.stop_token_ids):
        raise ValueError(f"stop_token_ids must be in [0, {id_max}), got "
                         f"{list(params.stop_token_ids)}")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and not 0 <= value <= MAX_LOGPROBS:
            raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")


class RowSampler:
    """One row's sampling state: its parameters and, for a sampled row, its own generator.

    A row's random stream depends only on its seed: one uniform draw per step from its own
    generator, whatever batch it shares and whichever batching mode runs it.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device="cpu").manual_seed(seed & _SEED_MASK)


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


def sample_rows(scores: torch.Tensor, samplers: Sequence[RowSampler]) -> torch.Tensor:
    """One token per row of `scores` [n, vocab] (float32) from its sampler; returns ids [n].

    Every sampler must be a sampled one (temperature > 0).
    """
    return _sample_with(scores, [s.params for s in samplers], _draw(samplers, scores.device))


def sample_rows_isolated(scores: torch.Tensor, samplers: Sequence[RowSampler]
                         ) -> tuple[torch.Tensor, dict[int, Exception]]:
    """sample_rows, except that a row whose sampling raises fails alone: the others are
    sampled again one by one, from the same uniform draws (so their seeded streams do not
    move), and the failures come back by row index. A failed row's token is a placeholder."""
    u = _draw(samplers, scores.device)  # [n]: drawn once, whatever happens next
    params = [s.params for s in samplers]
    try:
        return _sample_with(scores, params, u), {}
    except Exception as batch_error:  # noqa: BLE001 - find the rows that cause it
        log.warning("sampling %d rows failed (%s); sampling them one by one", len(params),
                    type(batch_error).__name__)
    tokens = scores.argmax(dim=-1)  # [n]
    failed: dict[int, Exception] = {}
    for i, p in enumerate(params):
        try:
            tokens[i] = _sample_with(scores[i:i + 1], [p], u[i:i + 1])[0]
        except Exception as e:  # noqa: BLE001 - reported to this row's request only
            failed[i] = e
    return tokens, failed


def _draw(samplers: Sequence[RowSampler], device: torch.device) -> torch.Tensor:
    """One uniform draw per row per step from the row's own generator, whatever its path."""
    return torch.cat([torch.rand(1, generator=s.generator) for s in samplers]).to(device)


def _sample_with(scores: torch.Tensor, params: Sequence[SamplingParams],
                 u: torch.Tensor) -> torch.Tensor:
    device = scores.device
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32,
                               device=device)  # [n]
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)  # 0 = off
    # top_p == 1 means "off"; an infinite threshold avoids dropping tail tokens whose
    # preceding cumulative mass merely rounds to 1.0.
    top_p = torch.tensor([p.top_p if p.top_p < 1 else float("inf") for p in params],
                         dtype=torch.float32, device=device)  # [n]
    logits = scores / temperature[:, None]  # [n, vocab]

    chosen = torch.empty(len(params), dtype=torch.long, device=device)  # [n]
    whole = (top_k == 0) & torch.isinf(top_p)  # plain temperature sampling: no sorting
    if whole.any():
        chosen[whole] = _sample_whole_vocab(logits[whole], u[whole])
    ranked = ~whole
    if ranked.any():
        chosen[ranked] = _sample_ranked(logits[ranked], top_k[ranked], top_p[ranked],
                                        u[ranked])
    return chosen


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
        self._sampled = [(i, RowSampler(p)) for i, p in enumerate(params) if p.temperature > 0]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # scores: [batch, vocab], float32 (generate upcasts); modified in place, it is a copy.
        scores = scores.float()
        rows, ids = stop_ids_to_mask(self._params, [self._step] * len(self._params),
                                     self._eos_ids)
        scores = mask_ids(scores, rows, ids)
        self._step += 1
        active = [(i, s) for i, s in self._sampled if not self._finished[i]]
        if active:
            rows = torch.tensor([i for i, _ in active], dtype=torch.long,
                                device=scores.device)  # [n]
            chosen, failed = sample_rows_isolated(scores.index_select(0, rows),
                                                  [s for _, s in active])
            for j, error in failed.items():
                if self._on_error is not None:
                    self._on_error(active[j][0], error)
            # A one-hot (0 on the chosen token, -inf elsewhere): generate's argmax takes it.
            scores.index_fill_(0, rows, float("-inf"))
            scores[rows, chosen] = 0.0
        return scores


# Top-p rows first look among this many best tokens; that is exact whenever their mass reaches
# top_p (nearly always), and avoids sorting the whole vocabulary every step.
_NUCLEUS_CANDIDATES = 1024


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn from unnormalized `probs` [n, width] with uniforms u [n] in [0, 1)."""
    cdf = torch.cumsum(probs, dim=-1)  # [n, width]
    pos = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)  # [n, 1]
    # Guard against u * total rounding up to total: stay on the last token with mass.
    width = probs.shape[-1]
    last = width - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(dim=-1, keepdim=True)
    return torch.minimum(pos, last).squeeze(1)  # [n]


def _sample_whole_vocab(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Temperature-only rows: sample from the full softmax, in vocabulary order."""
    return _inverse_cdf(torch.softmax(logits, dim=-1), u)


def _sample_ranked(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                   u: torch.Tensor) -> torch.Tensor:
    """Rows with top-k and/or top-p: keep the best tokens, then sample among them.

    logits [n, vocab]; top_k [n] (0 = off); top_p [n] (inf = off). Top-k comes first and
    top-p is taken over the top-k distribution, as transformers' warpers do.
    """
    vocab = logits.shape[-1]
    width = torch.where(top_k > 0, top_k.clamp(max=vocab),
                        min(_NUCLEUS_CANDIDATES, vocab))  # [n]
    return _sample_among_best(logits, width, top_k > 0, top_p, u)


def _sample_among_best(logits: torch.Tensor, width: torch.Tensor, has_top_k: torch.Tensor,
                       top_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[-1]
    values, ids = torch.topk(logits, int(width.max()), dim=-1)  # [n, w], best first
    ranks = torch.arange(values.shape[-1], device=logits.device)
    values = values.masked_fill(ranks[None, :] >= width[:, None], float("-inf"))
    # Top-k rows renormalize over their k tokens; top-p-only rows use the full vocabulary.
    log_norm = torch.where(has_top_k, torch.logsumexp(values, dim=-1),
                           torch.logsumexp(logits, dim=-1))  # [n]
    probs = torch.exp(values - log_norm[:, None])  # [n, w]

    # A top-p-only row whose candidates hold less than top_p of the mass needs the whole
    # vocabulary ranked: redo just those rows (rare outside random models).
    short = ~has_top_k & (width < vocab) & (probs.sum(dim=-1) < top_p)
    chosen = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    if short.any():
        chosen[short] = _sample_among_best(
            logits[short], torch.full_like(width[short], vocab), has_top_k[short],
            top_p[short], u[short])
    keep = ~short
    probs, ids = probs[keep], ids[keep]
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly better tokens
    # The best token always survives (mass_before == 0 < top_p).
    probs = probs.masked_fill(mass_before >= top_p[keep, None], 0.0)
    chosen[keep] = ids.gather(1, _inverse_cdf(probs, u[keep])[:, None]).squeeze(1)
    return chosen
