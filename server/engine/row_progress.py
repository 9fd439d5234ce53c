"""A row's progress inside the engine: its ids, its token-level stop conditions, its deltas.

The engine decides only what it can from token ids: eos, stop token ids, max_new_tokens and
aborts. Text is
the frontend's business (server.engine.output_processor): it detokenizes, looks for stop
strings and, when one completes, ends the request and aborts its row, which then leaves at
its next step. So the step loop never decodes, and under --engine-process the decoding runs
in the HTTP process, beside the device's next step rather than before it.

A row hands its new tokens out as RowDeltas: every step for a live row (a stream, or a row
with stop strings, whose frontend must see tokens as they come), once at the end otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.engine.interface import FinishReason, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from server.engine.generation import BatchRow

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowDelta:
    """What a row produced since its last delta. `finish_reason` is set on its last one (eos
    or length: stop strings are found by the frontend)."""

    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token id, when asked
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # in a row's first delta
    finish_reason: FinishReason | None = None


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
            prompt_logprobs=prompt, finish_reason=self.finish_reason)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a caller's callback; one that raises aborts this row only, never the batch."""
        try:
            return fn(*args)
        except Exception:
            logger.exception("callback %s failed; aborting its row", getattr(fn, "__name__", fn))
            self.aborted = True
            return None
