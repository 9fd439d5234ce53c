"""The running rows' KV cache as preallocated buffers that rows join, leave and step in place.

transformers' DynamicLayer appends a step's keys and values with torch.cat, which copies the
whole layer at every step; and merging a joining group into a DynamicCache, or dropping rows
from one, copies every running row. With many rows and long contexts those copies cost more
than the step's attention itself.

A KVSlab keeps each layer's keys and values in a buffer [row capacity, heads, column capacity,
head_dim] with the attention mask beside it ([rows, columns]). Rows are right-aligned: every
row's last token is in column `end - 1`, and a row of n tokens holds columns end-n .. end-1,
with zeros (mask 0) in front of it, so one step feeds every row's next token into column
`end`. The model sees the filled part, `[:rows, :, start:end]`, through SlabLayers, which are
DynamicLayers whose update writes the step's column in place. Then:

- a step writes one column per layer, nothing else;
- rows join into free rows (the holes left by finished rows first), written once, and a
  joiner longer than the others only moves `start` left, zeroing that strip for the others;
- rows leave by moving the last rows into their holes, copying only the moved rows;
- `start` moves right when no row needs the leading columns (no copy).

The buffers are regrown (one copy of the filled part) only when rows or columns run out, with
a quarter more room than needed on each side, so regrowth is rare. That spare room is memory
the operator sizes for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

MIN_SPARE = 32  # columns (and 4 rows) of room at least; a quarter more when that is more


def spare(n: int, least: int = MIN_SPARE) -> int:
    """Room to reserve beyond `n` rows or columns: a quarter of n, at least `least`."""
    return max(least, n // 4)


class SlabLayer(DynamicLayer):
    """One layer of a KVSlab as the model sees it: `keys`/`values` are views of the filled
    part, and update writes the new columns in place after it."""

    def __init__(self, slab: KVSlab, index: int) -> None:
        super().__init__()
        self._slab, self._index = slab, index
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys, self.values = self._slab.write_columns(self._index, key_states, value_states)
        return self.keys, self.values


class KVSlab:
    """Rows' KV caches and attention mask, right-aligned at column `end`. See the module
    docstring. Owned by one thread."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []  # per layer [row cap, heads, column cap, head_dim]
        self.values: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None  # [row cap, column cap]
        self.rows = 0
        self.start = self.end = 0
        self.layers: list[SlabLayer] = []

    @property
    def width(self) -> int:
        return self.end - self.start

    def mask_view(self) -> torch.Tensor | None:
        return None if self.mask is None else self.mask[:self.rows, self.start:self.end]

    def put(self, at: Sequence[int], keys: Sequence[torch.Tensor],
            values: Sequence[torch.Tensor], mask: torch.Tensor) -> None:
        """Write rows at row indices `at` (free rows: holes, or from `rows` on). The source
        is right-aligned like the slab: keys[layer] [n, heads, width, head_dim], mask
        [n, width]. If this raises (out of memory), the rows the model sees are as before,
        but for the holes in `at`."""
        width = int(mask.shape[1])
        if not self.keys:
            self._allocate(keys, values, mask)
        rows = max(self.rows, max(at) + 1)
        self._reserve(rows=rows, left=max(0, width - self.width), right=0)
        start = min(self.start, self.end - width)
        if start < self.start:  # the others get zeros (mask 0) in front
            self._zero(slice(0, self.rows), slice(start, self.start))
        full = self.end - start
        index = torch.tensor(list(at), dtype=torch.long, device=self.mask.device)
        for mine, theirs in ((self.keys, keys), (self.values, values)):
            for buffer, source in zip(mine, theirs, strict=True):
                _write_rows(buffer.narrow(2, start, full), index, source, full - width, seq=2)
        _write_rows(self.mask.narrow(1, start, full), index, mask, full - width, seq=1)
        self.rows, self.start = rows, start
        self._refresh()

    def take(self, indices: Sequence[int], width: int) -> tuple[list[torch.Tensor],
                                                                list[torch.Tensor], torch.Tensor]:
        """Copies of these rows' last `width` columns (keys, values, mask), for `put`."""
        index = torch.tensor(list(indices), dtype=torch.long, device=self.mask.device)
        first = self.end - width
        keys = [b.narrow(2, first, width).index_select(0, index) for b in self.keys]
        values = [b.narrow(2, first, width).index_select(0, index) for b in self.values]
        return keys, values, self.mask.narrow(1, first, width).index_select(0, index)

    def remove(self, indices: Sequence[int]) -> list[tuple[int, int]]:
        """Drop these rows: the last rows move into their holes. Returns the moves (from, to)."""
        gone = set(indices)
        rows = self.rows - len(gone)
        holes = sorted(i for i in gone if i < rows)
        movers = [i for i in range(rows, self.rows) if i not in gone]
        if holes:
            device = self.mask.device
            src = torch.tensor(movers, dtype=torch.long, device=device)
            dst = torch.tensor(holes, dtype=torch.long, device=device)
            for buffer in (*self.keys, *self.values):
                region = buffer.narrow(2, self.start, self.width)
                region.index_copy_(0, dst, region.index_select(0, src))
            region = self.mask.narrow(1, self.start, self.width)
            region.index_copy_(0, dst, region.index_select(0, src))
        self.rows = rows
        self._refresh()
        return list(zip(movers, holes, strict=True))

    def trim(self, width: int) -> None:
        """Forget leading columns no row needs: keep the last `width` (no copy)."""
        self.start = max(self.start, self.end - width)
        self._refresh()

    def step_mask(self) -> torch.Tensor:
        """Before a step: room for one more column, its mask set to 1; the step's mask."""
        self._reserve(rows=self.rows, left=0, right=1)
        self.mask[:self.rows, self.end] = 1
        return self.mask[:self.rows, self.start:self.end + 1]

    def write_columns(self, layer: int, keys: torch.Tensor,
                      values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A step's new columns for one layer, written after `end`; the views the model
        attends over. `advance` moves `end` once every layer has written."""
        n = int(keys.shape[2])
        filled = slice(self.start, self.end + n)
        self.keys[layer][:self.rows, :, self.end:self.end + n].copy_(keys)
        self.values[layer][:self.rows, :, self.end:self.end + n].copy_(values)
        return self.keys[layer][:self.rows, :, filled], self.values[layer][:self.rows, :, filled]

    def advance(self, columns: int = 1) -> None:
        self.end += columns
        self._refresh()

    # ---- internals -------------------------------------------------------------------------------

    def _allocate(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                  mask: torch.Tensor) -> None:
        """Empty buffers shaped like the first rows put (regrown to size at once)."""
        self.keys = [k.new_zeros(0, k.shape[1], 0, k.shape[3]) for k in keys]
        self.values = [v.new_zeros(0, v.shape[1], 0, v.shape[3]) for v in values]
        self.mask = mask.new_zeros(0, 0)
        self.layers = [SlabLayer(self, n) for n in range(len(keys))]

    def _reserve(self, *, rows: int, left: int, right: int) -> None:
        """Regrow the buffers (one copy of the filled part) unless `rows` rows, `left` more
        columns before `start` and `right` after `end` already fit."""
        row_cap, col_cap = self.mask.shape
        if rows <= row_cap and left <= self.start and self.end + right <= col_cap:
            return
        width = self.width
        new_rows = rows + spare(rows, least=4) if rows > row_cap else row_cap
        before = left + spare(width + left)
        after = right + spare(width + right)
        start, columns = before, before + width + after
        filled = slice(self.start, self.end)
        # Unwritten memory is never read: rows are written whole when put, a column before
        # `start` is zeroed when `start` moves over it, and a step writes its column before
        # attending to it. Everything is allocated before anything is replaced, so running
        # out of memory here leaves the slab as it was.
        new = [[old.new_empty(new_rows, old.shape[1], columns, old.shape[3]) for old in buffers]
               for buffers in (self.keys, self.values)]
        mask = self.mask.new_empty(new_rows, columns)
        for olds, news in zip((self.keys, self.values), new, strict=True):
            for old, buffer in zip(olds, news, strict=True):
                buffer[:self.rows, :, start:start + width] = old[:self.rows, :, filled]
        mask[:self.rows, start:start + width] = self.mask[:self.rows, filled]
        self.keys, self.values = new
        self.mask, self.start, self.end = mask, start, start + width

    def _zero(self, rows: slice, columns: slice) -> None:
        for buffer in (*self.keys, *self.values):
            buffer[rows, :, columns] = 0
        self.mask[rows, columns] = 0

    def _refresh(self) -> None:
        """Point the layers the model sees at the filled part."""
        for n, layer in enumerate(self.layers):
            layer.keys = self.keys[n][:self.rows, :, self.start:self.end]
            layer.values = self.values[n][:self.rows, :, self.start:self.end]


def _write_rows(region: torch.Tensor, index: torch.Tensor, source: torch.Tensor, pad: int,
                seq: int) -> None:
    """Write `source`'s rows at `index` of `region`, right-aligned on axis `seq` with `pad`
    zero columns in front (each written once, in place)."""
    if pad:
        region.narrow(seq, 0, pad).index_fill_(0, index, 0)
    region.narrow(seq, pad, int(source.shape[seq])).index_copy_(0, index, source)
