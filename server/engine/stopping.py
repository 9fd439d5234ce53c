"""Per-row stopping, token recording and streaming, as one StoppingCriteria inside `generate`.

generate calls a StoppingCriteria once per step with all ids so far; transformers accepts a
per-row bool tensor back, so each row stops on its own max_new_tokens, eos, stop strings or
abort. This is also the only place that sees every new token on the host, so it records them
and emits streaming chunks. Finished rows are skipped (generate keeps padding them until the
whole batch is done).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import StoppingCriteria

from server.engine.detokenizer import IncrementalDetokenizer, StopStringFilter
from server.engine.interface import FinishReason, TokenChunk, TokenLogprob

if TYPE_CHECKING:
    from server.engine.generation import BatchRow

logger = logging.getLogger(__name__)


class RowState:
    """One row's progress: generated ids, streamed text, and why it finished."""

    def __init__(self, row: BatchRow, tokenizer: Any, eos_ids: frozenset[int]) -> None:
        self.row = row
        self.token_ids: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.aborted = False
        self.error: Exception | None = None  # set by fail(): this row alone failed
        self._eos = frozenset() if row.params.ignore_eos else eos_ids
        self._pending: list[int] = []  # ids not yet handed out in a chunk
        # Per generated id, when the row asked for logprobs; the prompt's, when it asked.
        self.logprobs: list[TokenLogprob] | None = (
            None if row.params.logprobs is None else [])
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self._sent_logprobs = 0
        self._sent_prompt = False
        # Text is tracked per token only where someone needs it before the end.
        self.tracks_text = bool(row.on_chunk is not None or any(row.params.stop))
        self._detok = IncrementalDetokenizer(tokenizer) if self.tracks_text else None
        self._filter = StopStringFilter(row.params.stop) if self.tracks_text else None

    @property
    def done(self) -> bool:
        return self.aborted or self.finish_reason is not None

    @property
    def text(self) -> str | None:
        """The final text when tracked per token; None means: decode token_ids at the end."""
        return self._filter.text if self._filter is not None else None

    def fail(self, error: Exception) -> None:
        """This row cannot go on (its sampling failed); it leaves at its next step, with the
        error, while its batch mates continue."""
        self.error = error
        self.aborted = True

    def step(self, token_id: int, logprob: TokenLogprob | None = None) -> None:
        """Take this step's token (and its logprob, when the row asked for them); decide
        whether the row is finished."""
        row = self.row
        if not self.token_ids and row.on_first_token is not None:
            self._call(row.on_first_token)
        if row.is_aborted is not None and self._call(row.is_aborted):
            self.aborted = True
        if self.aborted:
            return
        self.token_ids.append(token_id)
        self._pending.append(token_id)
        if self.logprobs is not None:
            if logprob is None:
                raise RuntimeError("a row that asked for logprobs got a token without one")
            self.logprobs.append(logprob)

        if token_id in self._eos:
            self._finish(FinishReason.EOS)
            return
        if self._detok is not None and self._filter is not None:
            released, stopped = self._filter.feed(self._detok.push(token_id))
            if stopped:
                self._finish(FinishReason.STOP, released)
                return
            # The first token leaves at once, even while its text is held (a partial
            # character, a possible stop string): a stream's first event is its first token.
            if released or len(self.token_ids) == 1:
                self._emit(released)
        if len(self.token_ids) >= row.params.max_new_tokens:
            self._finish(FinishReason.LENGTH)

    def _finish(self, reason: FinishReason, released: str = "") -> None:
        if reason is not FinishReason.STOP and self._detok is not None and self._filter is not None:
            # A partial character or a held stop-string prefix is final text now.
            more, stopped = self._filter.feed(self._detok.flush())
            released += more
            if stopped:
                reason = FinishReason.STOP
            else:
                released += self._filter.flush()
        self.finish_reason = reason
        if self._pending or released:
            self._emit(released)

    def _emit(self, text: str) -> None:
        if self.row.on_chunk is None:
            self._pending.clear()
            return
        logprobs = None
        if self.logprobs is not None:
            logprobs = tuple(self.logprobs[self._sent_logprobs:])
            self._sent_logprobs = len(self.logprobs)
        prompt = None
        if self.prompt_logprobs is not None and not self._sent_prompt:
            prompt, self._sent_prompt = tuple(self.prompt_logprobs), True
        chunk = TokenChunk(token_ids=tuple(self._pending), text=text, logprobs=logprobs,
                           prompt_logprobs=prompt)
        self._pending.clear()
        self._call(self.row.on_chunk, chunk)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a caller's callback; one that raises aborts this row only, never the batch."""
        try:
            return fn(*args)
        except Exception:
            logger.exception("callback %s failed; aborting its row", getattr(fn, "__name__", fn))
            self.aborted = True
            return None


class RowStoppingCriteria(StoppingCriteria):
    """Feeds each step's new token to its RowState; returns which rows are finished.

    `finished` is the same list the logits processor reads, so a row finished at step t is
    skipped by the processor from step t+1 on.
    """

    def __init__(self, states: Sequence[RowState], finished: list[bool], *,
                 on_done: Callable[[RowState], None] | None = None,
                 logprobs: Callable[[list[int]], dict[int, TokenLogprob]] | None = None,
                 ) -> None:
        self._states = states
        self._finished = finished
        self._on_done = on_done  # once per row, at the step it finished or was aborted
        self._logprobs = logprobs  # this step's logprobs by row, from the new tokens

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs: Any
    ) -> torch.BoolTensor:
        # input_ids: [batch, generated so far] (decoder ids for seq2seq); the last is new.
        new_tokens = input_ids[:, -1].tolist()
        logprobs = self._logprobs(new_tokens) if self._logprobs is not None else {}
        for i, state in enumerate(self._states):
            if not self._finished[i]:
                state.step(new_tokens[i], logprobs.get(i))
                self._finished[i] = state.done
                if state.done and self._on_done is not None:
                    self._on_done(state)
        return torch.tensor(self._finished, dtype=torch.bool, device=input_ids.device)
