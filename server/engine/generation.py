"""The generation core: one `model.generate` call for a batch of rows with per-row parameters.

The runtime (scheduler thread, prompt cache) calls run_batch with rows whose soft prompts are
already on the model's device and dtype. Each row's greedy output equals PEFT's output for that
request run alone; each row's sampled output depends only on its own seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteriaList,
)

from server.engine.batch import RowInput, build_batch_inputs
from server.engine.detokenizer import DECODE_KWARGS
from server.engine.interface import FinishReason, SamplingParams, TokenChunk, TokenLogprob
from server.engine.sampling import PerRowLogitsProcessor, validate_params
from server.engine.static_extras import PenaltiesAndLogprobs, prompt_logprobs
from server.engine.stopping import RowState, RowStoppingCriteria

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchRow:
    prompt_ids: Sequence[int]
    # [num_virtual_tokens, hidden] on the model's device and dtype (seq2seq: only the first
    # num_virtual_tokens rows), or None for the bare model.
    prompt_embeds: torch.Tensor | None
    params: SamplingParams
    # Streaming: called from the generate loop with each new piece; text that could still be
    # the start of a stop string, or a partial character, is held back until it is decided.
    on_chunk: Callable[[TokenChunk], None] | None = None
    # Polled each step; an aborted row stops generating (its output is discarded by the caller).
    is_aborted: Callable[[], bool] | None = None
    # Called once when the row's first token exists (time-to-first-token metric).
    on_first_token: Callable[[], None] | None = None
    # Called once, from inside the generate loop, as soon as the row has finished (not when
    # aborted) with its final output: a short row's caller need not wait for the batch's
    # longest row. run_batch still returns the same output for it at the end.
    on_finish: Callable[[RowOutput], None] | None = None
    # Where the request's text lies in prompt_ids [start, end), for its prompt logprobs.
    text_span: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class RowOutput:
    # Generated ids: the eos id included when finish_reason is eos; for stop, up to and
    # including the token that completed the stop string.
    token_ids: tuple[int, ...]
    # Generated text: eos/special tokens, the stop string and anything after it excluded.
    text: str
    finish_reason: FinishReason
    # True when the row was aborted (is_aborted, or one of its callbacks raised) or failed;
    # its output is partial and finish_reason is meaningless.
    aborted: bool = False
    # Why this row alone failed (invalid parameters, its sampling raised); its batch mates
    # are unaffected. InvalidRowError: the row's own input was invalid.
    error: Exception | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None  # per generated id, when asked
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # per text token, when asked


ABORTED = RowOutput(token_ids=(), text="", finish_reason=FinishReason.LENGTH, aborted=True)


def run_batch(model: Any, tokenizer: Any, rows: list[BatchRow]) -> list[RowOutput]:
    """One model.generate call for all rows, under torch.inference_mode().

    Returns one RowOutput per row, in order. An invalid row (empty prompt without soft prompt,
    out-of-range parameters) is not computed: its output carries the ValueError, and the other
    rows run. Model errors propagate and fail the whole batch. Must not run concurrently on the
    same model: it swaps
    model.generation_config for the duration of the call (see _neutral_generation_config).
    """
    if not rows:
        return []
    invalid = invalid_rows(rows)

    # Rows aborted before the batch starts are not computed at all.
    live = [i for i, row in enumerate(rows)
            if i not in invalid and not aborted_before_start(row)]
    outputs = [invalid.get(i, ABORTED) for i in range(len(rows))]
    if not live:
        return outputs
    live_rows = [rows[i] for i in live]

    eos_ids = eos_ids_of(model, tokenizer)
    with torch.inference_mode():
        batch = build_batch_inputs(
            model.get_input_embeddings(),
            [RowInput(r.prompt_ids, r.prompt_embeds) for r in live_rows],
        )
        device = batch.inputs_embeds.device
        states = [RowState(r, tokenizer, eos_ids) for r in live_rows]
        finished = [False] * len(states)
        early: dict[int, RowOutput] = {}  # id(state) -> output handed out before the end

        def on_done(state: RowState) -> None:
            if state.aborted or state.row.on_finish is None:
                return
            output = final_output(state, tokenizer)
            early[id(state)] = output
            try:
                state.row.on_finish(output)
            except Exception:  # the row is finished either way; never fail the batch
                logger.exception("on_finish failed")

        seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        for i, (row, state) in enumerate(zip(live_rows, states, strict=True)):
            if row.params.prompt_logprobs is not None:
                if seq2seq:
                    state.fail(InvalidRowError("prompt logprobs need a decoder-only model: a "
                                               "seq2seq model's prompt is its encoder's input"))
                    finished[i] = True
                else:
                    state.prompt_logprobs = prompt_logprobs(model, row)
        extras = PenaltiesAndLogprobs(
            [r.params for r in live_rows], [r.prompt_ids for r in live_rows], finished=finished,
            vocab=int(model.get_input_embeddings().weight.shape[0]), device=device)
        processor = PerRowLogitsProcessor(
            [r.params for r in live_rows], eos_ids=sorted(eos_ids), finished=finished,
            device=device, on_error=lambda i, error: states[i].fail(error),
        )
        config = _generation_config(model, tokenizer, eos_ids,
                                    max(r.params.max_new_tokens for r in live_rows))
        with _neutral_generation_config(model, config):
            model.generate(
                inputs_embeds=batch.inputs_embeds,
                attention_mask=batch.attention_mask,
                generation_config=config,
                logits_processor=LogitsProcessorList(
                    [extras, processor] if extras.needed else [processor]),
                stopping_criteria=StoppingCriteriaList([RowStoppingCriteria(
                    states, finished, on_done=on_done,
                    logprobs=extras.logprobs if extras.needed else None)]),
            )

    untracked = [s for s in states if s.text is None and not s.aborted and id(s) not in early]
    decoded: dict[int, str] = {}
    if untracked:  # batch_decode([]) is not an empty list
        texts = tokenizer.batch_decode([_text_ids(s) for s in untracked], **DECODE_KWARGS)
        decoded = dict(zip(map(id, untracked), texts, strict=True))
    for i, state in zip(live, states, strict=True):
        if state.aborted:
            outputs[i] = aborted_output(state)
            continue
        if state.finish_reason is None:  # cannot happen: generate runs to the longest row
            raise RuntimeError(f"row {i} ended without a finish reason")
        if id(state) in early:
            outputs[i] = early[id(state)]
            continue
        text = state.text if state.text is not None else decoded[id(state)]
        outputs[i] = finished_output(state, text)
    return outputs


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
            failed[i] = RowOutput((), "", FinishReason.LENGTH, aborted=True, error=error)
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


def aborted_output(state: RowState) -> RowOutput:
    """An aborted or failed row's partial output (its finish_reason is meaningless)."""
    return RowOutput(tuple(state.token_ids), state.text or "",
                     state.finish_reason or FinishReason.LENGTH, aborted=True,
                     error=state.error)


