"""Per-row stopping inside `generate` (static batching), as one StoppingCriteria.

generate calls a StoppingCriteria once per step with all ids so far; transformers accepts a
per-row bool tensor back, so each row stops on its own max_new_tokens, eos or abort (a stop
string aborts a row from the frontend, server.engine.output_processor). This is also the only
place that sees every new token on the host, so it hands each row its token. Finished rows are
skipped (generate keeps padding them until the whole batch is done).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria

from server.engine.interface import TokenLogprob
from server.engine.rows import RowProgress


class RowStoppingCriteria(StoppingCriteria):
    """Feeds each step's new token to its RowProgress; returns which rows are finished.

    `finished` is the same list the logits processor reads, so a row finished at step t is
    skipped by the processor from step t+1 on.
    """

    def __init__(self, states: Sequence[RowProgress], finished: list[bool], *,
                 logprobs: Callable[[list[int]], dict[int, TokenLogprob]] | None = None,
                 after_step: Callable[[], None] | None = None) -> None:
        self._states = states
        self._finished = finished
        self._logprobs = logprobs  # this step's logprobs by row, from the new tokens
        self._after_step = after_step  # once per step, after every row had its token

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
        if self._after_step is not None:
            self._after_step()
        return torch.tensor(self._finished, dtype=torch.bool, device=input_ids.device)
