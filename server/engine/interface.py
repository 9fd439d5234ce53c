"""What the HTTP layer sees of the engine: validated requests in, results or token streams out.

The API layer tokenizes and checks limits once, at the edge, and hands the engine a
GenerationRequest; it never touches the model, tensors or the adapter store directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from adapters_store.records import AdapterRecord


class FinishReason(StrEnum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # Penalties, per row: OpenAI's presence and frequency penalties subtract from the logits
    # of tokens the row has generated (once, and once per occurrence); the repetition penalty
    # (as in transformers and vLLM) divides positive logits and multiplies negative ones of
    # every token in the prompt or generated. 0, 0 and 1 are off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # Log-probabilities of each generated token and of the `logprobs` most likely at that
    # step (None: none); `prompt_logprobs`: the same for each token of the prompt's text.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # vLLM's extensions. Until `min_tokens` new tokens exist, the end-of-sequence ids and
    # `stop_token_ids` are masked and stop strings are not looked for, so nothing ends the
    # output sooner (max_new_tokens aside). A stop token ends the output as an eos does (its
    # id is the last one). `ignore_eos` only keeps eos from ending it: eos may be drawn.
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    # Text only (the frontend's): keep the stop string, or the ending eos / stop token's
    # text, at the end of the text; and whether special tokens' text is left out.
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True


@dataclass(frozen=True)
class GenerationRequest:
    """A request already validated and tokenized at the edge."""

    request_id: str
    prompt_ids: tuple[int, ...]
    adapter_id: str | None  # None: the bare base model
    namespace: str = "default"  # the tenant owning adapter_id
    params: SamplingParams = field(default_factory=SamplingParams)
    # params.max_new_tokens is a bound: the engine lowers it to what the model's context
    # leaves after the prompt, the adapter's virtual tokens and its template's anchors.
    fit_context: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (log-softmax of the raw logits, in float32,
    before penalties, temperature, top-k and top-p), and the `top` most likely tokens at the
    same position with theirs, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenChunk:
    """Streamed piece of output: new token ids and the text they complete."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token id, when asked
    # The prompt's, when asked, in a row's first chunk (see GenerationResult).
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    prompt_tokens: int = 0  # as GenerationResult's, so a chunk can carry usage so far


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    adapter_id: str | None
    text: str  # generated part only, stop string excluded
    token_ids: tuple[int, ...]  # generated ids
    finish_reason: FinishReason
    prompt_tokens: int
    virtual_tokens: int
    completion_tokens: int
    # Positions of the prompt (virtual tokens included) whose keys and values were reused
    # from the prefix cache rather than computed.
    cached_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per generated id, when asked
    # One per token of the prompt's text, when asked; None for a token nothing precedes.
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@dataclass(frozen=True)
class AdapterUpload:
    """An upload as it arrived, spooled to disk by the edge (size limits already enforced there).

    Either config_path + weights_path (weights_name tells .safetensors from .bin), or
    archive_path + archive_name (.tar.gz/.tgz/.zip).
    """

    config_path: str | None = None
    weights_path: str | None = None
    weights_name: str | None = None
    archive_path: str | None = None
    archive_name: str | None = None
    # A P-tuning template placing the rows around the text (adapters_store.template); None:
    # the rows before the text.
    template: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    name: str  # what --model said, e.g. "builtin:tiny"
    architecture: str  # e.g. "LlamaForCausalLM"
    is_seq2seq: bool
    hidden_size: int
    device: str
    dtype: str
    max_context: int  # max prompt + virtual + new tokens the model can attend to
    vocab_size: int = 0  # token ids the model embeds; the bound on top_k (0: unknown)


@dataclass(frozen=True)
class EngineProgress:
    """Whether the engine is moving, for readiness: `waiting` requests are queued or running,
    and for `stalled_s` seconds the engine has shown no progress on them (0 while nothing
    waits, or while it waits for work it does not have yet). server.engine.heartbeat keeps it."""

    waiting: int
    stalled_s: float

    def stalled(self, bound_s: float) -> bool:
        """Stuck: work waits and nothing has moved for longer than `bound_s` (0: never)."""
        return bound_s > 0 and self.waiting > 0 and self.stalled_s > bound_s


class EngineClient(Protocol):
    """The one interface server.api uses. Errors are raised as the engine's/store's types."""

    model_info: ModelInfo

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...

    def detokenize(self, token_ids: list[int], *, skip_special_tokens: bool = True) -> str: ...

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for, even when they are part of one character (its text
        alone would be U+FFFD): what chat logprobs' `bytes` report."""
        ...

    def apply_chat_template(self, messages: list[dict[str, str]], *,
                            add_generation_prompt: bool = True,
                            add_special_tokens: bool = False) -> list[int]:
        """Chat messages rendered by the tokenizer's chat template with (by default) the
        generation prompt, as ids (no special tokens added beyond what the template writes,
        unless `add_special_tokens`, as vLLM's chat option does). Raises
        ChatTemplateError (an InvalidRequestError) when there is no template."""
        ...

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Raises AdapterNotFoundError, QueueFullError, EngineNotReadyError, GenerationError."""
        ...

    async def open_stream(
        self, request: GenerationRequest
    ) -> AsyncIterator[TokenChunk | GenerationResult]:
        """Submits now (errors before the first token raise here), then yields TokenChunks and
        exactly one GenerationResult. Closing the iterator aborts."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def add_adapter(
        self, namespace: str, adapter_id: str, upload: AdapterUpload, *, overwrite: bool = False
    ) -> AdapterRecord: ...

    async def get_adapter(self, namespace: str, adapter_id: str) -> AdapterRecord: ...

    async def list_adapters(self, namespace: str | None) -> list[AdapterRecord]: ...

    async def delete_adapter(self, namespace: str, adapter_id: str) -> None: ...

    def is_ready(self) -> bool:
        """Model loaded, store reachable, engine thread alive, and not stalled: no work has
        waited longer than --engine-stall-timeout-s without the engine making progress. An
        engine that can say how long it has been stalled also offers
        `progress() -> EngineProgress` (server.engine.remote does)."""
        ...

    def begin_drain(self) -> None:
        """The server stopped taking requests: work waiting for batch mates starts now."""
        ...

    def stats(self) -> dict[str, float]:
        """Gauges for /metrics: queue_depth, in_flight, cache_resident_adapters, cache_bytes, ..."""
        ...

    def tenant_stats(self) -> dict[str, dict[str, int]]:
        """Requests per tenant (namespace) and state, "queued" or "running" (parked rows
        included), for /metrics: who fills the queue and who holds the batch."""
        ...
