"""Penalties and logprobs inside `generate`, for static batching (seq2seq models, BLOOM).

The engine core does both on its own device tensors (server.engine.penalties,
server.engine.logprobs); static batching runs `generate`, so they happen in a LogitsProcessor
placed before PerRowLogitsProcessor: it keeps a copy of the raw logits of the rows that asked
for logprobs (read back by the stopping criteria once the step's tokens are known) and
penalizes the logits of the rows that asked for penalties, from the ids generate has produced.
Prompt logprobs (decoder-only models only) are one forward over the prompt before generate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor

from server.engine.batch import RowInput, build_batch_inputs
from server.engine.interface import SamplingParams, TokenLogprob
from server.engine.logprobs import scoring_span, token_logprobs
from server.engine.penalties import apply_penalties, has_penalties, penalty_tensors
from server.engine.rows import BatchRow


class PenaltiesAndLogprobs(LogitsProcessor):
    """`finished` is the list the stopping criteria keeps (same row order)."""

    def __init__(self, params: Sequence[SamplingParams], prompts: Sequence[Sequence[int]], *,
                 finished: list[bool], vocab: int, device: torch.device) -> None:
        self._params = list(params)
        self._finished = finished
        self._vocab = vocab
        self._device = device
        self._start: int | None = None  # generate's ids before the first generated one
        self._penalized = [i for i, p in enumerate(params) if has_penalties(p)]
        self._logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        self._in_prompt = None
        if self._penalized:
            mask = torch.zeros(len(self._penalized), vocab, dtype=torch.bool)
            for j, i in enumerate(self._penalized):
                words = [t for t in prompts[i] if 0 <= t < vocab]
                mask[j, words] = True
            self._in_prompt = mask.to(device)
        self._raw: tuple[list[int], torch.Tensor] | None = None

    @property
    def needed(self) -> bool:
        return bool(self._penalized or self._logprob_rows)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._start is None:
            self._start = input_ids.shape[1]
        rows = [i for i in self._logprob_rows if not self._finished[i]]
        self._raw = None
        if rows:
            at = torch.tensor(rows, dtype=torch.long, device=scores.device)
            self._raw = rows, scores.index_select(0, at).float()
        live = [(j, i) for j, i in enumerate(self._penalized) if not self._finished[i]]
        if live:
            assert self._in_prompt is not None
            at = torch.tensor([i for _, i in live], dtype=torch.long, device=scores.device)
            generated = input_ids.index_select(0, at)[:, self._start:]
            counts = torch.zeros(len(live), scores.shape[-1], dtype=torch.int32,
                                 device=scores.device)
            counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=torch.int32))
            mask = self._in_prompt[torch.tensor([j for j, _ in live], device=scores.device)]
            penalized = apply_penalties(scores.index_select(0, at), counts, mask,
                                        *penalty_tensors([self._params[i] for _, i in live],
                                                         scores.device))
            scores = scores.float().index_copy(0, at, penalized)
        return scores

    def logprobs(self, new_tokens: Sequence[int]) -> dict[int, TokenLogprob]:
        """The logprobs of this step's tokens (by row) for the rows that asked."""
        if self._raw is None:
            return {}
        rows, raw = self._raw
        tokens = torch.tensor([new_tokens[i] for i in rows], dtype=torch.long)
        values = token_logprobs(raw, tokens, [self._params[i].logprobs or 0 for i in rows])
        return dict(zip(rows, values, strict=True))


def prompt_logprobs(model: Any, row: BatchRow) -> list[TokenLogprob | None]:
    """The logprobs of the text's tokens of one decoder-only row (`text_span` counts its soft
    prompt's rows first, as ids or as `prompt_embeds`): one forward over the row alone."""
    lo, hi = scoring_span(row.text_span)
    top = row.params.prompt_logprobs or 0
    out: list[TokenLogprob | None] = [None] if row.text_span[0] == 0 < row.text_span[1] else []
    if lo >= hi:
        return out
    inputs = build_batch_inputs(model.get_input_embeddings(),
                                [RowInput(row.prompt_ids, row.prompt_embeds)])
    logits = model(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                   use_cache=False, return_dict=True).logits[0, lo:hi]
    soft = 0 if row.prompt_embeds is None else row.prompt_embeds.shape[0]
    ids = [-1] * soft + list(row.prompt_ids)
    targets = torch.tensor(ids[lo + 1:hi + 1], dtype=torch.long, device=logits.device)
    return out + token_logprobs(logits, targets, [top] * (hi - lo))
