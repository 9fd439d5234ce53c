"""A row: one request inside a batch, as both loops (the engine core and static batching) run it.

BatchRow is what a loop is given, RowProgress what it keeps while the row runs, RowDelta what
the row hands out and RowOutput what it leaves with. The engine decides only what it can from
token ids: eos, stop token ids, max_new_tokens and aborts. Text is the frontend's business
(server.engine.output_processor): it detokenizes, looks for stop strings and, when one
completes, ends the request and aborts its row, which then leaves at its next step. So the
step loop never decodes, and under --engine-process the decoding runs in the HTTP process,
beside the device's next step rather than before it.

A row hands its new tokens out as RowDeltas: every step for a live row (a stream, or a row
with stop strings, whose frontend must see tokens as they come), once at the end otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from server.engine.interface import FinishReason, SamplingParams, TokenLogprob
from server.engine.sampling_limits import validate_params

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchRow:
    prompt_ids: Sequence[int]
    # [num_virtual_tokens, hidden] on the model's device and dtype (seq2seq: only the first
    # num_virtual_tokens rows), or None for the bare model.
    prompt_embeds: torch.Tensor | None
    params: SamplingParams
    # Where the row's new tokens go (server.engine.rows): each step when `live`,
    # otherwise once, when the row finishes. A row that finishes is handed out there, from
    # inside the step that finished it: a short row's caller need not wait for the batch.
    on_delta: Callable[[RowDelta], None] | None = None
    live: bool = False
    # Polled each step; an aborted row stops generating (its output is discarded by the caller).
    is_aborted: Callable[[], bool] | None = None
    # Called once when the row's first token exists (time-to-first-token metric).
    on_first_token: Callable[[], None] | None = None
    # Where the request's text lies in prompt_ids [start, end), for its prompt logprobs.
    text_span: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class RowOutput:
    """A row as it left the engine: its ids, not its text (the frontend decodes)."""

    # Generated ids, the eos id included when finish_reason is eos.
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    # True when the row was aborted (is_aborted, or one of its callbacks raised) or failed;
    # its output is partial and finish_reason is meaningless.
    aborted: bool = False
    # Why this row alone failed (invalid parameters, its sampling raised); its batch mates
    # are unaffected. InvalidRowError: the row's own input was invalid.
    error: Exception | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None  # per generated id, when asked
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # per text token, when asked


ABORTED = RowOutput(token_ids=(), finish_reason=FinishReason.LENGTH, aborted=True)


@dataclass(frozen=True)
class RowDelta:
    """What a row produced since its last delta. `finish_reason` is set on its last one (eos
    or length: stop strings are found by the frontend)."""

    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token id, when asked
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # in a row's first delta
    finish_reason: FinishReason | None = None
    # In a row's first delta: positions of the prompt (virtual ids included) whose keys and
    # values came from the prefix cache instead of being computed.
    cached_tokens: int | None = None


def is_live(stream: bool, params: SamplingParams) -> bool:
    """Whether a request's frontend must see each step's tokens (a stream, or stop strings to
    look for); else its row hands its tokens out once, when it finishes."""
    return stream or any(params.stop)


class RowProgress:
    """One row's generated ids and why it finished, as the engine sees them."""

    def __init__(self, row: BatchRow, eos_ids: frozenset[int]) -> None:
        self.row = row
        self.token_ids: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.aborted = False
        self.error: Exception | None = None  # set by fail(): this row alone failed
        # What ends the row: eos (unless ignore_eos) and the stop token ids, once min_tokens
        # tokens exist (the sampler masks them before that).
        self._ends = (frozenset() if row.params.ignore_eos else eos_ids) | frozenset(
            row.params.stop_token_ids)
        self.logprobs: list[TokenLogprob] | None = (
            None if row.params.logprobs is None else [])
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self._sent = 0  # token ids already handed out in a delta
        self._sent_prompt = False
        self.cached_tokens = 0  # the prompt's positions the prefix cache gave the row

    @property
    def done(self) -> bool:
        return self.aborted or self.finish_reason is not None

    def fail(self, error: Exception) -> None:
        """This row cannot go on (its sampling failed); it leaves at its next step, with the
        error, while its batch mates continue."""
        self.error = error
        self.aborted = True

    def step(self, token_id: int, logprob: TokenLogprob | None = None) -> None:
        """Take this step's token (and its logprob, when the row asked for them); decide
        whether the row is finished, and hand out a delta when one is due."""
        row = self.row
        if not self.token_ids and row.on_first_token is not None:
            self._call(row.on_first_token)
        if row.is_aborted is not None and self._call(row.is_aborted):
            self.aborted = True
        if self.aborted:
            return
        self.token_ids.append(token_id)
        if self.logprobs is not None:
            if logprob is None:
                raise RuntimeError("a row that asked for logprobs got a token without one")
            self.logprobs.append(logprob)
        if token_id in self._ends and len(self.token_ids) > row.params.min_tokens:
            self.finish_reason = FinishReason.EOS
        elif len(self.token_ids) >= row.params.max_new_tokens:
            self.finish_reason = FinishReason.LENGTH
        if row.on_delta is not None and (row.live or self.finish_reason is not None):
            self._call(row.on_delta, self.take_delta())

    def take_delta(self) -> RowDelta:
        """The tokens (and logprobs) not yet handed out, and the finish reason once set."""
        start, self._sent = self._sent, len(self.token_ids)
        prompt = None
        if self.prompt_logprobs is not None and not self._sent_prompt:
            prompt, self._sent_prompt = tuple(self.prompt_logprobs), True
        return RowDelta(
            token_ids=tuple(self.token_ids[start:]),
            logprobs=None if self.logprobs is None else tuple(self.logprobs[start:]),
            prompt_logprobs=prompt, finish_reason=self.finish_reason,
            cached_tokens=self.cached_tokens if start == 0 else None)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a caller's callback; one that raises aborts this row only, never the batch."""
        try:
            return fn(*args)
        except Exception:
            logger.exception("callback %s failed; aborting its row", getattr(fn, "__name__", fn))
            self.aborted = True
            return None


