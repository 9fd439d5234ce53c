"""One step at a time over every row: decodes and prefill chunks in one forward, one budget.

A row is a plain sequence of token ids (its soft prompt as reserved ids, server.engine.core.
prompt_table, then its text), a slot of the KV cache (server.engine.core.kv_cache) and its
sampling state. Each step:

1. every running row whose prompt is computed feeds its last token (a decode);
2. the rest of `max_batch_tokens` goes to prefill chunks: rows part-way through their prompt
   first, then waiting rows in the order the caller gave them, each taking a free slot; a
   prompt longer than what is left of the budget is cut and goes on next step;
3. all of it is one forward of the model over the step's tokens laid end to end (a decode row
   is one token, a chunk its run of tokens), with logits only where a token is drawn: each
   decode, and the last token of a prompt that is complete;
4. tokens are drawn on the device for all those rows at once (server.engine.sampling, through
   core.row_sampler) and copied to the host once; each row's token-level stop conditions (eos,
   max_new_tokens, abort) run there, and its new ids go out as a delta. Detokenization and
   stop strings are the frontend's (server.engine.output_processor), off this loop.

There is no separate lane for long prompts, no copying of caches between rows: a row's keys
and values are written once into its slot. Preempting a row frees its slot; when it runs
again it is recomputed from its ids (prompt and the tokens it already drew), which gives the
same state, and a seeded row draws the same tokens (its draws are indexed by token, not step).

With a prefix cache (server.engine.core.prefix_cache), a row whose prompt begins with virtual
ids that another row already computed gets their keys and values copied into its slot when it
joins, and prefills only the rest; the first row to compute them leaves a copy there.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from server.engine.core.decode_graphs import DecodeGraphs
from server.engine.core.host_copy import HostCopy
from server.engine.core.kv_cache import SlotKVCache, StepLayout
from server.engine.core.prefill_batches import Prefill, prefill_batches
from server.engine.core.prefix_cache import PrefixCache
from server.engine.core.row_sampler import RowSampler
from server.engine.interface import FinishReason
from server.engine.logprobs import scoring_span, token_logprobs
from server.engine.penalties import has_penalties
from server.engine.rows import (
    ABORTED,
    BatchRow,
    InvalidRowError,
    RowOutput,
    RowProgress,
    aborted_before_start,
    eos_ids_of,
    row_error,
    row_output,
)
from server.engine.sampling import seed_of
from server.engine.uploads import upload

H = TypeVar("H")  # the caller's handle for a row


@dataclass(eq=False)
class CoreRow(Generic[H]):
    """One row's single record in the core."""

    handle: H
    tokens: list[int]  # prompt ids (virtual ids first), then the ids drawn so far
    prompt_len: int
    state: RowProgress
    seed: int
    slot: int | None = None
    computed: int = 0  # leading tokens whose keys and values are in the slot
    virtual: int = 0  # leading virtual ids (the soft prompt), what the prefix cache shares
    share: bool = False  # store its virtual ids' keys and values once they are computed
    # Prompt logprobs: the positions whose logits score the text, and the next one to score
    # (a recomputed row does not score a position twice).
    score: tuple[int, int] | None = None
    scored: int = 0
    penalized: bool = False

    @property
    def drawn(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.tokens) - 1 or self.drawn == 0


@dataclass(frozen=True)
class StepStats:
    decodes: int
    prefill_tokens: int
    rows: int  # rows in the forward


