"""The step's draw for the rows that take a token, and the per-slot state it reads.

A row's sampling parameters and seed live in its KV slot's entries of persistent device
tensors (server.engine.core.device_sampling.SlotSampling), its penalty counts in a pool row
(server.engine.penalties), both assigned when it joins and dropped when it leaves; a step's
draw then gathers them by slot. What the host already knows picks the path: all greedy (the
usual case) is one argmax. A row short of its min_tokens has its eos and stop token ids
masked (server.engine.sampling.stop_ids_to_mask), in a copy of the logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.engine.core.device_sampling import SlotSampling
from server.engine.interface import SamplingParams
from server.engine.penalties import PenaltyPool
from server.engine.sampling import greedy, mask_ids, sample, stop_ids_to_mask
from server.engine.uploads import upload


class RowSampler:
    """Owned by the engine thread, beside the KV cache whose slots index it."""

    def __init__(self, slots: int, vocab: int, eos_ids: Sequence[int],
                 device: torch.device) -> None:
        self._device = device
        self._eos = sorted(eos_ids)
        self._slots = SlotSampling(slots, device)
        self._penalties = PenaltyPool(vocab, device)

    def join(self, slots: list[int], params: list[SamplingParams], seeds: list[int]) -> None:
        """Rows taking these slots: their parameters and seeds, by slot."""
        self._slots.assign(slots, params, seeds)

    def track(self, slot: int, prompt: Sequence[int], drawn: Sequence[int]) -> None:
        """A penalized row's token counts so far (its prompt, and what it already drew when
        it is recomputed)."""
        self._penalties.assign(slot, prompt, drawn)

    def untrack(self, slot: int) -> None:
        self._penalties.release(slot)

    def draw(self, logits: torch.Tensor, params: list[SamplingParams], slots: list[int],
             drawn: list[int], penalized: list[bool]) -> torch.Tensor:
        """Each row's next token [rows] on the device; `drawn`: how many tokens each row drew
        before (a seeded draw is indexed by token, not step). Penalized rows' logits are
        penalized first, in a copy: the raw logits are what logprobs report."""
        logits = mask_ids(logits, *stop_ids_to_mask(params, drawn, self._eos))
        which = [i for i, p in enumerate(penalized) if p]
        if not which:
            return self._choose(logits, params, slots, drawn)
        at = upload(which, self._device)
        pool_rows = self._penalties.rows([slots[i] for i in which])
        logits = logits.float().index_copy(0, at, self._penalties.apply(
            logits.index_select(0, at), pool_rows, [params[i] for i in which]))
        tokens = self._choose(logits, params, slots, drawn)
        self._penalties.record(pool_rows, tokens.index_select(0, at))
        return tokens

    def _choose(self, logits: torch.Tensor, params: list[SamplingParams], slots: list[int],
                drawn: list[int]) -> torch.Tensor:
        if all(p.temperature == 0 for p in params):
            return greedy(logits)
        index = upload([slots, drawn], self._device)
        return sample(logits, self._slots.batch(index[0], index[1]))
