"""POST /tokenize and /detokenize in vLLM's shapes, for clients that count or budget tokens.

`model` picks the adapter as on the OpenAI routes, so `count` is the positions a prompt takes
in the model's context: its text's tokens plus the adapter's virtual tokens and its template's
anchor tokens. `virtual_tokens` is the adapter's rows only, as /v1/generate's usage counts
them (anchors are real tokens, which usage counts as prompt tokens). `tokens` are the
text's ids only: the virtual ones are this server's, not the tokenizer's. Errors are
OpenAI-shaped, as vLLM's are. Both routes have generation's input limit (the tenant's
max_input_tokens), and large work runs off the event loop (server.api.off_loop).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StrictInt

from server.api.admission import tokenize_within
from server.api.deps import EngineDep, SettingsDep, TenantDep
from server.api.errors import InvalidRequestError, RequestQuotaError, error_responses
from server.api.off_loop import PiecewiseJSONResponse, off_loop
from server.api.openai.errors import OpenAIParamError, OpenAIRoute
from server.api.openai.logprobs import TokenText
from server.api.openai.routes import adapter_for, base_names
from server.api.openai.schemas import MAX_CHAT_MESSAGES, STRICT_REQUEST, ChatMessage
from server.api.quotas import Quotas, quotas_for
from server.api.text import TokenizableText
from server.engine.interface import EngineClient
from server.engine.prompt_layout import template_anchor_tokens

router = APIRouter(tags=["tokenizer"], route_class=OpenAIRoute)
MAX_DETOKENIZE_IDS = 1 << 20


class TokenizeRequest(BaseModel):
    model_config = STRICT_REQUEST

    model: TokenizableText | None = Field(None, description="An adapter id of your tenant, or "
                                          "the served base model's name; absent: the base "
                                          "model.")
    prompt: TokenizableText | None = Field(None, description="Text, tokenized as "
                                           "/v1/completions does.")
    messages: Annotated[list[ChatMessage], Field(max_length=MAX_CHAT_MESSAGES)] | None = Field(
        None, description="Chat messages, rendered as /v1/chat/completions does.")
    add_special_tokens: bool | None = Field(None, description="Default: true for a prompt, "
                                            "false for messages (the template writes them).")
    add_generation_prompt: bool = Field(True, description="Messages: end with the "
                                        "assistant's turn, as chat completions do.")
    return_token_strs: bool = Field(False, description="Also each token's text.")


class TokenizeResponse(BaseModel):
    count: int = Field(..., description="Positions in the context: the text's tokens plus the "
                       "adapter's virtual and template anchor tokens.")
    max_model_len: int
    tokens: list[int] = Field(..., description="The text's token ids.")
    token_strs: list[str] | None = None
    virtual_tokens: int = Field(0, description="How many of count are the adapter's virtual "
                                "tokens (its rows; a template's anchor tokens are not).")


class DetokenizeRequest(BaseModel):
    model_config = STRICT_REQUEST

    model: TokenizableText | None = None
    tokens: list[StrictInt] = Field(..., max_length=MAX_DETOKENIZE_IDS)


class DetokenizeResponse(BaseModel):
    prompt: str


async def _adapter_tokens(model: str | None, *, engine: EngineClient, names: list[str],
                          namespace: str) -> tuple[int, int]:
    """The positions an adapter adds to a prompt, as (virtual rows, template anchor tokens);
    (0, 0) for the base model; 404 if unknown."""
    adapter_id = None if model is None else adapter_for(model, names)
    if adapter_id is None:
        return 0, 0
    record = await engine.get_adapter(namespace, adapter_id)
    if record.template is None:
        return record.num_virtual_tokens, 0
    anchors = template_anchor_tokens(
        record.template, record.num_virtual_tokens,
        lambda text: engine.tokenize(text, add_special_tokens=False))
    return record.num_virtual_tokens, anchors


async def _bounded(run: Callable[[], list[int]], *, chars: int, messages: int, quotas: Quotas,
                   param: str) -> list[int]:
    """`run()`'s ids within the tenant's max_input_tokens, the bound generation has: a
    prompt that could not fit is refused before tokenizing, a large one is tokenized off the
    event loop, and one over the bound is a 400 naming the limit and the count."""
    try:
        return await tokenize_within(run, chars=chars, items=messages, quotas=quotas,
                                     max_new_tokens=0)
    except (InvalidRequestError, RequestQuotaError) as e:
        raise OpenAIParamError(str(e), param=param) from e


def _tokenize_response(ids: list[int], *, engine: EngineClient, virtual: int, anchors: int,
                       token_strs: bool) -> JSONResponse:
    """The response, built where the caller runs it (off the loop when it is large). Each
    token's text is decoded once per distinct id, which gives what decoding each id alone
    gives; the lists go in as they are rather than validated item by item."""
    strs = TokenText(engine.detokenize).each(ids) if token_strs else None
    response = TokenizeResponse(count=len(ids) + virtual + anchors,
                                max_model_len=engine.model_info.max_context, tokens=[],
                                token_strs=None, virtual_tokens=virtual)
    return PiecewiseJSONResponse(response.model_dump(mode="json")
                                 | {"tokens": ids, "token_strs": strs})


@router.post("/tokenize", response_model=TokenizeResponse, summary="Count a prompt's tokens",
             responses=error_responses(400, 401, 404, 413, 500, 503))
async def tokenize(body: TokenizeRequest, request: Request, engine: EngineDep,
                   settings: SettingsDep, namespace: TenantDep) -> Any:
    if (body.prompt is None) == (body.messages is None):
        raise OpenAIParamError("give prompt or messages (one of them)", param="prompt")
    _, quotas = quotas_for(request, namespace)
    virtual, anchors = await _adapter_tokens(body.model, engine=engine,
                                             names=base_names(settings, engine),
                                             namespace=namespace)
    if body.prompt is not None:
        prompt = body.prompt
        special = True if body.add_special_tokens is None else body.add_special_tokens

        def run() -> list[int]:
            return engine.tokenize(prompt, add_special_tokens=special)

        param, chars, count = "prompt", len(prompt), 1
    else:
        if body.add_special_tokens:
            raise OpenAIParamError("add_special_tokens applies to a prompt; a chat template "
                                   "writes its own special tokens", param="add_special_tokens")
        messages = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {})
                    for m in body.messages or ()]
        generation = body.add_generation_prompt

        def run() -> list[int]:
            return engine.apply_chat_template(messages, add_generation_prompt=generation)

        param, chars = "messages", sum(len(m["content"]) for m in messages)
        count = len(messages)
    ids = await _bounded(run, chars=chars, messages=count, quotas=quotas, param=param)
    strs = body.return_token_strs
    return await off_loop(lambda: _tokenize_response(ids, engine=engine, virtual=virtual,
                                                     anchors=anchors, token_strs=strs),
                          tokens=len(ids) * (2 if strs else 1))


@router.post("/detokenize", response_model=DetokenizeResponse, summary="Token ids as text",
             responses=error_responses(400, 401, 404, 413, 500, 503))
async def detokenize(body: DetokenizeRequest, request: Request, engine: EngineDep,
                     settings: SettingsDep, namespace: TenantDep) -> Any:
    await _adapter_tokens(body.model, engine=engine, names=base_names(settings, engine),
                          namespace=namespace)  # a model that does not exist is a 404 here too
    _, quotas = quotas_for(request, namespace)
    ids = list(body.tokens)
    if len(ids) > quotas.max_input_tokens:
        raise OpenAIParamError(f"tokens: {len(ids)} ids; above the limit max_input_tokens="
                               f"{quotas.max_input_tokens}", param="tokens")
    vocab = engine.model_info.vocab_size

    def run() -> str:
        bad = next((t for t in ids if t < 0 or (vocab and t >= vocab)), None)
        if bad is not None:
            raise OpenAIParamError(f"tokens: {bad} is not a token id; ids are in [0, {vocab})",
                                   param="tokens")
        return engine.detokenize(ids)

    return DetokenizeResponse(prompt=await off_loop(run, tokens=len(ids)))
