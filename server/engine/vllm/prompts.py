"""A request as vLLM takes it: one prompt in the mixed form, and its SamplingParams; vLLM's
outputs back as the deltas the frontend reads.

The mixed form gives vLLM every position's token id and says which positions are embeddings:
the text and the template's anchors are token ids (vLLM embeds them itself, exactly as the
model does), the adapter's rows are embeddings at the positions the template puts them. Being
token ids, the text's positions count for the repetition penalty and can be scored (echo,
prompt logprobs); the soft rows' positions carry a placeholder id that no penalty counts (the
embedding's size, one past the last row). The embeddings tensor is built in one piece with the
rows copied in place; its other rows are zeros (vLLM reads them for the prefix cache's key
only, so zeros keep equal requests equal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from server.engine.errors import InvalidRequestError
from server.engine.interface import FinishReason, SamplingParams, TokenLogprob
from server.engine.prompt_layout import Layout, assemble, text_start
from server.engine.rows import RowDelta


@dataclass(frozen=True)
class CompiledPrompt:
    token_ids: list[int]  # every position; soft rows' positions hold the placeholder
    is_token: list[bool]  # False where the position is a soft row
    soft_at: list[int]  # the positions of the soft rows, in row order
    text_span: tuple[int, int]  # where the request's text lies, [start, end)


def compile_prompt(text_ids: Sequence[int], virtual: int, layout: Layout | None, *,
                   placeholder: int) -> CompiledPrompt:
    """Rows before the text (no template), or rows, anchors and text in template order: the
    layout is assembled as for the built-in engine, with each row's position marked by a
    negative id (-1 - row) that the placeholder then replaces."""
    markers = [-1 - row for row in range(virtual)]
    if layout is None:
        marked, start = [*markers, *text_ids], virtual
    else:
        marked, start = assemble(layout, markers, text_ids), text_start(layout)
    soft_at = sorted((i for i, t in enumerate(marked) if t < 0), key=lambda i: -marked[i])
    return CompiledPrompt([placeholder if t < 0 else t for t in marked],
                          [t >= 0 for t in marked], soft_at, (start, start + len(text_ids)))


def vllm_prompt(compiled: CompiledPrompt, rows: torch.Tensor | None, *,
                cache_salt: str) -> Any:
    """The engine input: token ids alone for the bare model, else the mixed form.
    `rows`: [virtual, hidden] float32 on the CPU."""
    from vllm.inputs import embeds_input, tokens_input

    if rows is None:
        return tokens_input(list(compiled.token_ids), cache_salt=cache_salt)
    embeds = torch.zeros(len(compiled.token_ids), rows.shape[1], dtype=rows.dtype)
    embeds.index_copy_(0, torch.tensor(compiled.soft_at, dtype=torch.long), rows)
    return embeds_input(embeds, prompt_token_ids=list(compiled.token_ids),
                        is_token_ids=list(compiled.is_token), cache_salt=cache_salt)


# Our parameters that vLLM does not take under the same name and meaning: every other field
# of SamplingParams goes to vLLM as it is, so a new one reaches vLLM without an edit here (and
# one vLLM lacks fails its first request, and the test that builds every field, loudly).
_TRANSLATED = frozenset({
    "max_new_tokens", "seed", "stop_token_ids",  # as max_tokens, the row's seed, a list
    "stop", "include_stop_str_in_output", "skip_special_tokens",  # text: the frontend's
})


def sampling_params(params: SamplingParams, *, seed: int | None) -> Any:
    """Our parameters as vLLM's. Text is ours (stop strings, detokenizing, special tokens'
    text), so vLLM returns ids only; what ends a row on ids is vLLM's, with the same meaning
    as the built-in engine's: its end-of-sequence ids (which `ignore_eos` keeps from ending
    the row, still drawable), `stop_token_ids`, and `min_tokens` masking both until then."""
    from vllm import SamplingParams as VllmParams
    from vllm.sampling_params import RequestOutputKind

    same = {f.name: getattr(params, f.name) for f in fields(params)
            if f.name not in _TRANSLATED}
    return VllmParams(
        n=1, max_tokens=params.max_new_tokens, seed=seed,
        stop_token_ids=list(params.stop_token_ids), detokenize=False,
        skip_special_tokens=False, output_kind=RequestOutputKind.DELTA, **same)


def refuse_unsupported(params: SamplingParams, *, virtual: int) -> None:
    """What the vLLM engine cannot serve as defined is refused, never served differently.
    Scoring the prompt needs the soft rows' positions to hold an id vLLM can score, and the
    repetition penalty would then count that id as a prompt token."""
    if virtual and params.prompt_logprobs is not None and params.repetition_penalty != 1.0:
        raise InvalidRequestError(
            "the vllm engine cannot combine prompt logprobs (echo) with repetition_penalty on "
            "an adapter's request; drop one of them, or serve with --engine builtin")


def placeholder_for(params: SamplingParams, vocab_size: int) -> int:
    """The soft rows' token id: one past the embedding, which no penalty counts; 0 where the
    prompt is scored (vLLM scores every position, and cannot score an id it has no logit
    for; those positions' scores are dropped)."""
    return 0 if params.prompt_logprobs is not None else vocab_size


def to_delta(output: Any, *, params: SamplingParams, compiled: CompiledPrompt,
             first: bool) -> RowDelta:
    """One vLLM RequestOutput (DELTA kind) as a RowDelta."""
    completion = output.outputs[0]
    ids = tuple(int(t) for t in completion.token_ids)
    logprobs = None
    if params.logprobs is not None:
        logprobs = tuple(_token_logprob(t, step, params.logprobs)
                         for t, step in zip(ids, completion.logprobs or (), strict=True))
    prompt = None
    if first and params.prompt_logprobs is not None:
        prompt = _prompt_logprobs(output.prompt_logprobs or (), compiled,
                                  params.prompt_logprobs)
    reason = None
    if completion.finish_reason == "length":
        reason = FinishReason.LENGTH
    elif completion.finish_reason == "stop":
        reason = FinishReason.EOS
    cached = None
    if first:  # vLLM counts whole cached blocks, the soft rows' and the text's alike
        cached = int(getattr(output, "num_cached_tokens", None) or 0)
    return RowDelta(token_ids=ids, logprobs=logprobs, prompt_logprobs=prompt,
                    finish_reason=reason, cached_tokens=cached)


def _token_logprob(token: int, step: Any, k: int) -> TokenLogprob:
    """vLLM gives the drawn token's score and the k best, each with its rank."""
    chosen = step[token]
    top = sorted(((int(t), lp) for t, lp in step.items()
                  if lp.rank is not None and lp.rank <= k), key=lambda item: item[1].rank)
    return TokenLogprob(token_id=token, logprob=float(chosen.logprob),
                        top=tuple((t, float(lp.logprob)) for t, lp in top[:k]))


def _prompt_logprobs(scores: Sequence[Any], compiled: CompiledPrompt,
                     k: int) -> tuple[TokenLogprob | None, ...]:
    """The text's positions only; a position nothing precedes has none."""
    out: list[TokenLogprob | None] = []
    for position in range(*compiled.text_span):
        step = scores[position] if position < len(scores) else None
        if step is None or position == 0:
            out.append(None)
        else:
            out.append(_token_logprob(compiled.token_ids[position], step, k))
    return tuple(out)
