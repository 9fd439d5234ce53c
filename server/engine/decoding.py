"""Continuous batching: rows join a running decode loop between steps and leave at the step
they finish.

`generate` (static batching, server.engine.generation) runs a batch until its longest row is
done: a finished row's slot idles, and a new request waits for the whole batch. Here the engine
thread owns the loop over the model's forward instead. All running rows share one KV cache, a
KVSlab (server.engine.kv_slab): preallocated buffers in which rows are right-aligned (left
padding with an attention mask of 0), so one step writes every row's token in one column, in
place:

- a joining group is prefilled on its own (soft prompt then token embeddings, laid out by
  build_batch_inputs), then its rows are written into the slab: into the places of finished
  rows first, then after the others (only the joiners are copied);
- every step feeds each row its last token at the row's own position (its count of real
  tokens), so padding changes nothing a row sees, exactly as in the static path;
- a row that finishes (or is aborted) is answered at once; its row rides along in the slab
  until a joiner takes its place or a quarter of the rows have finished (then the last rows
  move into the holes), and leading columns no row uses are let go of (no copy), so the cache
  does not outgrow the longest row for long;
- a row can be parked (its cache moved to a slab of its own, no steps) and resumed later,
  which is how the fair scheduler makes room for another tenant in a full batch;
- one long row at a time can be prefilled in chunks (admit_chunked, advance_chunk: a chunk per
  step, in a cache of its own), joining with its first token after the last chunk, so the
  running rows wait for a chunk between two steps rather than for the whole prompt.

This needs a decoder-only model whose prefill returns a plain DynamicCache and whose attention
goes through its layers' update (tested: GPT-2, Llama, Qwen2, BLOOM). `unsupported_reason`
probes a model and says when it is not one; the scheduler then runs static batching.
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
    eos_ids_of,
    final_output,
    invalid_rows,
)
from server.engine.interface import SamplingParams
from server.engine.kv_slab import KVSlab
from server.engine.sampling import RowSampler, mask_eos, sample_rows_isolated
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
    alive: bool = True  # False once finished: its slab row lingers until reused or compacted


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
    """Rows sharing one KVSlab (server.engine.kv_slab), in slab row order.

    A finished row is retired, not removed at once: it rides along (its output ignored) until
    a joining row takes its place in the slab, or a quarter of the group is retired and the
    last rows move into the holes (a copy of the moved rows only).
    """

    def __init__(self) -> None:
        self._empty()

    def _empty(self) -> None:
        self.slots: list[_Slot[H]] = []
        self.slab = KVSlab()
        self.cache: DynamicCache | None = None  # the model's view: the slab's layers
        self.next_ids: torch.Tensor | None = None  # [rows, 1]: each row's token for the next step
        self.retired = 0

    def __len__(self) -> int:
        """Live rows."""
        return len(self.slots) - self.retired

    @property
    def live(self) -> list[_Slot[H]]:
        return [slot for slot in self.slots if slot.alive] if self.retired else self.slots

    @property
    def width(self) -> int:
        return self.slab.width

    def add(self, slots: Sequence[_Slot[H]], keys: Sequence[torch.Tensor],
            values: Sequence[torch.Tensor], mask: torch.Tensor, next_ids: torch.Tensor,
            template: DynamicCache) -> None:
        """Rows join (their caches right-aligned: keys[layer] [n, heads, width, head_dim],
        mask [n, width]), into retired rows' places first, then after the others.
        `template`: a cache of the model's kind, copied once to hold the slab's layers."""
        holes = [i for i, slot in enumerate(self.slots) if not slot.alive][:len(slots)]
        at = holes + list(range(len(self.slots), len(self.slots) + len(slots) - len(holes)))
        self.slab.put(at, keys, values, mask)
        if self.cache is None:
            self.cache = copy.copy(template)
            self.cache.layers = self.slab.layers
        ids = next_ids.new_zeros(max(at[-1] + 1, len(self.slots)), 1)
        if self.next_ids is not None:
            ids[:len(self.slots)] = self.next_ids
        ids[torch.tensor(at, device=ids.device)] = next_ids
        for i, slot in zip(at, slots, strict=True):
            if i < len(self.slots):
                self.slots[i] = slot
            else:
                self.slots.append(slot)
        self.next_ids = ids
        self.retired -= len(holes)
        self._trim()

    def take(self, indices: Sequence[int]) -> tuple[list[_Slot[H]], list[torch.Tensor],
                                                   list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Copies of these rows, for another group's `add` (the rows stay here)."""
        assert self.next_ids is not None
        width = max(self.slots[i].length for i in indices)
        keys, values, mask = self.slab.take(indices, width)
        at = torch.tensor(list(indices), dtype=torch.long, device=self.next_ids.device)
        return ([self.slots[i] for i in indices], keys, values, mask,
                self.next_ids.index_select(0, at))

    def remove(self, indices: Sequence[int]) -> None:
        """Forget the rows at `indices` and the retired ones; the last rows fill their places."""
        gone = set(indices) | {i for i, slot in enumerate(self.slots) if not slot.alive}
        if not gone:
            return
        moves = self.slab.remove(sorted(gone))
        if not self.slab.rows:
            self._empty()  # nothing left: free the buffers
            return
        assert self.next_ids is not None
        if moves:
            src, dst = (torch.tensor(side, dtype=torch.long, device=self.next_ids.device)
                        for side in zip(*moves, strict=True))
            self.next_ids.index_copy_(0, dst, self.next_ids.index_select(0, src))
            for i, j in moves:
                self.slots[j] = self.slots[i]
        self.slots = self.slots[:self.slab.rows]
        self.next_ids = self.next_ids[:self.slab.rows]
        self.retired = 0
        self._trim()

    def retire(self, indices: Sequence[int]) -> None:
        """Mark rows finished; compact when a quarter (or all) of the group is retired."""
        for i in indices:
            self.slots[i].alive = False
        self.retired += len(indices)
        if self.retired and 4 * self.retired >= len(self.slots):
            self.remove([])

    def _trim(self) -> None:
        """Let go of leading columns that no row (retired ones included) uses."""
        if self.slots:
            self.slab.trim(max(slot.length for slot in self.slots))


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
        self._running: _Group[H] = _Group()
        self._parked: _Group[H] = _Group()
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
        self._running = _Group()

    @torch.inference_mode()
    def park(self, handles: Sequence[H]) -> None:
        """Take these running rows out of the steps, keeping their cache, until resumed."""
        if indices := _indices(self._running, handles):
            _move(self._running, indices, self._parked)

    @torch.inference_mode()
    def resume(self, handles: Sequence[H]) -> None:
        """Put parked rows back into the steps, where they go on from their last token."""
        if indices := _indices(self._parked, handles):
            _move(self._parked, indices, self._running)

    @torch.inference_mode()
    def discard_parked(self, handles: Sequence[H]) -> None:
        """Forget parked rows nobody waits for any more (aborted while parked)."""
        if indices := _indices(self._parked, handles):
            self._parked.remove(indices)

    def admit(self, entries: Sequence[tuple[H, BatchRow]]) -> list[tuple[H, RowOutput]]:
        """Prefill new rows and add them; each takes its first token now.

        Returns the rows that left at once: invalid (not computed, the output carries an
        InvalidRowError), aborted before they started (not computed), or finished at their first
        token. Raises ContinuousBatchingUnsupportedError for a cache that cannot be merged;
        model errors propagate. The running rows are untouched when this raises.
        """
        invalid = invalid_rows([row for _, row in entries])
        live: list[tuple[H, BatchRow]] = []
        left: list[tuple[H, RowOutput]] = [(entries[i][0], out) for i, out in invalid.items()]
        for i, (handle, row) in enumerate(entries):
            if i in invalid:
                continue
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
        leaving = self._advance(slots, tokens)
        keep = [i for i in range(len(slots)) if i not in set(leaving)]
        if keep:  # their caches, less the columns that are padding for all of them
            width = max(slots[i].length for i in keep)
            cache = out.past_key_values
            # Every row stays (the usual case): the slab copies straight from the views.
            at = (None if len(keep) == len(slots)
                  else torch.tensor(keep, dtype=torch.long, device=mask.device))

            def pick(t: torch.Tensor) -> torch.Tensor:
                return t if at is None else t.index_select(0, at)
            self._running.add(
                [slots[i] for i in keep],
                [pick(layer.keys[:, :, -width:]) for layer in cache.layers],
                [pick(layer.values[:, :, -width:]) for layer in cache.layers],
                pick(mask[:, -width:]), pick(tokens)[:, None], template=cache)
        return [(slots[i].handle, self._output(slots[i].state)) for i in leaving]

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
        if invalid := invalid_rows([row]):
            return [(handle, invalid[0])]
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
        assert group.cache is not None and group.next_ids is not None
        with torch.inference_mode():
            mask = group.slab.step_mask()
            # A finished row riding along until the next compaction is fed position 0: its
            # own next position may be past the model's position table.
            positions = torch.tensor([[slot.length if slot.alive else 0] for slot in group.slots],
                                     device=mask.device)  # [rows, 1]
            out = self._forward(input_ids=group.next_ids, attention_mask=mask,
                                position_ids=positions, past_key_values=group.cache)
            if out.past_key_values is not group.cache:
                raise ContinuousBatchingUnsupportedError(
                    "the model replaced its KV cache object during a step")
            group.slab.advance()
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
        """Each row's next token [n] from its logits [n, vocab]: argmax, or its own sampler.
        A row whose sampling fails is failed alone; it leaves at this step."""
        scores = logits.float()  # what generate compares, whatever the model's dtype
        mask_eos(scores, [i for i, s in enumerate(slots) if s.sampler.params.ignore_eos],
                 self._eos)
        tokens = scores.argmax(dim=-1)  # [n]
        sampled = [i for i, s in enumerate(slots) if s.alive and s.sampler.generator is not None]
        if sampled:
            index = torch.tensor(sampled, dtype=torch.long, device=scores.device)
            chosen, failed = sample_rows_isolated(scores.index_select(0, index),
                                                  [slots[i].sampler for i in sampled])
            tokens[index] = chosen
            for j, error in failed.items():
                slots[sampled[j]].state.fail(error)
        return tokens

    def _record(self, group: _Group[H], tokens: torch.Tensor) -> list[tuple[H, RowOutput]]:
        """Give each live row of `group` its token; retire the ones that finished or aborted."""
        leaving = self._advance(group.slots, tokens)
        if not leaving:
            return []
        outputs = [(group.slots[i].handle, self._output(group.slots[i].state)) for i in leaving]
        group.retire(leaving)
        return outputs

    @staticmethod
    def _advance(slots: Sequence[_Slot[H]], tokens: torch.Tensor) -> list[int]:
        """Give each live row its token; the indices of those that finished or aborted."""
        leaving = []
        for i, (slot, token) in enumerate(zip(slots, tokens.tolist(), strict=True)):
            if slot.alive:
                slot.state.step(token)
                if slot.state.done:
                    leaving.append(i)
        return leaving

    def _output(self, state: RowState) -> RowOutput:
        return aborted_output(state) if state.aborted else final_output(state, self._tokenizer)


def _move(source: _Group[H], indices: Sequence[int], target: _Group[H]) -> None:
    """Move the rows at `indices` from one group to the other (parking, resuming): only
    those rows are copied."""
    assert source.cache is not None
    slots, keys, values, mask, next_ids = source.take(indices)
    target.add(slots, keys, values, mask, next_ids, template=source.cache)
    source.remove(indices)


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
