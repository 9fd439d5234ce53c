"""Pydantic request/response bodies of the HTTP contract in DESIGN.md (the boundary only).

An unknown field in a generate request is a 422 naming it (with the field it probably meant):
ignored, a typo such as `max_tokens` would silently do nothing. Limits that depend on Settings
(max_new_tokens_limit, max_stop_strings, max_input_tokens) are checked in the handlers, which
know the settings.

Request values are strict: a boolean is not an integer and a string is not a number (a float
field still takes a JSON integer), and text is server.api.text's TokenizableText.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from server.api.text import TokenizableText
from server.engine.interface import FinishReason, GenerationResult, TokenLogprob
from server.engine.sampling_limits import MAX_LOGPROBS, MAX_PENALTY, MAX_REPETITION_PENALTY

ADAPTER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MAX_STOP_CHARS = 256  # one stop string
MAX_SEED = 2**63 - 1  # seeds go into int64 tensors: nothing larger fits
# The largest integer any count or size field may hold: the engine keeps them in int32 tensors
# (lengths, top-k widths). Tighter limits (quotas, the vocabulary) are checked in the handlers.
MAX_INT = 2**31 - 1
# Other APIs' names for generate's fields: the likeliest typos are a neighbour's spelling.
_KNOWN_ELSEWHERE = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                    "prompt": "text", "input": "text", "inputs": "text", "model": "adapter_id",
                    "adapter": "adapter_id", "stop_sequences": "stop"}


def unknown_fields_message(fields: list[str], known: list[str]) -> str:
    """'unknown field 'x' (did you mean 'y'?)' for each, then what the fields are."""
    parts = []
    for name in fields:
        guess = _KNOWN_ELSEWHERE.get(name) or next(
            iter(difflib.get_close_matches(name, known, n=1, cutoff=0.6)), None)
        parts.append(f"{name!r}" + (f" (did you mean {guess!r}?)" if guess in known else ""))
    return (f"unknown field{'s' if len(parts) > 1 else ''} {', '.join(parts)}; "
            f"the fields are {', '.join(known)}")


class GenerateRequest(BaseModel):
    # JSON's 1e999 parses as infinity: a float field must be finite to be meaningful.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    adapter_id: str | None = Field(
        None, pattern=ADAPTER_ID_PATTERN,
        description="Adapter to prepend; null or absent means the bare base model.")
    text: TokenizableText = Field(..., description="Prompt, tokenized with the tokenizer's "
                                  "defaults.")
    max_new_tokens: int = Field(16, ge=1, le=MAX_INT,
                                description="At most --max-new-tokens-limit.")
    temperature: float = Field(0.0, ge=0.0, description="0 is greedy; finite.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=MAX_INT,
                       description="0 disables top-k; at most the vocabulary size.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="For reproducible sampling.")
    stop: list[TokenizableText] = Field(default_factory=list, description="Stop strings (at "
                                        "most --max-stop-strings).")
    ignore_eos: bool = Field(False, description="Keep generating to max_new_tokens.")
    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY,
                                    description="Lowers the logits of tokens already "
                                    "generated, once each (OpenAI's).")
    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY,
                                     description="Lowers the logits of tokens already "
                                     "generated, once per occurrence (OpenAI's).")
    repetition_penalty: float = Field(1.0, gt=0.0, le=MAX_REPETITION_PENALTY,
                                      description="Divides the positive logits of prompt and "
                                      "generated tokens and multiplies the negative ones "
                                      "(transformers' and vLLM's); 1 is off.")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="Each generated token's log-probability and the "
                                 f"N most likely at its position (0-{MAX_LOGPROBS}).")
    stream: bool = Field(False, description="Server-Sent Events instead of one JSON body.")

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                raise ValueError(unknown_fields_message(unknown, list(cls.model_fields)))
        return data


class Usage(BaseModel):
    prompt_tokens: int
    virtual_tokens: int
    completion_tokens: int
    cached_tokens: int = Field(0, description=(
        "Prompt positions (virtual tokens included) whose keys and values came from the prefix "
        "cache instead of being computed."))


class TopToken(BaseModel):
    token_id: int
    logprob: float


class TokenLogprobOut(TopToken):
    """A generated token's log-probability under the model (log-softmax of the raw logits in
    float32, before penalties and sampling) and the most likely tokens at its position."""

    top: list[TopToken]


LOGPROB_FLOOR = -9999.0  # JSON has no -Infinity; OpenAI writes this instead


def json_logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def logprobs_out(values: tuple[TokenLogprob, ...] | None) -> list[dict] | None:
    """As JSON (values below LOGPROB_FLOOR are the floor)."""
    if values is None:
        return None
    return [{"token_id": v.token_id, "logprob": json_logprob(v.logprob),
             "top": [{"token_id": t, "logprob": json_logprob(lp)} for t, lp in v.top]}
            for v in values]


class GenerateResponse(BaseModel):
    adapter_id: str | None
    text: str = Field(..., description="Generated part only.")
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    logprobs: list[TokenLogprobOut] | None = Field(
        None, description="Only with `logprobs` in the request: one per token id.")

    @model_serializer(mode="wrap")
    def _drop_absent_logprobs(self, handler: SerializerFunctionWrapHandler) -> dict:
        data = handler(self)
        if data.get("logprobs") is None:
            data.pop("logprobs", None)
        return data

    @classmethod
    def from_result(cls, result: GenerationResult) -> GenerateResponse:
        return cls(adapter_id=result.adapter_id, text=result.text,
                   token_ids=list(result.token_ids), finish_reason=result.finish_reason,
                   usage=usage_of(result), logprobs=logprobs_out(result.logprobs))


class StreamEvent(BaseModel):
    """One SSE `data:` event. Token events carry text/token_ids with finish_reason null; the
    final event carries finish_reason and usage (and any text not streamed yet)."""

    adapter_id: str | None
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprobOut] | None = Field(
        None, description="Only with `logprobs` in the request: one per token id of the event.")


def usage_of(result: GenerationResult) -> Usage:
    return Usage(prompt_tokens=result.prompt_tokens, virtual_tokens=result.virtual_tokens,
                 completion_tokens=result.completion_tokens, cached_tokens=result.cached_tokens)


class AdapterResponse(BaseModel):
    """The adapter record (DESIGN.md); `tenant` only in an admin's list of every tenant."""

    adapter_id: str
    peft_type: str
    task_type: str
    num_virtual_tokens: int
    token_dim: int
    sha256: str
    size_bytes: int
    created_at: str
    template: str | None = Field(None, description="The P-tuning template placing the rows "
                                 "around the text; null: the rows before the text.")
    tenant: str | None = None

    @model_serializer(mode="wrap")
    def _drop_absent_tenant(self, handler: SerializerFunctionWrapHandler) -> dict:
        """`template` is always there (null when absent); `tenant` only in an admin's list."""
        data = handler(self)
        if data.get("tenant") is None:
            data.pop("tenant", None)
        return data

    @classmethod
    def from_record(cls, record: object, *, with_tenant: bool = False) -> AdapterResponse:
        """From an adapters_store AdapterRecord (typed loosely: server.api does not import it)."""
        data = record.to_dict()  # type: ignore[attr-defined]
        fields = {k: data[k] for k in cls.model_fields if k in data and k != "tenant"}
        return cls(**fields, tenant=data["namespace"] if with_tenant else None)


class AdapterListResponse(BaseModel):
    adapters: list[AdapterResponse]


class HealthResponse(BaseModel):
    status: str
