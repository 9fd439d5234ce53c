"""Log-probabilities of tokens under the model, for rows that ask for them (both loops).

A token's logprob is the log-softmax of the raw logits at its position, in float32: before
penalties, the eos ban of ignore_eos, temperature, top-k and top-p, as vLLM reports by default.
So a value says what the model thinks of the token, whatever the row's sampling did with it,
and the same text scores the same under any sampling parameters. The chosen token always gets
its own value, even when it is not among the `top` most likely.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.engine.interface import TokenLogprob


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                   tops: Sequence[int]) -> list[TokenLogprob]:
    """Each row's token's logprob and its `tops[i]` most likely tokens; logits [n, vocab],
    tokens [n] on the same device. One copy to the host."""
    if not len(tops):
        return []
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens.view(-1, 1).to(logp.device))[:, 0]
    k = min(max(tops), logp.shape[-1])
    if k > 0:
        values, ids = logp.topk(k, dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    else:
        top_values = top_ids = [[] for _ in tops]
    out = []
    for token, value, n, row_ids, row_values in zip(tokens.tolist(), chosen.tolist(), tops,
                                                    top_ids, top_values, strict=True):
        out.append(TokenLogprob(int(token), float(value),
                                tuple(zip(row_ids[:n], row_values[:n], strict=True))))
    return out


def scoring_span(text_span: tuple[int, int]) -> tuple[int, int]:
    """The positions whose logits score the text's tokens [start, end): position q predicts
    the token at q + 1, and a token at position 0 has nothing before it (no logprob)."""
    start, end = text_span
    return max(start - 1, 0), max(end - 1, 0)
