"""Pydantic bodies of the OpenAI-compatible routes (the boundary only).

Requests are strict about fields (extra="forbid"): an argument we do not know would be
silently ignored otherwise, and a client that sends it expects it to change the output, so it
gets a 400 naming it, as OpenAI answers "Unrecognized request argument". Parameters OpenAI
defines but we do not implement are declared so that their no-op values pass (n=1,
echo=false, logit_bias={}, penalties 0, ...) and anything else is refused in
openai_routes.unsupported_params() with the parameter named.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.api.schemas import MAX_INT, MAX_SEED

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 256  # OpenAI's is "up to the context"; ours is bounded (README)
# Checked while the body is validated, before any message is rendered: a quarter of a million
# tiny messages fit in an 8 MB body and cost seconds of template rendering.
MAX_CHAT_MESSAGES = 2048
MAX_CONTENT_PARTS = 256  # text parts of one message


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    include_usage: bool = Field(False, description="One more chunk before [DONE]: usage, "
                                                   "no choices.")


class _SamplingFields(BaseModel):
    """What both routes share: the sampling we implement and the no-op values of the rest."""

    # JSON's 1e999 parses as infinity: a float field must be finite to be meaningful.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(..., description="An adapter id of your tenant, or the served base "
                                        "model's name (GET /v1/models) for no adapter.")
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT, description="New tokens at most.")
    temperature: float | None = Field(1.0, ge=0.0, le=2.0, description="0 is greedy.")
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int | None = Field(1, ge=-MAX_INT, le=MAX_INT, description="Only 1.")
    stop: str | list[str] | None = Field(None, description="Stop string(s).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted; does not affect generation.")
    presence_penalty: float | None = Field(0.0, description="Only 0.")
    frequency_penalty: float | None = Field(0.0, description="Only 0.")
    logit_bias: dict[str, float] | None = Field(None, description="Only empty.")
    top_k: int | None = Field(None, ge=0, le=MAX_INT, description="Extension (as vLLM): 0 "
                              "disables; at most the vocabulary size.")
    ignore_eos: bool | None = Field(None, description="Extension (as vLLM): keep generating "
                                                      "to max_tokens.")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="A string (or a list holding one string). Token-id arrays are not "
                         "supported.")
    max_tokens: int | None = Field(COMPLETIONS_DEFAULT_MAX_TOKENS, ge=1, le=MAX_INT)
    echo: bool | None = Field(False, description="Only false.")
    logprobs: int | None = Field(None, ge=-MAX_INT, le=MAX_INT,
                                 description="Not supported: only null.")
    best_of: int | None = Field(None, ge=-MAX_INT, le=MAX_INT, description="Only 1.")
    suffix: str | None = Field(None, description="Not supported: only null or empty.")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    role: Literal["system", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)] = Field(
        ..., description=f"Text, or up to {MAX_CONTENT_PARTS} text parts (joined).")
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_CHAT_MESSAGES,
                                        description=f"At most {MAX_CHAT_MESSAGES}.")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT,
                                              description="Same as max_tokens "
                                              "(the newer name); give at most one.")
    logprobs: bool | None = Field(False, description="Only false.")
    top_logprobs: int | None = Field(None, ge=-MAX_INT, le=MAX_INT,
                                     description="Not supported: only null.")
    response_format: dict[str, Any] | None = Field(None, description='Only {"type": "text"}.')
    tools: list[Any] | None = Field(None, description="Not supported: only null or empty.")
    tool_choice: Any | None = Field(None, description='Not supported: only null or "none".')
    functions: list[Any] | None = Field(None, description="Not supported.")
    function_call: Any | None = Field(None, description="Not supported.")
    parallel_tool_calls: bool | None = None


FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int = Field(..., description="Text tokens of the prompt (an adapter's "
                                                "virtual tokens are not counted).")
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    """Also each streamed chunk (finish_reason null until the last; usage only in the
    include_usage chunk, whose choices are empty)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
