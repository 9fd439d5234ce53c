"""The largest sampling parameters the engine accepts, where the HTTP schemas read them too,
and the check of a request's parameters against them.

Kept apart from the samplers (torch) so the HTTP layer, and the HTTP process of an engine in
its own process, can bound and check fields without loading them.
"""

from __future__ import annotations

import math

from server.engine.interface import SamplingParams

MAX_PENALTY = 2.0  # presence and frequency, as OpenAI
MAX_REPETITION_PENALTY = 10.0
MAX_LOGPROBS = 20  # most likely tokens reported per position, as OpenAI

# What the engine can represent: counts and seeds go into int64 tensors.
_MAX_INT = 2**31 - 1
_MAX_SEED = 2**63 - 1


def validate_params(params: SamplingParams, *, vocab_size: int = 0) -> None:
    """Reject values no processor could honour (the API validates first; this is the backstop
    that keeps one request's parameters from ever reaching a batch it would fail)."""
    if not 1 <= params.max_new_tokens <= _MAX_INT:
        raise ValueError(f"max_new_tokens must be in [1, {_MAX_INT}], got "
                         f"{params.max_new_tokens}")
    if not (math.isfinite(params.temperature) and params.temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0, got {params.temperature}")
    if not (math.isfinite(params.top_p) and 0 < params.top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    top_k_max = vocab_size or _MAX_INT
    if not 0 <= params.top_k <= top_k_max:
        raise ValueError(f"top_k must be in [0, {top_k_max}], got {params.top_k}")
    if params.seed is not None and not 0 <= params.seed <= _MAX_SEED:
        raise ValueError(f"seed must be in [0, {_MAX_SEED}], got {params.seed}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        if not (math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
            raise ValueError(f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {value}")
    if not (math.isfinite(params.repetition_penalty)
            and 0 < params.repetition_penalty <= MAX_REPETITION_PENALTY):
        raise ValueError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY}], got "
                         f"{params.repetition_penalty}")
    if not 0 <= params.min_tokens <= _MAX_INT:
        raise ValueError(f"min_tokens must be in [0, {_MAX_INT}], got {params.min_tokens}")
    id_max = vocab_size or _MAX_INT
    if any(not 0 <= t < id_max for t in params.stop_token_ids):
        raise ValueError(f"stop_token_ids must be in [0, {id_max}), got "
                         f"{list(params.stop_token_ids)}")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and not 0 <= value <= MAX_LOGPROBS:
            raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")
