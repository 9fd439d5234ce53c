"""Per-row logits processing, so rows with different sampling parameters share one `generate`.

`generate` accepts one GenerationConfig per call. We run it greedy and do every row's own
decision here: greedy rows keep their logits (generate's argmax picks the token); sampled rows
are sampled here, each from its own seeded generator, and their logits are replaced by a one-hot
(0 on the chosen token, -inf elsewhere) so the argmax picks exactly that token. A row's random
stream therefore never depends on its batch mates.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from server.engine.interface import SamplingParams

_SEED_MASK = (1 << 63) - 1


def validate_params(params: SamplingParams) -> None:
    """Reject values no processor could honour (the API validates first; this is the backstop)."""
    if params.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
    if params.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {params.top_k}")


class PerRowLogitsProcessor(LogitsProcessor):
    """Applies each row's ignore_eos, temperature, top-k, top-p and seeded sampling.

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
    ) -> None:
        self._finished = finished
        ignore = [i for i, p in enumerate(params) if p.ignore_eos]
        self._ignore_eos_rows = torch.tensor(ignore, dtype=torch.long, device=device)
        self._eos_ids = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
        self._mask_eos = bool(ignore) and self._eos_ids.numel() > 0

        self._sampled = [i for i, p in enumerate(params) if p.temperature > 0]
        sp = [params[i] for i in self._sampled]
        self._temperature = torch.tensor([p.temperature for p in sp], dtype=torch.float32,
                                         device=device)  # [num_sampled]
        self._top_k = torch.tensor([p.top_k for p in sp], dtype=torch.long,
                                   device=device)  # [num_sampled], 0 = off
        # top_p == 1 means "off"; an infinite threshold avoids dropping tail tokens whose
        # preceding cumulative mass merely rounds to 1.0.
        self._top_p = torch.tensor([p.top_p if p.top_p < 1 else float("inf") for p in sp],
                                   dtype=torch.float32, device=device)  # [num_sampled]
        self._generators = [
            torch.Generator(device="cpu").manual_seed(
                (p.seed if p.seed is not None else secrets.randbits(63)) & _SEED_MASK
            )
            for p in sp
        ]
        self._device = device

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # scores: [batch, vocab], float32 (generate upcasts); modified in place, it is a copy.
        scores = scores.float()
        if self._mask_eos:
            scores[self._ignore_eos_rows[:, None], self._eos_ids[None, :]] = float("-inf")
        active = [j for j, row in enumerate(self._sampled) if not self._finished[row]]
        if active:
            self._sample_into(scores, active)
        return scores

    def _sample_into(self, scores: torch.Tensor, active: list[int]) -> None:
        """Sample one token for each active sampled row; make its logits a one-hot on it."""
        rows = torch.tensor([self._sampled[j] for j in active], dtype=torch.long,
                            device=scores.device)  # [n]
        sel = torch.tensor(active, dtype=torch.long, device=scores.device)  # [n]
        vocab = scores.shape[-1]
        logits = scores.index_select(0, rows) / self._temperature[sel, None]  # [n, vocab]
        sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True)  # [n, vocab]

        ranks = torch.arange(vocab, device=scores.device)  # [vocab]
        k = self._top_k[sel]
        k = torch.where(k > 0, k, vocab)  # [n]
        sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= k[:, None], float("-inf"))

        probs = torch.softmax(sorted_logits, dim=-1)  # [n, vocab]
        mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly better tokens
        # The best token always survives (mass_before == 0 < top_p).
        probs = probs.masked_fill(mass_before >= self._top_p[sel, None], 0.0)

        # Inverse-CDF sampling with one uniform draw per row from the row's own generator.
        cdf = torch.cumsum(probs, dim=-1)  # [n, vocab], unnormalized
        uniforms = torch.cat([torch.rand(1, generator=self._generators[j]) for j in active])
        u = uniforms.to(scores.device)[:, None] * cdf[:, -1:]  # [n, 1]
        pos = torch.searchsorted(cdf, u, right=True)  # [n, 1]
        kept = (probs > 0).sum(dim=-1, keepdim=True)  # survivors form a prefix of the ranks
        pos = torch.minimum(pos, (kept - 1).clamp(min=0))
        chosen = sorted_ids.gather(1, pos).squeeze(1)  # [n]

        scores.index_fill_(0, rows, float("-inf"))
        scores[rows, chosen] = 0.0
