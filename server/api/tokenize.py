"""POST /tokenize and /detokenize in vLLM's shapes, for clients that count or budget tokens.

`model` picks the adapter as on the OpenAI routes, so `count` is the positions a prompt takes
in the model's context: its text's tokens plus the adapter's virtual tokens and its template's
anchor tokens (`virtual_tokens` says how many of the count are not text). `tokens` are the
text's ids only: the virtual ones are this server's, not the tokenizer's. Errors are
OpenAI-shaped, as vLLM's are.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, Field, StrictInt

from server.api.deps import EngineDep, SettingsDep, TenantDep
from server.api.errors import error_responses
from server.api.openai_errors import OpenAIParamError, OpenAIRoute
from server.api.openai_routes import adapter_for, base_names
from server.api.openai_schemas import MAX_CHAT_MESSAGES, STRICT_REQUEST, ChatMessage
from server.api.submission import OFF_LOOP_CHARS, OFF_LOOP_MESSAGES
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
    virtual_tokens: int = Field(0, description="How many of count are the adapter's (virtual "
                                "and anchor tokens).")


class DetokenizeRequest(BaseModel):
    model_config = STRICT_REQUEST

    model: TokenizableText | None = None
    tokens: list[StrictInt] = Field(..., max_length=MAX_DETOKENIZE_IDS)


class DetokenizeResponse(BaseModel):
    prompt: str


async def _adapter_tokens(model: str | None, *, engine: EngineClient, names: list[str],
                          namespace: str) -> int:
    """The positions an adapter adds to a prompt (0 for the base model); 404 if unknown."""
    adapter_id = None if model is None else adapter_for(model, names)
    if adapter_id is None:
        return 0
    record = await engine.get_adapter(namespace, adapter_id)
    if record.template is None:
        return record.num_virtual_tokens
    anchors = template_anchor_tokens(
        record.template, record.num_virtual_tokens,
        lambda text: engine.tokenize(text, add_special_tokens=False))
    return record.num_virtual_tokens + anchors


@router.post("/tokenize", response_model=TokenizeResponse, summary="Count a prompt's tokens",
             responses=error_responses(400, 401, 404, 413, 500, 503))
async def tokenize(body: TokenizeRequest, engine: EngineDep, settings: SettingsDep,
                   namespace: TenantDep) -> Any:
    if (body.prompt is None) == (body.messages is None):
        raise OpenAIParamError("give prompt or messages (one of them)", param="prompt")
    virtual = await _adapter_tokens(body.model, engine=engine,
                                    names=base_names(settings, engine), namespace=namespace)
    if body.prompt is not None:
        prompt = body.prompt
        special = True if body.add_special_tokens is None else body.add_special_tokens

        def run() -> list[int]:
            return engine.tokenize(prompt, add_special_tokens=special)

        large = len(prompt) > OFF_LOOP_CHARS
    else:
        if body.add_special_tokens:
            raise OpenAIParamError("add_special_tokens applies to a prompt; a chat template "
                                   "writes its own special tokens", param="add_special_tokens")
        messages = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {})
                    for m in body.messages or ()]
        generation = body.add_generation_prompt

        def run() -> list[int]:
            return engine.apply_chat_template(messages, add_generation_prompt=generation)

        large = (len(messages) > OFF_LOOP_MESSAGES
                 or sum(len(m["content"]) for m in messages) > OFF_LOOP_CHARS)
    ids = await asyncio.to_thread(run) if large else run()
    strs = [engine.detokenize([i]) for i in ids] if body.return_token_strs else None
    return TokenizeResponse(count=len(ids) + virtual, max_model_len=engine.model_info.max_context,
                            tokens=ids, token_strs=strs, virtual_tokens=virtual)


@router.post("/detokenize", response_model=DetokenizeResponse, summary="Token ids as text",
             responses=error_responses(400, 401, 404, 413, 500, 503))
async def detokenize(body: DetokenizeRequest, engine: EngineDep, settings: SettingsDep,
                     namespace: TenantDep) -> Any:
    await _adapter_tokens(body.model, engine=engine, names=base_names(settings, engine),
                          namespace=namespace)  # a model that does not exist is a 404 here too
    vocab = engine.model_info.vocab_size
    bad = next((t for t in body.tokens if t < 0 or (vocab and t >= vocab)), None)
    if bad is not None:
        raise OpenAIParamError(f"tokens: {bad} is not a token id; ids are in [0, {vocab})",
                               param="tokens")
    ids = list(body.tokens)
    text = (await asyncio.to_thread(engine.detokenize, ids) if len(ids) > OFF_LOOP_CHARS
            else engine.detokenize(ids))
    return DetokenizeResponse(prompt=text)
