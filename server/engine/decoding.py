"""Continuous batching: rows join a running decode loop between steps and leave at the step
they finish.

`generate` (static batching, server.engine.generation) runs a batch until its longest row is
done: a finished row's slot idles, and a new request waits for the whole batch. Here the engine
thread owns the loop over the model's forward instead. All running rows share one KV cache (a
transformers DynamicCache), left-padded to a common length, with an attention mask of 0 on the
pads:

- a joining group is prefilled on its own (soft prompt then token embeddings, laid out by
  build_batch_inputs), then its cache and mask are left-padded and concatenated onto the running
  ones;
- every step feeds each row its last token at the row's own position (its count of real
  tokens), so padding changes nothing a row sees, exactly as in the static path;
- a row that finishes (or is aborted) is answered at once; its cache rows are dropped at the
  next compaction (when rows join or move, or a quarter of the rows have finished: dropping
  copies the whole cache), and leading columns that are padding for every remaining row are
  trimmed then, so the cache does not outgrow the longest live row for long;
- a row can be parked (its cache split off, no steps) and resumed later, which is how the fair
  scheduler makes room for another tenant in a full batch;
- one long row at a time can be prefilled in chunks (admit_chunked, advance_chunk: a chunk per
  step, in a cache of its own), joining with its first token after the last chunk, so the
  running rows wait for a chunk between two steps rather than for the whole prompt.

This needs a decoder-only model whose cache is a plain DynamicCache (tested: GPT-2, Llama, Qwen2,
BLOOM). `unsupported_reason` probes a model and says when it is not one; the scheduler then
runs static batching.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from server.engine.batch import RowInput, build_batch_inputs
from server.engine.generation import (
    ABORTED,
    BatchRow,
    RowOutput,
    aborted_before_start,
    aborted_output,
    check_rows,
    eos_ids_of,
    final_output,
)
from server.engine.interface import SamplingParams
from server.engine.roomy_cache import Columns, RoomyLayer, spare_columns
from server.engine.sampling import RowSampler, mask_eos, sample_rows
from server.engine.stopping import RowState

log = logging.getLogger(__name__)

H = TypeVar("H")  # the caller's handle for a row (the scheduler's Ticket)


class ContinuousBatchingUnsupportedError(RuntimeError):
    """The model's KV cache cannot be merged and split by rows; use static batching."""


@dataclass
class _Slot(Generic[H]):
    handle: H
    state: RowState
    sampler: RowSampler
    length: int  # real tokens in this row's cache: virtual + prompt + generated tokens fed
    alive: bool = True  # False once finished: its cache rows linger until the next compaction


@dataclass
class _Chunked(Generic[H]):
    """One row whose prompt is prefilled a chunk per step, in a cache of its own, before it
    joins the running rows."""

    handle: H
    row: BatchRow
    embeds: torch.Tensor  # [1, width, hidden]: soft prompt then prompt
    mask: torch.Tensor  # [1, width], all ones
    chunk: int  # columns per step
    cache: DynamicCache | None = None
    done: int = 0  # columns prefilled so far


