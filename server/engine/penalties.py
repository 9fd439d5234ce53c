"""Presence, frequency and repetition penalties, per row, on the device.

OpenAI's presence and frequency penalties lower the logits of tokens the row has generated:
`presence` once for a token that occurred at all, `frequency` once per occurrence. The
repetition penalty (transformers' and vLLM's) scales the logit of every token of the prompt or
the output: a positive logit is divided by it, a negative one multiplied, so above 1 it
discourages repeats and below 1 it encourages them. Virtual ids (a soft prompt's rows) are not
tokens of the vocabulary and never count.

The engine core keeps each penalized row's counts in a device pool (PenaltyPool), written when
the row takes its slot and updated with each drawn token by one device op, so a step costs no
host work per token. Static batching computes the same counts from generate's ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.engine.interface import SamplingParams
from server.engine.uploads import upload


def has_penalties(params: SamplingParams) -> bool:
    return bool(params.presence_penalty or params.frequency_penalty
                or params.repetition_penalty != 1.0)


def penalty_tensors(params: Sequence[SamplingParams], device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(presence, frequency, repetition) [n] float32 of these rows."""
    values = upload([[p.presence_penalty, p.frequency_penalty, p.repetition_penalty]
                     for p in params], device, torch.float32)
    return values[:, 0], values[:, 1], values[:, 2]


def apply_penalties(scores: torch.Tensor, counts: torch.Tensor, in_prompt: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor,
                    repetition: torch.Tensor) -> torch.Tensor:
    """Penalized scores [n, vocab] (float32): `counts` [n, vocab] of generated tokens,
    `in_prompt` [n, vocab] bool, the penalties [n] each."""
    scores = scores.float()
    counts = counts.to(scores.dtype)
    generated = counts > 0
    seen = generated | in_prompt
    factor = repetition[:, None]
    scaled = torch.where(scores > 0, scores / factor, scores * factor)
    scores = torch.where(seen, scaled, scores)
    return scores - frequency[:, None] * counts - presence[:, None] * generated.to(scores.dtype)


class PenaltyPool:
    """Counts of the penalized rows, one pool row per KV slot that holds one, on the device.
    Allocated at the first penalized row and grown by doubling: a server whose requests never
    ask for penalties spends nothing."""

    def __init__(self, vocab: int, device: torch.device) -> None:
        self._vocab = vocab
        self._device = device
        self._row_of: dict[int, int] = {}  # slot -> pool row
        self._free: list[int] = []
        self.counts = torch.zeros(0, vocab, dtype=torch.int32, device=device)
        self.in_prompt = torch.zeros(0, vocab, dtype=torch.bool, device=device)

    def assign(self, slot: int, prompt: Sequence[int], generated: Sequence[int]) -> None:
        """A penalized row takes `slot`: its prompt's word ids and the ids it already drew
        (a preempted row that resumes)."""
        row = self._row_of.get(slot)
        if row is None:
            if not self._free:
                self._grow()
            row = self._row_of[slot] = self._free.pop()
        self.counts[row].zero_()
        self.in_prompt[row].zero_()
        words = [t for t in prompt if 0 <= t < self._vocab]
        if words:
            self.in_prompt[row, torch.tensor(words, dtype=torch.long, device=self._device)] = True
        if generated:
            ids = torch.tensor(list(generated), dtype=torch.long, device=self._device)
            self.counts[row].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))

    def release(self, slot: int) -> None:
        row = self._row_of.pop(slot, None)
        if row is not None:
            self._free.append(row)

    def rows(self, slots: Sequence[int]) -> torch.Tensor:
        return torch.tensor([self._row_of[s] for s in slots], dtype=torch.long,
                            device=self._device)

    def apply(self, scores: torch.Tensor, rows: torch.Tensor,
              params: Sequence[SamplingParams]) -> torch.Tensor:
        """These pool rows' penalties on their scores [n, vocab]."""
        return apply_penalties(scores, self.counts[rows], self.in_prompt[rows],
                               *penalty_tensors(params, scores.device))

    def record(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Each pool row drew its token (device tensors [n])."""
        self.counts.index_put_((rows, tokens.to(torch.long)),
                               torch.ones_like(rows, dtype=torch.int32), accumulate=True)

    def _grow(self) -> None:
        old = self.counts.shape[0]
        new = max(8, 2 * old)
        counts = torch.zeros(new, self._vocab, dtype=torch.int32, device=self._device)
        in_prompt = torch.zeros(new, self._vocab, dtype=torch.bool, device=self._device)
        counts[:old] = self.counts
        in_prompt[:old] = self.in_prompt
        self.counts, self.in_prompt = counts, in_prompt
        self._free.extend(range(new - 1, old - 1, -1))
