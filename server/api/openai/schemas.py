"""Pydantic bodies of the OpenAI-compatible routes (the boundary only).

Requests are strict about fields (extra="forbid"): an argument we do not know would be
silently ignored otherwise, and a client that sends it expects it to change the output, so it
gets a 400 naming it, as OpenAI answers "Unrecognized request argument". Parameters OpenAI
defines but we do not implement are declared so that their no-op values pass (best_of=1,
logit_bias={}, ...) and anything else is refused in the routes with the parameter named.

Values are strict, as OpenAI's schema is: a boolean is not an integer (`"prompt": [true]` is
not the token ids [1]) and a string is not a number (`"logprobs": "3"`); a float field still
takes a JSON integer (`"temperature": 1`). Text is server.api.text's TokenizableText.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, Tag

from server.api.schemas import MAX_INT, MAX_SEED
from server.api.text import StopStrings, TokenizableText, by_json_type
from server.engine.sampling_limits import MAX_LOGPROBS, MAX_PENALTY, MAX_REPETITION_PENALTY

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_CHOICES = 128  # choices of one request: prompts times n (OpenAI's largest n)
# Checked while the body is validated, before any message is rendered: a quarter of a million
# tiny messages fit in an 8 MB body and cost seconds of template rendering.
MAX_CHAT_MESSAGES = 2048
MAX_CONTENT_PARTS = 256  # text parts of one message
MAX_STOP_TOKEN_IDS = 256  # stop_token_ids of one request


# Every request model's config: unknown fields refused, no infinities, no lenient coercion.
STRICT_REQUEST = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT_REQUEST

    include_usage: bool = Field(False, description="One more chunk before [DONE]: usage, "
                                                   "no choices.")
    continuous_usage_stats: bool = Field(False, description="Extension (as vLLM): every "
                                         "chunk carries its choice's usage so far.")


class _SamplingFields(BaseModel):
    """What both routes share: the sampling we implement and the no-op values of the rest."""

    # JSON's 1e999 parses as infinity: a float field must be finite to be meaningful.
    model_config = STRICT_REQUEST

    model: TokenizableText = Field(..., description="An adapter id of your tenant, or the "
                                   "served base model's name (GET /v1/models) for no adapter.")
    max_tokens: int | None = Field(None, ge=0, le=MAX_INT, description="New tokens at most "
                                   "(0 only with echo: score the prompt).")
    temperature: float | None = Field(1.0, ge=0.0, le=2.0, description="0 is greedy.")
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int | None = Field(1, ge=1, le=MAX_CHOICES, description="Choices per prompt; with "
                          "seed, the same request gives the same choices.")
    stop: StopStrings | None = Field(None, description="Stop string(s).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: TokenizableText | None = Field(None, description="Accepted; does not affect "
                                         "generation.")
    presence_penalty: float | None = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY,
                                           description="Lowers the logits of tokens already "
                                           "generated, once each.")
    frequency_penalty: float | None = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY,
                                            description="Lowers the logits of tokens already "
                                            "generated, once per occurrence.")
    repetition_penalty: float | None = Field(None, gt=0.0, le=MAX_REPETITION_PENALTY,
                                             description="Extension (as vLLM): divides the "
                                             "positive logits of prompt and generated tokens "
                                             "and multiplies the negative ones; 1 is off.")
    logit_bias: dict[str, float] | None = Field(None, description="Only empty.")
    top_k: int | None = Field(None, ge=0, le=MAX_INT, description="Extension (as vLLM): 0 "
                              "disables; at most the vocabulary size.")
    ignore_eos: bool | None = Field(None, description="Extension (as vLLM): the "
                                    "end-of-sequence token does not end the output (it may "
                                    "still be drawn); generation goes on to max_tokens.")
    min_tokens: int | None = Field(None, ge=0, le=MAX_INT, description="Extension (as "
                                   "vLLM): neither end-of-sequence, stop_token_ids nor stop "
                                   "strings end the output before this many new tokens.")
    stop_token_ids: list[StrictInt] | None = Field(
        None, max_length=MAX_STOP_TOKEN_IDS, description="Extension (as vLLM): token ids "
        f"that end the output as end-of-sequence does (at most {MAX_STOP_TOKEN_IDS}).")
    include_stop_str_in_output: bool | None = Field(None, description="Extension (as "
                                                    "vLLM): the stop string (or the ending "
                                                    "token's text) stays in the text.")
    skip_special_tokens: bool | None = Field(None, description="Extension (as vLLM): "
                                             "special tokens' text is left out of the text "
                                             "(default true).")
    return_tokens_as_token_ids: bool | None = Field(None, description="Extension (as "
                                                    "vLLM): logprobs name each token "
                                                    "'token_id:N' instead of its text.")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def _prompt_form(value: Any) -> str | None:
    """Which of the prompt's forms a value is meant to be, from its (first item's) type."""
    if isinstance(value, str):
        return "str"
    if not isinstance(value, list):
        return None
    first = value[0] if value else None
    if isinstance(first, str):
        return "list[str]"
    return "list[list[int]]" if isinstance(first, list) else "list[int]"


Prompt = Annotated[
    Annotated[TokenizableText, Tag("str")]
    | Annotated[list[TokenizableText], Tag("list[str]")]
    | Annotated[list[StrictInt], Tag("list[int]")]
    | Annotated[list[list[StrictInt]], Tag("list[list[int]]")],
    by_json_type(_prompt_form, forms="a string, a list of strings, a list of token ids or a "
                                     "list of lists of token ids")]


class CompletionRequest(_SamplingFields):
    prompt: Prompt = Field(
        ..., description="A string, a list of token ids, or a list of several of either: "
                         "one choice (n choices) per prompt, in order.")
    max_tokens: int | None = Field(COMPLETIONS_DEFAULT_MAX_TOKENS, ge=0, le=MAX_INT)
    echo: bool | None = Field(False, description="The prompt before the completion (and its "
                              "tokens' logprobs with logprobs).")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="Log-probabilities of each token and of the "
                                 f"N most likely (0-{MAX_LOGPROBS}).")
    best_of: int | None = Field(None, ge=-MAX_INT, le=MAX_INT, description="Only 1.")
    suffix: TokenizableText | None = Field(None, description="Not supported: only null or "
                                           "empty.")
    add_special_tokens: bool | None = Field(True, description="Extension (as vLLM): the "
                                            "tokenizer's special tokens (BOS) are added to a "
                                            "text prompt.")


class TextPart(BaseModel):
    model_config = STRICT_REQUEST

    type: Literal["text"]
    text: TokenizableText


def _content_form(value: Any) -> str | None:
    if isinstance(value, str):
        return "str"
    return "list[TextPart]" if isinstance(value, list) else None


class ChatMessage(BaseModel):
    model_config = STRICT_REQUEST

    role: Literal["system", "user", "assistant"]
    content: Annotated[
        Annotated[TokenizableText, Tag("str")]
        | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS), Tag("list[TextPart]")],
        by_json_type(_content_form, forms="a string or a list of text parts")] = Field(
        ..., description=f"Text, or up to {MAX_CONTENT_PARTS} text parts (joined).")
    name: TokenizableText | None = None

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
    logprobs: bool | None = Field(False, description="Each generated token's log-probability.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description="With logprobs: the N most likely tokens at "
                                     f"each position (0-{MAX_LOGPROBS}).")
    response_format: dict[str, Any] | None = Field(None, description='Only {"type": "text"}.')
    tools: list[Any] | None = Field(None, description="Not supported: only null or empty.")
    tool_choice: Any | None = Field(None, description='Not supported: only null or "none".')
    functions: list[Any] | None = Field(None, description="Not supported.")
    function_call: Any | None = Field(None, description="Not supported.")
    parallel_tool_calls: bool | None = None
    add_special_tokens: bool | None = Field(False, description="Extension (as vLLM): the "
                                            "rendered chat is tokenized with the tokenizer's "
                                            "special tokens too (the template usually writes "
                                            "its own).")


FinishReason = Literal["stop", "length"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(..., description=(
        "Prompt positions whose keys and values came from the prefix cache instead of being "
        "computed, each prompt once. They include the adapter's virtual tokens (the soft "
        "prompt is what is shared), which `prompt_tokens` does not count, so this may exceed "
        "it."))


class Usage(BaseModel):
    prompt_tokens: int = Field(..., description="Text tokens of the prompts, each prompt once "
                                                "(an adapter's virtual tokens are not "
                                                "counted).")
    completion_tokens: int = Field(..., description="Tokens of every choice.")
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = Field(
        None, description="On the response's usage and a stream's usage chunk; not in the "
                          "per-chunk usage of `continuous_usage_stats`.")


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: one entry per token (the prompt's first, with echo)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None
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
