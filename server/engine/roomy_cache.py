"""KV cache layers with room to grow, so a decode step writes its token in place.

transformers' DynamicLayer appends a step's keys and values with torch.cat, which copies the
whole layer: every step of the continuous-batching loop paid a copy of the running rows' entire
KV cache, on top of reading it for attention. Here the keys and values live in buffers with
spare columns past the cache's width; a step writes its column into the spare room and the
layer exposes a view of the filled part, so the model sees exactly what a DynamicLayer would
hold. When the room runs out, the buffer is regrown by a quarter (one copy, amortized over
that many steps). `python -m benchmarks.engine_costs --widths` measures the difference.

The attention mask of the running rows grows the same way (`Columns`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

MIN_SPARE = 32  # columns; a quarter of the width when that is more


def spare_columns(width: int) -> int:
    """How many columns to reserve past `width`: a quarter of it, at least MIN_SPARE."""
    return max(MIN_SPARE, width // 4)


def _regrown(buffer: torch.Tensor, filled: int, needed: int, dim: int) -> torch.Tensor:
    """A bigger buffer holding the first `filled` columns (on `dim`) of `buffer`, with room
    for at least `needed` more."""
    shape = list(buffer.shape)
    shape[dim] = filled + max(needed, spare_columns(filled + needed))
    out = buffer.new_empty(shape)
    out.narrow(dim, 0, filled).copy_(buffer.narrow(dim, 0, filled))
    return out


class Columns:
    """A tensor that grows along `dim` in place: `view` is its first `filled` columns of a
    buffer with spare room."""

    def __init__(self, buffer: torch.Tensor, filled: int, dim: int) -> None:
        self.buffer, self.filled, self.dim = buffer, filled, dim

    @property
    def view(self) -> torch.Tensor:
        return self.buffer.narrow(self.dim, 0, self.filled)

    def append(self, columns: torch.Tensor) -> torch.Tensor:
        """Write `columns` after the filled ones (regrowing when the room is used up); the new
        view."""
        n = int(columns.shape[self.dim])
        if self.filled + n > self.buffer.shape[self.dim]:
            self.buffer = _regrown(self.buffer, self.filled, n, self.dim)
        self.buffer.narrow(self.dim, self.filled, n).copy_(columns)
        self.filled += n
        return self.view


class RoomyLayer(DynamicLayer):
    """A DynamicLayer ([batch, heads, seq, head_dim]) whose update writes in place.

    `keys` and `values` are always views of the filled part, so everything that reads a
    DynamicLayer (the model's attention, get_seq_length, the mask sizes) sees the same tensors.
    """

    def __init__(self, keys: Columns, values: Columns) -> None:
        super().__init__()
        self._keys, self._values = keys, values
        self.dtype, self.device = keys.buffer.dtype, keys.buffer.device
        self.is_initialized = True
        self.keys, self.values = keys.view, values.view

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = self._keys.append(key_states)
        self.values = self._values.append(value_states)
        return self.keys, self.values