class InvalidRowError(ValueError):
    """A row no batch can run, found before it is computed: its own input is at fault."""


def row_error(row: BatchRow) -> InvalidRowError | None:
    """Why no batch can run this row (no tokens at all, out-of-range parameters), or None."""
    if not row.prompt_ids and (row.prompt_embeds is None or row.prompt_embeds.shape[0] == 0):
        return InvalidRowError("no prompt tokens and no virtual tokens")
    try:
        validate_params(row.params)
    except ValueError as e:
        return InvalidRowError(str(e))
    return None


def invalid_rows(rows: Sequence[BatchRow]) -> dict[int, RowOutput]:
    """The failed outputs of the rows no batch can run, by index: they are left out, so one
    request's bad input never fails the requests it would have shared a batch with."""
    failed = {}
    for i, row in enumerate(rows):
        if (error := row_error(row)) is not None:
            failed[i] = RowOutput((), FinishReason.LENGTH, aborted=True, error=error)
    return failed


def aborted_before_start(row: BatchRow) -> bool:
    """Whether a row was aborted before it ran: it is not computed at all."""
    if row.is_aborted is None:
        return False
    try:
        return bool(row.is_aborted())
    except Exception:
        logger.exception("is_aborted failed; aborting its row")
        return True


def row_output(state: RowProgress) -> RowOutput:
    """A row's output as it leaves: finished, or aborted or failed (then partial)."""
    return RowOutput(tuple(state.token_ids), state.finish_reason or FinishReason.LENGTH,
                     aborted=state.aborted, error=state.error,
                     logprobs=None if state.logprobs is None else tuple(state.logprobs),
                     prompt_logprobs=(None if state.prompt_logprobs is None
                                      else tuple(state.prompt_logprobs)))


def eos_ids_of(model: Any, tokenizer: Any) -> frozenset[int]:
    """The ids that end a row: what PEFT's generate would stop on (model first, then tokenizer)."""
    candidates = (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    )
    for eos in candidates:
        if eos is not None:
            return frozenset([int(eos)] if isinstance(eos, int) else (int(e) for e in eos))
    return frozenset()
