"""Decode-only steps at fixed shapes, captured once per bucket as CUDA graphs and replayed.

A decode step's work depends only on how many rows decode and how far back they attend, so
rows are padded up to a bucket (1, 2, 4, 8, 16, 24, 32, ... rows) and attention to a width
bucket (a power of two, at least 64 positions, at most the slot's length). The step's inputs
live in persistent device buffers that the graph reads: token ids, positions, cache indices,
slots and lengths. Padding rows decode token 0 at position 0 of a scratch slot no row owns,
so they write nowhere that is read.

On CUDA every (rows, width) bucket is captured at startup (`capture_all`), each after two
warm-up runs on a side stream; replaying it launches the whole forward at once, which is what
a launch-bound decode step needs. A bucket not captured then is captured the first time it is
needed. If a capture fails the bucket runs eagerly from then on: the
log says so once and the `graph_eager_buckets` gauge counts it; no request fails because of
it. A capture that failed once it had begun also stops the capture of buckets not captured
yet (they run eagerly, and are counted too), since the CUDA state such a failure leaves behind
is not worth another try. Elsewhere (the CPU) the same path runs eagerly, padded only when
asked (the tests pad to exercise the buckets).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from server.engine.core.kv_cache import SlotKVCache, StepLayout

log = logging.getLogger(__name__)

MIN_WIDTH = 64


def row_bucket(n: int, most: int) -> int:
    """The bucket of n rows: powers of two up to 16, then multiples of 8; at most `most`."""
    bucket = 1 << max(0, (n - 1).bit_length()) if n <= 16 else -(-n // 8) * 8
    return min(bucket, most)


def width_bucket(n: int, most: int) -> int:
    return min(max(MIN_WIDTH, 1 << max(0, (n - 1).bit_length())), most)


class DecodeGraphs:
    """Owned by the engine thread. `forward(ids [1, rows], positions [1, rows])` runs the model
    and returns logits [rows, vocab]; the cache's layout is set around it."""

    def __init__(self, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 cache: SlotKVCache, *, max_rows: int, scratch_slot: int, capture: bool,
                 pad: bool | None = None) -> None:
        self._forward = forward
        self._cache = cache
        self.max_rows = max_rows
        self._scratch = scratch_slot
        self.capture = capture
        self.pad = capture if pad is None else pad
        device = cache.keys[0].device
        self._device = device

        def buffer() -> torch.Tensor:
            return torch.zeros(max_rows, dtype=torch.long, device=device)

        self._ids, self._positions, self._write = buffer(), buffer(), buffer()
        self._slots, self._lengths = buffer(), buffer()
        self._graphs: dict[tuple[int, int], Any] = {}  # (rows, width) -> its CUDA graph
        self.eager_buckets: set[tuple[int, int]] = set()
        self._pool: Any = None
        # Every graph writes its logits here: a graph's own output would stay allocated in
        # the pool for good, one [rows, vocab] tensor per bucket; its intermediates, dead
        # between replays, are shared by all graphs (they never run at once).
        self._logits: torch.Tensor | None = None
        self._gave_up = False  # a capture failed part-way: nothing more is captured

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def run(self, ids: Sequence[int], positions: Sequence[int],
            slots: Sequence[int]) -> torch.Tensor:
        """One decode step for len(ids) rows (each row's token, its position and its slot);
        logits [rows, vocab]."""
        n = len(ids)
        if not 0 < n <= self.max_rows:
            raise ValueError(f"a decode step of {n} rows; this runner takes 1 to {self.max_rows}")
        rows = row_bucket(n, self.max_rows) if self.pad else n
        longest = max(positions) + 1
        width = width_bucket(longest, self._cache.max_len) if self.pad else longest
        max_len = self._cache.max_len
        pad = rows - n
        host = torch.tensor(
            [[*ids, *[0] * pad],
             [*positions, *[0] * pad],
             [*(s * max_len + p for s, p in zip(slots, positions, strict=True)),
              *[self._scratch * max_len] * pad],
             [*slots, *[self._scratch] * pad],
             [*(p + 1 for p in positions), *[1] * pad]], dtype=torch.long)
        staged = host.to(self._device, non_blocking=True)
        for buffer, row in zip((self._ids, self._positions, self._write, self._slots,
                                self._lengths), staged, strict=True):
            buffer[:rows].copy_(row)
        key = (rows, width)
        graph = self._graphs.get(key)
        if graph is None and self.capture and key not in self.eager_buckets:
            graph = self._try_capture(key)
        elif graph is None and self._gave_up:
            self.eager_buckets.add(key)
        if graph is None:
            return self._eager(rows, width)[:n]
        graph.replay()
        assert self._logits is not None  # every graph writes its logits there
        return self._logits[:n]

    def capture_all(self) -> int:
        """Capture every bucket now, before any row runs (at startup): a capture synchronizes
        the device and empties its cache, a stall no step of a serving engine should pay.
        Padding rows alone fill the buffers, writing and reading the scratch slot only.
        Largest first, so the smaller graphs reuse the pool's memory. Returns how many
        buckets are captured."""
        max_len = self._cache.max_len
        widths = {width_bucket(n, max_len) for n in range(1, max_len + 1)}
        rows = {row_bucket(n, self.max_rows) for n in range(1, self.max_rows + 1)}
        scratch = self._scratch * max_len
        for key in sorted(((r, w) for r in rows for w in widths), reverse=True):
            if not self.capture:
                break  # a capture failed part-way: the rest stay eager
            if key in self._graphs or key in self.eager_buckets:
                continue
            for buffer, value in ((self._ids, 0), (self._positions, 0), (self._write, scratch),
                                  (self._slots, self._scratch), (self._lengths, 1)):
                buffer[:key[0]].fill_(value)
            self._try_capture(key)
        return len(self._graphs)

    # ---- internals -------------------------------------------------------------------------------

    def _layout(self, rows: int, width: int) -> StepLayout:
        return StepLayout(write_index=self._write[:rows], decodes=rows,
                          decode_slots=self._slots[:rows], decode_lengths=self._lengths[:rows],
                          decode_width=width)

    def _eager(self, rows: int, width: int) -> torch.Tensor:
        self._cache.layout = self._layout(rows, width)
        try:
            return self._forward(self._ids[:rows][None], self._positions[:rows][None])
        finally:
            self._cache.layout = None

    def _try_capture(self, key: tuple[int, int]) -> Any | None:
        """Capture this bucket; None (and eager from now on) if capturing fails. The warm-up
        runs read the buffers as they are now, this step's inputs, so what they write into
        the cache is exactly what the replay writes.

        The capture is thread-local: the adapter loaders' copies into the prompt table on
        other threads go on while it runs. A capture that fails part-way leaves the CUDA
        state it touched (the thread's current stream, the allocator's capture pool) in a
        state not worth trusting, so the stream is put back and no other bucket is captured
        after it; the graphs already captured keep being replayed."""
        rows, width = key
        stream = None
        began = False
        try:
            stream = torch.cuda.current_stream(self._device)
            side = torch.cuda.Stream(device=self._device)
            side.wait_stream(stream)
            with torch.cuda.stream(side):
                for _ in range(2):
                    warm = self._eager(rows, width)
            stream.wait_stream(side)
            if self._logits is None:  # one output buffer for every graph, outside their pool
                self._logits = torch.empty(self.max_rows, warm.shape[-1], dtype=warm.dtype,
                                           device=self._device)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            self._cache.layout = self._layout(rows, width)
            try:
                began = True
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    out = self._forward(self._ids[:rows][None], self._positions[:rows][None])
                    self._logits[:rows].copy_(out)
            finally:
                self._cache.layout = None
        except Exception as e:  # noqa: BLE001 - eager still serves this bucket
            self.eager_buckets.add(key)
            if began:
                self._give_up(stream)
            log.warning("CUDA graph capture failed for decode steps of %d rows over %d "
                        "positions (%s: %s); that bucket runs eagerly%s", rows, width,
                        type(e).__name__, str(e),
                        ", and so does every bucket not captured yet" if began else "")
            return None
        self._graphs[key] = graph
        log.info("captured a CUDA graph for decode steps of %d rows over %d positions",
                 rows, width)
        return graph

    def _give_up(self, stream: Any) -> None:
        self.capture, self._gave_up = False, True
        if stream is not None:
            torch.cuda.set_stream(stream)  # a failed capture_end skips the graph's own restore
        with contextlib.suppress(Exception):  # the failure is already being reported
            torch.cuda.synchronize(self._device)