class _Group(Generic[H]):
    """Rows sharing one KV cache, left-padded to a common width.

    A finished row is retired, not removed at once: removing rows copies the whole cache, so
    retired rows ride along (their output ignored) until rows join or move anyway, or a
    quarter of the group is retired.
    """

    def __init__(self, slots: list[_Slot[H]], cache: DynamicCache | None,
                 mask: torch.Tensor | Columns | None, next_ids: torch.Tensor | None) -> None:
        self.slots = slots
        self.cache = cache
        if isinstance(mask, torch.Tensor):
            mask = Columns(mask, int(mask.shape[1]), dim=1)
        self._mask = mask  # [rows, width] int64, 0 on left pads; grows a column per step
        self.next_ids = next_ids  # [rows, 1]: each row's last token, fed at the next step
        self.retired = 0

    @classmethod
    def empty(cls) -> _Group[H]:
        return cls([], None, None, None)

    def __len__(self) -> int:
        """Live rows."""
        return len(self.slots) - self.retired

    @property
    def live(self) -> list[_Slot[H]]:
        return [slot for slot in self.slots if slot.alive] if self.retired else self.slots

    @property
    def mask(self) -> torch.Tensor | None:
        return None if self._mask is None else self._mask.view

    @property
    def width(self) -> int:
        return 0 if self._mask is None else self._mask.filled

    def grow(self) -> torch.Tensor:
        """Before a step: the mask with a column of ones for the token each row is fed, and
        every cache layer able to take that column in place."""
        assert self._mask is not None and self.cache is not None
        self.cache.layers = [_roomy(layer) for layer in self.cache.layers]
        return self._mask.append(self._mask.buffer.new_ones(len(self.slots), 1))

    def retire(self, indices: Sequence[int]) -> None:
        """Mark rows finished; compact when nothing is left or a quarter is retired."""
        for i in indices:
            self.slots[i].alive = False
        self.retired += len(indices)
        if self.retired and 4 * self.retired >= len(self.slots):
            self.drop([])

    def live_rows(self, *, but: Sequence[int] = ()) -> list[int]:
        """Indices of the live rows, less `but`."""
        gone = set(but)
        return [i for i, slot in enumerate(self.slots) if slot.alive and i not in gone]

    def drop(self, indices: Sequence[int]) -> None:
        """Forget the rows at `indices` and the retired ones; trim leading columns no
        remaining row uses."""
        self._become(_Group.gather([(self, self.live_rows(but=indices))]))

    def extend(self, other: _Group[H]) -> None:
        """Append another group's live rows (dropping both groups' retired ones)."""
        mine, theirs = self.live_rows(), other.live_rows()
        if not theirs and len(mine) == len(self.slots):
            return
        if not mine and len(theirs) == len(other.slots):
            self._become(other)  # nothing to merge with: no copy
            return
        self._become(_Group.gather([(self, mine), (other, theirs)]))

    def _become(self, other: _Group[H]) -> None:
        self.slots, self.cache, self._mask, self.next_ids, self.retired = (
            other.slots, other.cache, other._mask, other.next_ids, other.retired)

    @staticmethod
    def gather(parts: Sequence[tuple[_Group[H], Sequence[int]]]) -> _Group[H]:
        """A new group of the given rows of each group, in order: each group's rows without
        the leading columns that are padding for all of them, right-aligned to a common width.
        Every tensor is written once, straight into its place (no gather-then-stack copy),
        with room for the columns of the steps to come."""
        parts = [(g, list(rows)) for g, rows in parts if rows]
        if not parts:
            return _Group.empty()
        for g, _ in parts:
            assert g.cache is not None and g.mask is not None and g.next_ids is not None
        trims = [min(g.width - g.slots[i].length for i in rows) for g, rows in parts]
        width = max(g.width - trim for (g, _), trim in zip(parts, trims, strict=True))
        index = [torch.tensor(rows, dtype=torch.long, device=g.mask.device)
                 for g, rows in parts]

        spare = spare_columns(width)

        def place(tensors: list[torch.Tensor], seq: int) -> Columns:
            return Columns(_place_rows(tensors, index, trims, width, seq, spare), width, seq)

        first = parts[0][0].cache
        cache = copy.copy(first)  # the same kind of cache, with its own layers
        cache.layers = []
        for n in range(len(first.layers)):
            layers = [g.cache.layers[n] for g, _ in parts]
            cache.layers.append(RoomyLayer(place([lay.keys for lay in layers], seq=2),
                                           place([lay.values for lay in layers], seq=2)))
        mask = place([g.mask for g, _ in parts], seq=1)
        next_ids = torch.cat([g.next_ids.index_select(0, at)
                              for (g, _), at in zip(parts, index, strict=True)])
        return _Group([g.slots[i] for g, rows in parts for i in rows], cache, mask, next_ids)


def _place_rows(sources: list[torch.Tensor], index: list[torch.Tensor], trims: list[int],
                width: int, seq: int, spare: int = 0) -> torch.Tensor:
    """The `index` rows of each source (less its first `trims` columns on axis `seq`: dim 2 of
    a cache layer [batch, heads, seq, head_dim], dim 1 of a mask [batch, seq]) stacked on the
    batch axis, right-aligned in `width` columns with zeros in front, then `spare` columns
    left unwritten (room for later steps). index_select writes each part straight into its
    slice of the result: one copy, whatever the strides."""
    shape = list(sources[0].shape)
    shape[0], shape[seq] = sum(len(at) for at in index), width + spare
    out = sources[0].new_empty(shape)
    row = 0
    for src, at, trim in zip(sources, index, trims, strict=True):
        cols = src.shape[seq] - trim
        block = out.narrow(0, row, len(at))
        block.narrow(seq, 0, width - cols).zero_()
        torch.index_select(src.narrow(seq, trim, cols), 0, at.to(src.device),
                           out=block.narrow(seq, width - cols, cols))
        row += len(at)
    return out