def final_output(state: RowState, tokenizer: Any) -> RowOutput:
    """A finished row's output, decoded now (the same text the end-of-batch decode gives)."""
    assert state.finish_reason is not None
    text = state.text
    if text is None:
        text = tokenizer.decode(_text_ids(state), **DECODE_KWARGS)
    return finished_output(state, text)


def finished_output(state: RowState, text: str) -> RowOutput:
    assert state.finish_reason is not None
    return RowOutput(tuple(state.token_ids), text, state.finish_reason,
                     logprobs=None if state.logprobs is None else tuple(state.logprobs),
                     prompt_logprobs=(None if state.prompt_logprobs is None
                                      else tuple(state.prompt_logprobs)))


def _text_ids(state: RowState) -> list[int]:
    """The ids whose text is the row's text: an eos id is dropped even if not a special token."""
    if state.finish_reason is FinishReason.EOS:
        return state.token_ids[:-1]
    return state.token_ids


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


def _generation_config(
    model: Any, tokenizer: Any, eos_ids: frozenset[int], max_new_tokens: int
) -> GenerationConfig:
    """Plain greedy decoding; eos handling, sampling and stopping are ours, per row.

    Nothing is inherited from the checkpoint's generation_config (sampling, penalties, forced or
    suppressed tokens): only the ids generate needs to start decoding.
    """
    original = getattr(model, "generation_config", None)

    def pick(name: str) -> Any:
        value = getattr(original, name, None)
        return value if value is not None else getattr(model.config, name, None)

    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = pick("pad_token_id")
    if pad is None:
        pad = min(eos_ids) if eos_ids else 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad,
        eos_token_id=None,
        bos_token_id=pick("bos_token_id"),
        decoder_start_token_id=pick("decoder_start_token_id"),
    )


@contextmanager
def _neutral_generation_config(model: Any, config: GenerationConfig) -> Iterator[None]:
    """Make `config` the model's generation_config for the duration of one generate call.

    transformers fills every field left None in the passed config from model.generation_config,
    and for several processors (forced_bos/eos, bad_words_ids, suppress_tokens, ...) None is the
    only neutral value, so passing a config alone cannot switch them off. The engine thread owns
    the model, so the swap is not observable by anyone else.
    """
    original = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = original