class EngineCore(Generic[H]):
    """Owned by one thread. The model must be a decoder-only model whose attention goes
    through transformers' attention interface (GPT-2, Llama, Qwen2 and most others)."""

    def __init__(self, model: Any, tokenizer: Any, cache: SlotKVCache, *,
                 max_batch_tokens: int, max_rows: int | None = None,
                 graphs: bool | None = None, pad_decodes: bool | None = None,
                 prefixes: PrefixCache | None = None) -> None:
        """`graphs`: capture decode steps as CUDA graphs (default: on CUDA). `pad_decodes`:
        run decode steps at bucketed shapes even without graphs (default: with graphs); it
        takes one slot of the cache as scratch for the padding rows. `prefixes`: share soft
        prompts' keys and values between rows (the model's input embedding must read the
        prompt table, so that virtual ids are told apart from words)."""
        if max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be at least 1")
        self._model = model
        self._cache = cache
        self.max_batch_tokens = max_batch_tokens
        self.max_rows = min(max_rows or cache.slots, cache.slots)
        model.set_attn_implementation(cache.attn_implementation)
        self._eos_ids = eos_ids_of(model, tokenizer)
        embedding = model.get_input_embeddings()
        self._device = embedding.weight.device
        self._vocab: int | None = getattr(embedding, "vocab_size", None)
        self.prefixes = prefixes if self._vocab is not None else None
        self._to_store: list[tuple[tuple[int, ...], int]] = []  # (virtual ids, slot)
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        capture = self._device.type == "cuda" if graphs is None else graphs
        pad = capture if pad_decodes is None else pad_decodes
        self.decode_graphs: DecodeGraphs | None = None
        if capture or pad:
            scratch = cache.reserve()
            self.max_rows = min(self.max_rows, cache.slots - 1)
            self.decode_graphs = DecodeGraphs(self._decode_forward, cache,
                                              max_rows=self.max_rows, scratch_slot=scratch,
                                              capture=capture, pad=pad)
        self._sampler = RowSampler(cache.slots, int(embedding.weight.shape[0]),
                                   sorted(self._eos_ids), self._device)
        self._host = HostCopy(self.max_rows, self._device)
        self.running: list[CoreRow[H]] = []  # rows holding a slot, in admission order
        self.waiting: list[CoreRow[H]] = []  # rows without a slot, in the order they run
        self.last = StepStats(0, 0, 0)

    def __len__(self) -> int:
        return len(self.running) + len(self.waiting)

    @property
    def kv(self) -> SlotKVCache:
        """The KV cache the rows run in (its slots, positions per slot, bytes), for gauges."""
        return self._cache

    @property
    def free_rows(self) -> int:
        """Slots a joining row may still take: `max_rows` less the running rows. The cache's
        own free count is larger by the slot it keeps spare (padding rows' scratch, or the
        plan's margin), which no row ever holds, so gauges read this one."""
        return self.max_rows - len(self.running)

    @property
    def handles(self) -> list[H]:
        return [row.handle for row in (*self.running, *self.waiting)]

    def add(self, handle: H, row: BatchRow, ids: Sequence[int]) -> RowOutput | None:
        """Queue a row whose prompt is `ids` (virtual ids then text ids); it starts when a slot
        and the budget allow. Returns its output at once when it cannot run (invalid)."""
        if (error := row_error(row)) is not None:
            return RowOutput((), FinishReason.LENGTH, aborted=True, error=error)
        if len(ids) + row.params.max_new_tokens > self._cache.max_len:
            return RowOutput((), FinishReason.LENGTH, aborted=True, error=InvalidRowError(
                f"{len(ids)} prompt tokens and max_new_tokens {row.params.max_new_tokens} "
                f"exceed the {self._cache.max_len} positions a row can hold"))
        seed = seed_of(row.params)
        virtual = 0
        if self.prefixes is not None:
            vocab = self._vocab
            while virtual < len(ids) and ids[virtual] >= vocab:
                virtual += 1
        state = RowProgress(row, self._eos_ids)
        score = None
        if row.params.prompt_logprobs is not None:
            score = scoring_span(row.text_span)
            state.prompt_logprobs = [None] if row.text_span[0] == 0 < row.text_span[1] else []
        self.waiting.append(CoreRow(handle, list(ids), len(ids), state, seed, virtual=virtual,
                                    score=score, scored=score[0] if score else 0,
                                    penalized=has_penalties(row.params)))
        return None

    def reorder_waiting(self, key: Callable[[H], Any]) -> None:
        """Let the caller's policy decide which waiting rows are prefilled first."""
        self.waiting.sort(key=lambda r: key(r.handle))

    def preempt(self, handles: Sequence[H]) -> list[CoreRow[H]]:
        """Take these rows out of the steps, freeing their slots at once; give them back with
        `resume`, and they are recomputed from their ids (nothing is copied)."""
        wanted = {id(h) for h in handles}
        out = [r for r in (*self.running, *self.waiting) if id(r.handle) in wanted]
        for row in out:
            self._release(row)
            row.computed = 0
        self.running = [r for r in self.running if id(r.handle) not in wanted]
        self.waiting = [r for r in self.waiting if id(r.handle) not in wanted]
        return out

    def resume(self, rows: Sequence[CoreRow[H]]) -> None:
        """Preempted rows wait again, first in line."""
        self.waiting[:0] = rows

    def drop(self, handles: Sequence[H]) -> None:
        """Forget rows without output (their forward failed, or nobody waits for them)."""
        wanted = {id(h) for h in handles}
        for row in self.running:
            if id(row.handle) in wanted:
                self._release(row)
        self.running = [r for r in self.running if id(r.handle) not in wanted]
        self.waiting = [r for r in self.waiting if id(r.handle) not in wanted]

    @torch.inference_mode()
    def step(self) -> list[tuple[H, RowOutput]]:
        """One forward over the planned tokens; returns the rows that left."""
        self._store_prefixes()
        left = self._sweep_aborted()
        decodes, chunks = self._plan()
        plan = [*((row, 1) for row in decodes), *chunks]
        if not plan:
            self.last = StepStats(0, 0, 0)
            return left
        n_dec = len(decodes)
        # Decodes: each row's last token, at its own position.
        ids = [row.tokens[-1] for row in decodes]
        positions = [row.computed for row in decodes]
        slots = [row.slot for row in decodes]
        sampled = list(decodes)
        if not chunks and self.decode_graphs is not None:
            logits = self.decode_graphs.run(ids, positions, slots)
            return self._after_forward(plan, sampled, logits, n_dec, len(ids), left)
        max_len = self._cache.max_len
        write = [s * max_len + p for s, p in zip(slots, positions, strict=True)]
        logit_at = list(range(n_dec))
        score_at: list[int] = []
        scoring: list[tuple[CoreRow[H], int, int]] = []  # row, first position, count
        prefills = []
        for row, take in chunks:
            start, first = len(ids), row.computed
            ids += row.tokens[first:first + take]
            positions += range(first, first + take)
            write += range(row.slot * max_len + first, row.slot * max_len + first + take)
            prefills.append(Prefill(start, take, row.slot, first))
            if first + take == len(row.tokens):
                logit_at.append(len(ids) - 1)
                sampled.append(row)
            if row.score is not None:
                lo, hi = max(row.scored, first), min(row.score[1], first + take)
                if lo < hi:
                    score_at += range(start + lo - first, start + hi - first)
                    scoring.append((row, lo, hi - lo))
                    row.scored = hi
        device = self._device
        lengths = [p + 1 for p in positions[:n_dec]]
        self._cache.layout = StepLayout(
            write_index=torch.tensor(write, dtype=torch.long, device=device),
            decodes=n_dec,
            decode_slots=torch.tensor(slots, dtype=torch.long, device=device),
            decode_lengths=torch.tensor(lengths, dtype=torch.long, device=device),
            decode_width=max(lengths, default=0),
            prefills=prefill_batches(prefills, max_len, device))
        try:
            logits = self._forward(ids, positions, logit_at + score_at)
        finally:
            self._cache.layout = None
        if scoring:
            self._score_prompts(logits[len(logit_at):], scoring)
        return self._after_forward(plan, sampled, logits[:len(logit_at)], n_dec, len(ids), left)

    def _after_forward(self, plan: list[tuple[CoreRow[H], int]], sampled: list[CoreRow[H]],
                       logits: torch.Tensor, decodes: int, tokens: int,
                       left: list[tuple[H, RowOutput]]) -> list[tuple[H, RowOutput]]:
        """Draw the sampled rows' tokens and hand each to its row; returns the rows that left."""
        for row, take in plan:
            row.computed += take
            if row.share and row.computed >= row.virtual:
                row.share = False
                assert row.slot is not None
                self._to_store.append((tuple(row.tokens[:row.virtual]), row.slot))
        self.last = StepStats(decodes, tokens - decodes, len(plan))
        if not sampled:
            return left
        drawn = self._sampler.draw(logits, [row.state.row.params for row in sampled],
                                   [row.slot for row in sampled],
                                   [row.drawn for row in sampled],
                                   [row.penalized for row in sampled])
        logprobs: list[Any] = [None] * len(sampled)
        wanted = [i for i, row in enumerate(sampled) if row.state.logprobs is not None]
        if wanted:
            at = upload(wanted, self._device)
            for i, value in zip(wanted, token_logprobs(
                    logits.index_select(0, at), drawn.index_select(0, at),
                    [sampled[i].state.row.params.logprobs or 0 for i in wanted]), strict=True):
                logprobs[i] = value
        tokens = self._host.tokens(drawn)  # the step's one copy to the host
        for row, token, logprob in zip(sampled, tokens, logprobs, strict=True):
            row.tokens.append(token)
            row.state.step(token, logprob)
            if row.state.done:
                left.append((row.handle, row_output(row.state)))
        finished = [row for row in sampled if row.state.done]  # running rows, all of them
        for row in finished:
            self._release(row)
        if finished:
            self.running = [r for r in self.running if r.slot is not None]
        return left

    # ---- internals -------------------------------------------------------------------------------

    def _sweep_aborted(self) -> list[tuple[H, RowOutput]]:
        """Rows aborted while waiting or mid-prefill leave now, without computing more."""
        left = []
        for row in (*self.running, *self.waiting):
            if row.drawn == 0 and aborted_before_start(row.state.row):
                left.append((row.handle, ABORTED))
        if left:
            self.drop([h for h, _ in left])
        return left

    def _plan(self) -> tuple[list[CoreRow[H]], list[tuple[CoreRow[H], int]]]:
        """This step's decodes (one token each) and prefill chunks (row, tokens it feeds)."""
        budget = self.max_batch_tokens
        decodes: list[CoreRow[H]] = []
        pending: list[CoreRow[H]] = []
        for row in self.running:
            (pending if row.prefilling else decodes).append(row)
        del decodes[budget:]  # a budget below the rows: the rest decode next step
        budget -= len(decodes)
        chunks: list[tuple[CoreRow[H], int]] = []
        for row in pending:
            if budget <= 0:
                break
            take = min(len(row.tokens) - row.computed, budget)
            chunks.append((row, take))
            budget -= take
        joined: list[CoreRow[H]] = []
        while (self.waiting and budget > 0 and len(self.running) < self.max_rows
               and (slot := self._cache.allocate()) is not None):
            row = self.waiting.pop(0)
            row.slot, row.computed = slot, self._shared_prefix(row, slot)
            self.running.append(row)
            joined.append(row)
            take = min(len(row.tokens) - row.computed, budget)
            chunks.append((row, take))
            budget -= take
        self._sampler.join([r.slot for r in joined],
                           [r.state.row.params for r in joined], [r.seed for r in joined])
        for row in joined:
            if row.penalized:
                self._sampler.track(row.slot, row.tokens[:row.prompt_len],
                                    row.tokens[row.prompt_len:])
        return decodes, chunks

    def _store_prefixes(self) -> None:
        """Copy the prefixes the last step completed into the prefix cache. Done here, before
        anything is planned, rather than in the step that computed them, so the copy is not
        on that step's way to its tokens; until this step's forward nothing writes into a slot,
        so even the slot of a row that has finished still holds them."""
        if self._to_store and self.prefixes is not None:
            for key, slot in self._to_store:
                self.prefixes.store(key, self._cache, slot)
        self._to_store.clear()

    def _shared_prefix(self, row: CoreRow[H], slot: int) -> int:
        """Positions of a joining row whose keys and values the prefix cache gave its slot.
        At least its last prompt token is computed, for the logits that draw its next."""
        row.share = False
        count = min(row.virtual, len(row.tokens) - 1)
        if row.score is not None:  # its scored positions' logits must be computed
            count = min(count, row.scored)
        if self.prefixes is None or count <= 0:
            return 0
        if self.prefixes.fill(tuple(row.tokens[:row.virtual]), self._cache, slot, count):
            if row.drawn == 0:  # a row recomputed after preemption keeps its first figure
                row.state.cached_tokens = count
            return count
        row.share = True
        return 0

    def _forward(self, ids: list[int], positions: list[int], logit_at: list[int]) -> Any:
        device = self._device
        kwargs: dict[str, Any] = {}
        at = torch.tensor(logit_at or [len(ids) - 1], dtype=torch.long, device=device)
        if self._keep_arg:
            kwargs["logits_to_keep"] = at
        out = self._model(input_ids=torch.tensor([ids], dtype=torch.long, device=device),
                          position_ids=torch.tensor([positions], dtype=torch.long,
                                                    device=device),
                          use_cache=False, return_dict=True, **kwargs)
        logits = out.logits[0]
        return logits if self._keep_arg else logits.index_select(0, at)

    def _decode_forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """A decode step's forward for DecodeGraphs: every token's logits [rows, vocab]."""
        out = self._model(input_ids=ids, position_ids=positions, use_cache=False,
                          return_dict=True)
        return out.logits[0]

    def _score_prompts(self, logits: torch.Tensor,
                       scoring: list[tuple[CoreRow[H], int, int]]) -> None:
        """The prompt logprobs of the rows that asked: position q's logits score token q+1."""
        targets = [t for row, first, count in scoring
                   for t in row.tokens[first + 1:first + 1 + count]]
        tops = [row.state.row.params.prompt_logprobs or 0
                for row, _, count in scoring for _ in range(count)]
        values = iter(token_logprobs(logits, torch.tensor(targets, dtype=torch.long,
                                                           device=self._device), tops))
        for row, _, count in scoring:
            assert row.state.prompt_logprobs is not None
            row.state.prompt_logprobs += [next(values) for _ in range(count)]

    def _release(self, row: CoreRow[H]) -> None:
        if row.slot is not None:
            if row.penalized:
                self._sampler.untrack(row.slot)
            self._cache.free(row.slot)
            row.slot = None