class RunningBatch(Generic[H]):
    """The rows decoding now on one model, and rows parked out of it. Owned by the engine
    thread; not thread-safe.

    A parked row keeps its cache and its place in its output but takes no steps until it is
    resumed (a fair scheduler parks a tenant's rows to make room for another tenant's).
    If `step` or `admit` raises a model error, call `clear()`: the cache may be half updated.
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids_of(model, tokenizer)
        device = model.get_input_embeddings().weight.device  # mask_eos moves it if need be
        self._eos = torch.tensor(sorted(self._eos_ids), dtype=torch.long, device=device)
        accepted = inspect.signature(model.forward).parameters
        self._takes_position_ids = "position_ids" in accepted  # BLOOM: ALiBi from the mask
        self._takes_logits_to_keep = "logits_to_keep" in accepted
        self._running: _Group[H] = _Group.empty()
        self._parked: _Group[H] = _Group.empty()
        self._chunked: _Chunked[H] | None = None

    def __len__(self) -> int:
        """Rows that take a step (parked rows not counted)."""
        return len(self._running)

    @property
    def rows(self) -> int:
        """Rows the next step computes: the running ones plus finished ones not yet dropped."""
        return len(self._running.slots)

    @property
    def handles(self) -> list[H]:
        return [slot.handle for slot in self._running.live]

    @property
    def parked(self) -> list[H]:
        return [slot.handle for slot in self._parked.live]

    @property
    def cache_length(self) -> int:
        """Columns of the running rows' cache: the longest running row (after trimming)."""
        return self._running.width

    def clear(self) -> None:
        """Drop every running row without output (after a model failure, or at shutdown).
        Parked rows are untouched."""
        self._running = _Group.empty()

    @torch.inference_mode()
    def park(self, handles: Sequence[H]) -> None:
        """Take these running rows out of the steps, keeping their cache, until resumed."""
        if indices := _indices(self._running, handles):
            self._running, self._parked = _move(self._running, indices, self._parked)

    @torch.inference_mode()
    def resume(self, handles: Sequence[H]) -> None:
        """Put parked rows back into the steps, where they go on from their last token."""
        if indices := _indices(self._parked, handles):
            self._parked, self._running = _move(self._parked, indices, self._running)

    @torch.inference_mode()
    def discard_parked(self, handles: Sequence[H]) -> None:
        """Forget parked rows nobody waits for any more (aborted while parked)."""
        if indices := _indices(self._parked, handles):
            self._parked.drop(indices)

    def admit(self, entries: Sequence[tuple[H, BatchRow]]) -> list[tuple[H, RowOutput]]:
        """Prefill new rows and add them; each takes its first token now.

        Returns the rows that left at once: aborted before they started (not computed), or
        finished at their first token. Raises ValueError for an invalid row (then none is
        admitted) and ContinuousBatchingUnsupportedError for a cache that cannot be merged;
        model errors propagate. The running rows are untouched when this raises.
        """
        check_rows([row for _, row in entries])
        live: list[tuple[H, BatchRow]] = []
        left: list[tuple[H, RowOutput]] = []
        for handle, row in entries:
            if aborted_before_start(row):
                left.append((handle, ABORTED))
            else:
                live.append((handle, row))
        if not live:
            return left
        with torch.inference_mode():
            batch = build_batch_inputs(self._model.get_input_embeddings(),
                                       [RowInput(r.prompt_ids, r.prompt_embeds) for _, r in live])
            mask = batch.attention_mask  # [new, width]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # a pad's position is never seen
            out = self._forward(inputs_embeds=batch.inputs_embeds, attention_mask=mask,
                                position_ids=positions, past_key_values=None)
            left += self._join(live, batch.lengths, out, mask)
        return left

    def _join(self, rows: Sequence[tuple[H, BatchRow]], lengths: Sequence[int], out: Any,
              mask: torch.Tensor) -> list[tuple[H, RowOutput]]:
        """Prefilled rows (`out`: the model's output over their whole prompts) take their
        first token and join the running rows; returns those that left at it."""
        _check_cache(out.past_key_values, rows=len(rows), length=int(mask.shape[1]))
        slots = [_Slot(handle, RowState(row, self._tokenizer, self._eos_ids),
                       RowSampler(row.params), length)
                 for (handle, row), length in zip(rows, lengths, strict=True)]
        tokens = self._choose(out.logits[:, -1, :], slots)  # [rows]
        group = _Group(slots, out.past_key_values, mask, tokens[:, None])
        left = self._record(group, tokens)
        self._running.extend(group)
        return left

    @property
    def chunked(self) -> H | None:
        """The row being prefilled in chunks, if any (not yet running, not parkable)."""
        return None if self._chunked is None else self._chunked.handle

    def admit_chunked(self, handle: H, row: BatchRow, chunk: int) -> list[tuple[H, RowOutput]]:
        """Start prefilling one long row `chunk` prompt columns per call of advance_chunk (the
        first chunk now), so running rows wait for a chunk per step, not the whole prompt.
        It joins the running rows, with its first token, after its last chunk. At most one
        row is chunked at a time. Returns the row if it left at once (aborted)."""
        assert self._chunked is None, "one chunked prefill at a time"
        check_rows([row])
        if aborted_before_start(row):
            return [(handle, ABORTED)]
        with torch.inference_mode():
            batch = build_batch_inputs(self._model.get_input_embeddings(),
                                       [RowInput(row.prompt_ids, row.prompt_embeds)])
        self._chunked = _Chunked(handle, row, batch.inputs_embeds, batch.attention_mask,
                                 max(1, chunk))
        return self.advance_chunk()

    def advance_chunk(self) -> list[tuple[H, RowOutput]]:
        """Prefill the chunked row's next chunk; after the last one it joins the running rows
        with its first token. Returns it if it left (aborted, or finished at that token).
        Model errors propagate, with the chunked row dropped; the running rows are untouched."""
        work = self._chunked
        if work is None:
            return []
        if aborted_before_start(work.row):  # aborted meanwhile: stop prefilling it
            self._chunked = None
            return [(work.handle, ABORTED)]
        width = int(work.mask.shape[1])
        end = min(width, work.done + work.chunk)
        try:
            with torch.inference_mode():
                out = self._forward(inputs_embeds=work.embeds[:, work.done:end],
                                    attention_mask=work.mask[:, :end],
                                    position_ids=torch.arange(work.done, end,
                                                              device=work.mask.device)[None],
                                    past_key_values=work.cache)
        except BaseException:
            self._chunked = None
            raise
        work.cache, work.done = out.past_key_values, end
        if end < width:
            return []
        self._chunked = None
        with torch.inference_mode():
            return self._join([(work.handle, work.row)], [width], out, work.mask)

    def step(self) -> list[tuple[H, RowOutput]]:
        """One decode step: every running row takes one token. Returns the rows that left."""
        group = self._running
        if not group.slots:
            return []
        assert group.mask is not None and group.next_ids is not None
        with torch.inference_mode():
            mask = group.grow()
            # A finished row riding along until the next compaction is fed position 0: its
            # own next position may be past the model's position table.
            positions = torch.tensor([[slot.length if slot.alive else 0] for slot in group.slots],
                                     device=mask.device)  # [rows, 1]
            out = self._forward(input_ids=group.next_ids, attention_mask=mask,
                                position_ids=positions, past_key_values=group.cache)
            group.cache = out.past_key_values
            for slot in group.slots:
                slot.length += 1
            tokens = self._choose(out.logits[:, -1, :], group.slots)  # [rows]
            group.next_ids = tokens[:, None]
            return self._record(group, tokens)

    # ---- internals -------------------------------------------------------------------------------

    def _forward(self, *, position_ids: torch.Tensor, **kwargs: Any) -> Any:
        if self._takes_position_ids:
            kwargs["position_ids"] = position_ids
        if self._takes_logits_to_keep:  # the last position's logits only, not the prompt's
            kwargs["logits_to_keep"] = 1
        return self._model(use_cache=True, return_dict=True, **kwargs)

    def _choose(self, logits: torch.Tensor, slots: Sequence[_Slot[H]]) -> torch.Tensor:
        """Each row's next token [n] from its logits [n, vocab]: argmax, or its own sampler."""
        scores = logits.float()  # what generate compares, whatever the model's dtype
        mask_eos(scores, [i for i, s in enumerate(slots) if s.sampler.params.ignore_eos],
                 self._eos)
        tokens = scores.argmax(dim=-1)  # [n]
        sampled = [i for i, s in enumerate(slots) if s.alive and s.sampler.generator is not None]
        if sampled:
            index = torch.tensor(sampled, dtype=torch.long, device=scores.device)
            tokens[index] = sample_rows(scores.index_select(0, index),
                                        [slots[i].sampler for i in sampled])
        return tokens

    def _record(self, group: _Group[H], tokens: torch.Tensor) -> list[tuple[H, RowOutput]]:
        """Give each live row of `group` its token; retire the ones that finished or aborted."""
        leaving = []
        for i, (slot, token) in enumerate(zip(group.slots, tokens.tolist(), strict=True)):
            if slot.alive:
                slot.state.step(token)
                if slot.state.done:
                    leaving.append(i)
        if not leaving:
            return []
        outputs = [(group.slots[i].handle, self._output(group.slots[i].state)) for i in leaving]
        group.retire(leaving)
        return outputs

    def _output(self, state: RowState) -> RowOutput:
        return aborted_output(state) if state.aborted else final_output(state, self._tokenizer)


