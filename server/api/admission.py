"""What a generating request must pass before it reaches the engine: the limits that depend on
the settings and the tenant's quotas, tokenizing within them, and admission (the tenant's rate
token and concurrency lease). Used by /v1/generate and the OpenAI routes alike."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from fastapi import Request

from server.api.deps import get_access
from server.api.errors import InvalidRequestError
from server.api.off_loop import off_loop
from server.api.quotas import Lease, Quotas, check_generation, quotas_for
from server.api.schemas import MAX_STOP_CHARS
from server.config import Settings
from server.engine.interface import EngineClient, GenerationRequest, SamplingParams


def check_params(params: SamplingParams, *, settings: Settings, quotas: Quotas,
                 vocab_size: int, top_k_field: str = "top_k") -> None:
    """Limits on the sampling parameters (before any tokenizing work is spent)."""
    check_generation(quotas, max_new_tokens=params.max_new_tokens, input_tokens=None)
    if vocab_size and params.top_k > vocab_size:
        raise InvalidRequestError(f"{top_k_field}={params.top_k} is larger than the model's "
                                  f"vocabulary of {vocab_size} tokens; use 0 to turn top-k "
                                  "off")
    if len(params.stop) > settings.max_stop_strings:
        raise InvalidRequestError(f"{len(params.stop)} stop strings; at most "
                                  f"{settings.max_stop_strings}")
    if any(not s or len(s) > MAX_STOP_CHARS for s in params.stop):
        raise InvalidRequestError(f"stop strings must be 1 to {MAX_STOP_CHARS} characters")


async def tokenize_text(engine: EngineClient, text: str, *, quotas: Quotas,
                        max_new_tokens: int, add_special_tokens: bool = True) -> list[int]:
    """Text tokenized with the tokenizer's defaults (special tokens added unless told not
    to), within the tenant's max_input_tokens."""
    return await tokenize_within(lambda: engine.tokenize(text,
                                                         add_special_tokens=add_special_tokens),
                                 chars=len(text),
                                 quotas=quotas, max_new_tokens=max_new_tokens)


async def tokenize_within(tokenize: Callable[[], list[int]], *, chars: int, quotas: Quotas,
                          max_new_tokens: int, items: int = 1) -> list[int]:
    """Run `tokenize` on a prompt of `chars` characters (in `items` messages), within the
    tenant's max_input_tokens; a large one on a worker thread, off the event loop."""
    # A cheap bound before tokenizing: no tokenizer makes fewer tokens than bytes / 64.
    if chars > 64 * quotas.max_input_tokens:
        raise InvalidRequestError(f"the prompt is longer than max_input_tokens="
                                  f"{quotas.max_input_tokens} tokens")
    prompt_ids = await off_loop(tokenize, chars=chars, messages=items)
    check_generation(quotas, max_new_tokens=max_new_tokens, input_tokens=len(prompt_ids))
    return prompt_ids


def to_engine_request(prompt_ids: list[int], *, adapter_id: str | None, namespace: str,
                      params: SamplingParams) -> GenerationRequest:
    if not prompt_ids and adapter_id is None:
        raise InvalidRequestError("the prompt tokenizes to no tokens and no adapter is given")
    return GenerationRequest(request_id=uuid.uuid4().hex, prompt_ids=tuple(prompt_ids),
                             adapter_id=adapter_id, namespace=namespace, params=params)


def admit(request: Request, namespace: str, quotas: Quotas,
          engine_request: GenerationRequest, *, stream: bool, sequences: int = 1) -> Lease:
    """Take the tenant's rate token and a concurrency slot per sequence (429 when over); fill
    the access log."""
    access = get_access(request)
    access.adapter_id, access.stream = engine_request.adapter_id, stream
    access.request_id = engine_request.request_id
    manager, _ = quotas_for(request, namespace)
    return manager.admit(namespace, quotas, slots=sequences)
