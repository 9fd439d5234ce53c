"""The generation core: one `model.generate` call for a batch of rows with per-row parameters.

The runtime (scheduler thread, prompt cache) calls run_batch with rows whose soft prompts are
already on the model's device and dtype. Each row's greedy output equals PEFT's output for that
request run alone; each row's sampled output depends only on its own seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteriaList,
)

from server.engine.batch import RowInput, build_batch_inputs
from server.engine.rows import (
    ABORTED,
    BatchRow,
    InvalidRowError,
    RowOutput,
    RowProgress,
    aborted_before_start,
    eos_ids_of,
    invalid_rows,
    row_output,
)
from server.engine.sampling import PerRowLogitsProcessor
from server.engine.static_extras import PenaltiesAndLogprobs, prompt_logprobs
from server.engine.stopping import RowStoppingCriteria

logger = logging.getLogger(__name__)


def run_batch(model: Any, tokenizer: Any, rows: list[BatchRow], *,
              after_step: Callable[[], None] | None = None) -> list[RowOutput]:
    """One model.generate call for all rows, under torch.inference_mode().

    Returns one RowOutput per row, in order. An invalid row (empty prompt without soft prompt,
    out-of-range parameters) is not computed: its output carries the ValueError, and the other
    rows run. Model errors propagate and fail the whole batch. `after_step` runs after each
    step's tokens were handed to the rows. Must not run concurrently on the same model: it
    swaps model.generation_config for the duration of the call (see
    _neutral_generation_config).
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
        states = [RowProgress(r, eos_ids) for r in live_rows]
        finished = [False] * len(states)
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
                    states, finished, after_step=after_step,
                    logprobs=extras.logprobs if extras.needed else None)]),
            )

    for i, state in zip(live, states, strict=True):
        if not state.aborted and state.finish_reason is None:
            # cannot happen: generate runs to the longest row
            raise RuntimeError(f"row {i} ended without a finish reason")
        outputs[i] = row_output(state)
    return outputs


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