def _roomy(layer: Any) -> Any:
    """A plain DynamicLayer (straight from a prefill) as a RoomyLayer over the same tensors:
    its first step regrows it once, every later one writes in place."""
    if type(layer) is not DynamicLayer:
        return layer
    return RoomyLayer(Columns(layer.keys, int(layer.keys.shape[2]), dim=2),
                      Columns(layer.values, int(layer.values.shape[2]), dim=2))


def _move(source: _Group[H], indices: Sequence[int],
          target: _Group[H]) -> tuple[_Group[H], _Group[H]]:
    """(source less the rows at `indices`, target plus them): each row copied once."""
    return (_Group.gather([(source, source.live_rows(but=indices))]),
            _Group.gather([(target, target.live_rows()), (source, sorted(set(indices)))]))


def _indices(group: _Group[H], handles: Sequence[H]) -> list[int]:
    """Where the live rows of these handles are in the group."""
    wanted = {id(h) for h in handles}
    return [i for i, slot in enumerate(group.slots) if slot.alive and id(slot.handle) in wanted]


def _check_cache(cache: Any, *, rows: int, length: int) -> None:
    """Only a plain DynamicCache of [batch, heads, seq, head_dim] layers can be merged/split."""
    if type(cache) is not DynamicCache:
        raise ContinuousBatchingUnsupportedError(
            f"the model returned a {type(cache).__name__}, not a DynamicCache")
    for i, layer in enumerate(cache.layers):
        keys = getattr(layer, "keys", None)
        if (type(layer) is not DynamicLayer or keys is None or keys.dim() != 4
                or tuple(keys.shape[:1]) + tuple(keys.shape[2:3]) != (rows, length)):
            raise ContinuousBatchingUnsupportedError(
                f"cache layer {i} is a {type(layer).__name__} of shape "
                f"{None if keys is None else tuple(keys.shape)}; expected a DynamicLayer of "
                f"[{rows}, heads, {length}, head_dim]")


def unsupported_reason(model: Any, tokenizer: Any) -> str | None:
    """Why this model cannot run continuous batching, or None when it can.

    Seq2seq models are refused outright; a decoder-only model is probed with one two-row
    admission and one step, which checks its cache type and layout; any error there means no.
    """
    if getattr(model.config, "is_encoder_decoder", False):
        return "seq2seq models run static batching"
    probe: RunningBatch[int] = RunningBatch(model, tokenizer)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    rows = [BatchRow(prompt_ids=ids, prompt_embeds=None, params=params)
            for ids in ([0], [min(1, vocab - 1), 0])]
    try:
        probe.admit(list(enumerate(rows)))
        probe.step()
    except ContinuousBatchingUnsupportedError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - a model our loop cannot drive: static still may
        log.warning("continuous batching probe failed", exc_info=True)
        return f"the probe failed: {type(e).__name__}: {e}"
    return None
