"""A step's prefill runs, attended a few batches at a time instead of one run at a time.

A step can hold prefill chunks of dozens of rows (a burst of requests joining). Attending each
run alone costs a handful of kernel launches per run per layer, so on a GPU a step of 24
short prompts spends more time launching than computing. Runs are instead padded into batches
(R runs, C queries, E keys each): one gather of queries, keys and values, one attention call,
one scatter back, per batch per layer. Padding wastes work when runs differ in size, so runs
are taken in order of length and a batch is closed when its padded size would pass twice its
exact size (plus a little slack for tiny runs): similar prompts share one batch, and a long
prompt's chunk runs alone rather than padding many short ones to its length.

Everything a layer needs is built once per step, here: the query and key indices, the mask
(query c of a run sees the run's keys up to its own position; a padding query sees key 0 only,
so its softmax stays finite, and its output is dropped) and where the real queries' outputs go.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from server.engine.uploads import upload

SLACK = 1 << 16  # padded query-key pairs a batch may waste regardless of its size


@dataclass(frozen=True)
class Prefill:
    """A run of one row's consecutive tokens in this step: tokens [start, start + count) of
    the step, at positions [position, position + count) of the row."""

    start: int
    count: int
    slot: int
    position: int

    @property
    def end(self) -> int:
        return self.position + self.count


@dataclass
class PrefillBatch:
    """R runs padded to C queries and E keys each.

    tokens: [R, C] the step's token index of each query (padding: 0);
    keys: [R, E] the cache index of each key (padding: 0);
    mask: [R, 1, C, E] what each query sees;
    valid: [n] the real queries' places in R × C; into: [n] their step token indices."""

    runs: int
    queries: int
    width: int
    tokens: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor
    valid: torch.Tensor
    into: torch.Tensor
    _masks: dict[tuple[int, torch.dtype], torch.Tensor] = field(default_factory=dict)

    def attn_mask(self, fold: int, dtype: torch.dtype) -> torch.Tensor:
        """The mask as the attention takes it: additive (0 or -inf) in `dtype`, so no layer
        converts it again, repeated `fold` times along the queries for query heads stacked as
        more queries: [R, 1, fold × C, E]. Built once per step, for every layer."""
        key = (fold, dtype)
        if key not in self._masks:
            sees = self.mask.repeat(1, 1, fold, 1) if fold > 1 else self.mask
            self._masks[key] = torch.zeros(sees.shape, dtype=dtype,
                                           device=sees.device).masked_fill_(~sees, float("-inf"))
        return self._masks[key]


def prefill_batches(runs: Sequence[Prefill], max_len: int,
                    device: torch.device | str) -> tuple[PrefillBatch, ...]:
    """The step's runs in batches of similar size (see the module's docstring)."""
    batches: list[list[Prefill]] = []
    current: list[Prefill] = []
    for run in sorted(runs, key=lambda r: (r.end, r.count)):
        trial = [*current, run]
        if current and _padded(trial) > 2 * _exact(trial) + SLACK:
            batches.append(current)
            trial = [run]
        current = trial
    if current:
        batches.append(current)
    return tuple(_batch(b, max_len, device) for b in batches)


def _padded(runs: list[Prefill]) -> int:
    return len(runs) * max(r.count for r in runs) * max(r.end for r in runs)


def _exact(runs: list[Prefill]) -> int:
    return sum(r.count * r.end for r in runs)


def _batch(runs: list[Prefill], max_len: int, device: torch.device | str) -> PrefillBatch:
    n_runs = len(runs)
    queries, width = max(r.count for r in runs), max(r.end for r in runs)
    # Two uploads: the runs' numbers, and where the real queries' outputs go.
    per_run = upload([[r.start for r in runs], [r.count for r in runs],
                      [r.position for r in runs], [r.slot * max_len for r in runs]], device)
    places = upload([[k * queries + c for k, r in enumerate(runs) for c in range(r.count)],
                     [r.start + c for r in runs for c in range(r.count)]], device)
    start, count, position, base = (row[:, None] for row in per_run)  # each [R, 1]
    c = torch.arange(queries, device=device)[None, :]  # [1, C]
    e = torch.arange(width, device=device)[None, :]  # [1, E]
    real = c < count  # [R, C]
    tokens = torch.where(real, start + c, 0)
    keys = torch.where(e < position + count, base + e, 0)
    sees = e[:, None, :] <= (position + c)[:, :, None]  # [R, C, E]
    mask = torch.where(real[:, :, None], sees, e[:, None, :] == 0)
    return PrefillBatch(n_runs, queries, width, tokens, keys, mask[:, None], places[0],
                        places[1])
