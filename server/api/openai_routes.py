"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

`model` selects the adapter, as in vLLM, LoRAX and TGI: the served base model's name
(ModelInfo.name, exactly as GET /v1/models lists it) means no adapter; anything else is an
adapter id in the caller's tenant namespace (404 model_not_found otherwise). Requests take the
same path as /v1/generate (server.api.submission): same auth, quotas, batching, metrics and
disconnect handling; only the shapes differ. Errors are OpenAI-shaped (OpenAIRoute).
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.api.deps import EngineDep, MetricsDep, SettingsDep, TenantDep
from server.api.errors import error_responses
from server.api.metrics import ApiMetrics
from server.api.openai_errors import ModelNotFoundError, OpenAIParamError, OpenAIRoute
from server.api.openai_schemas import (
    CHAT_DEFAULT_MAX_TOKENS,
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from server.api.openai_stream import ChatFormat, CompletionFormat, respond
from server.api.quotas import Quotas, quotas_for
from server.api.schemas import ADAPTER_ID_PATTERN
from server.api.submission import (
    admit,
    check_params,
    to_engine_request,
    tokenize_text,
    tokenize_within,
)
from server.engine.interface import EngineClient, SamplingParams

router = APIRouter(tags=["openai"], route_class=OpenAIRoute)
_ERRORS = error_responses(400, 401, 404, 413, 429, 500, 503)
_STREAM_DOC = {"description": "JSON, or with `stream: true` Server-Sent Events: `data: "
                              "{chunk}` events, the last with finish_reason, an optional "
                              "usage chunk (stream_options.include_usage), then "
                              "`data: [DONE]`.",
               "content": {"text/event-stream": {}}}


def adapter_for(model: str, engine: EngineClient) -> str | None:
    """None for the base model's name, else the adapter id (existence is the engine's 404)."""
    if model == engine.model_info.name:
        return None
    if not re.fullmatch(ADAPTER_ID_PATTERN, model):
        raise ModelNotFoundError(f"the model {model!r} does not exist: use the served model's "
                                 f"name {engine.model_info.name!r} or one of your adapter ids")
    return model


def _refuse(checks: dict[str, tuple[bool, Any]]) -> None:
    """400 for the first parameter set to something we do not implement; never ignored."""
    for param, (unsupported, value) in checks.items():
        if unsupported:
            raise OpenAIParamError(f"{param}={value!r} is not supported by this server",
                                   param=param, code="unsupported_parameter")


def _common_checks(body: CompletionRequest | ChatCompletionRequest) -> dict:
    return {
        "n": (body.n not in (None, 1), body.n),
        "presence_penalty": (bool(body.presence_penalty), body.presence_penalty),
        "frequency_penalty": (bool(body.frequency_penalty), body.frequency_penalty),
        "logit_bias": (bool(body.logit_bias), body.logit_bias),
        "stream_options": (body.stream_options is not None and not body.stream,
                           "set without stream=true"),
    }


def _params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
        seed=body.seed, stop=tuple(body.stop_list()), ignore_eos=bool(body.ignore_eos))


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if prompt and all(isinstance(p, str) for p in prompt):
        raise OpenAIParamError("prompt: only one prompt per request (a string, or a list of "
                               "one string)", param="prompt", code="unsupported_parameter")
    raise OpenAIParamError("prompt: token-id arrays are not supported; send text",
                           param="prompt", code="unsupported_parameter")


@router.post("/v1/completions", response_model=CompletionResponse,
             summary="OpenAI-compatible text completion",
             responses={200: _STREAM_DOC, **_ERRORS})
async def completions(body: CompletionRequest, request: Request, engine: EngineDep,
                      settings: SettingsDep, metrics: MetricsDep,
                      namespace: TenantDep) -> Any:
    _refuse(_common_checks(body) | {
        "echo": (bool(body.echo), body.echo),
        "logprobs": (body.logprobs is not None, body.logprobs),
        "best_of": (body.best_of not in (None, 1), body.best_of),
        "suffix": (bool(body.suffix), body.suffix),
    })
    text = _prompt_text(body.prompt)
    adapter_id = adapter_for(body.model, engine)
    _, quotas = quotas_for(request, namespace)
    params = _params(body, body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS)
    check_params(params, settings=settings, quotas=quotas,
                 vocab_size=engine.model_info.vocab_size)
    prompt_ids = await tokenize_text(engine, text, quotas=quotas,
                                     max_new_tokens=params.max_new_tokens)
    return await _submit(request, engine, body, CompletionFormat, prompt_ids, adapter_id=adapter_id,
                         namespace=namespace, params=params, quotas=quotas, metrics=metrics)


async def _submit(request: Request, engine: EngineClient,
                  body: CompletionRequest | ChatCompletionRequest, fmt: type[CompletionFormat],
                  prompt_ids: list[int], *, adapter_id: str | None, namespace: str,
                  params: SamplingParams, quotas: Quotas, metrics: ApiMetrics) -> Any:
    """Both routes end the same way: admit under the tenant's quotas, run, answer in `fmt`."""
    engine_request = to_engine_request(prompt_ids, adapter_id=adapter_id, namespace=namespace,
                                       params=params)
    lease = admit(request, namespace, quotas, engine_request, stream=bool(body.stream))
    return await respond(request, engine, engine_request, metrics=metrics, lease=lease,
                         fmt=fmt(engine_request.request_id, body.model),
                         stream=bool(body.stream),
                         include_usage=bool(body.stream_options
                                            and body.stream_options.include_usage))


def _chat_max_tokens(body: ChatCompletionRequest, quota: int) -> int:
    if (body.max_tokens is not None and body.max_completion_tokens is not None
            and body.max_tokens != body.max_completion_tokens):
        raise OpenAIParamError("give max_tokens or max_completion_tokens, not both",
                               param="max_completion_tokens")
    given = body.max_completion_tokens or body.max_tokens
    return given if given is not None else min(CHAT_DEFAULT_MAX_TOKENS, quota)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             summary="OpenAI-compatible chat completion (the model's chat template)",
             responses={200: _STREAM_DOC, **_ERRORS})
async def chat_completions(body: ChatCompletionRequest, request: Request, engine: EngineDep,
                           settings: SettingsDep, metrics: MetricsDep,
                           namespace: TenantDep) -> Any:
    response_type = (body.response_format or {}).get("type", "text")
    _refuse(_common_checks(body) | {
        "logprobs": (bool(body.logprobs), body.logprobs),
        "top_logprobs": (body.top_logprobs is not None, body.top_logprobs),
        "response_format": (response_type != "text", body.response_format),
        "tools": (bool(body.tools), "tools"),
        "tool_choice": (body.tool_choice not in (None, "none"), body.tool_choice),
        "functions": (bool(body.functions), "functions"),
        "function_call": (body.function_call not in (None, "none"), body.function_call),
    })
    adapter_id = adapter_for(body.model, engine)
    _, quotas = quotas_for(request, namespace)
    params = _params(body, _chat_max_tokens(body, quotas.max_new_tokens))
    check_params(params, settings=settings, quotas=quotas,
                 vocab_size=engine.model_info.vocab_size)
    messages = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {})
                for m in body.messages]
    prompt_ids = await tokenize_within(lambda: engine.apply_chat_template(messages),
                                       chars=sum(len(m["content"]) for m in messages),
                                       items=len(messages), quotas=quotas,
                                       max_new_tokens=params.max_new_tokens)
    return await _submit(request, engine, body, ChatFormat, prompt_ids, adapter_id=adapter_id,
                         namespace=namespace, params=params, quotas=quotas, metrics=metrics)


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0


def _base_card(request: Request, engine: EngineClient) -> ModelCard:
    """`created` is when this app first listed it (the served model has no upload time)."""
    started = getattr(request.app.state, "openai_created", None)
    if started is None:
        started = request.app.state.openai_created = int(time.time())
    return ModelCard(id=engine.model_info.name, created=started, owned_by="softprompt-server")


async def _cards(request: Request, engine: EngineClient, namespace: str) -> list[ModelCard]:
    """The base model first, then the tenant's adapters by id."""
    cards = [_base_card(request, engine)]
    cards += [ModelCard(id=r.adapter_id, created=_epoch(r.created_at), owned_by=namespace)
              for r in sorted(await engine.list_adapters(namespace),
                              key=lambda r: r.adapter_id)]
    return cards


@router.get("/v1/models", response_model=ModelList, summary="The base model and your adapters",
            responses=error_responses(401, 500, 503))
async def list_models(request: Request, engine: EngineDep, namespace: TenantDep) -> Any:
    cards = await _cards(request, engine, namespace)
    return JSONResponse(ModelList(data=cards).model_dump(mode="json"))


@router.get("/v1/models/{model:path}", response_model=ModelCard, summary="One model",
            responses=error_responses(401, 404, 500, 503))
async def retrieve_model(model: str, request: Request, engine: EngineDep,
                         namespace: TenantDep) -> Any:
    if model == engine.model_info.name:
        return JSONResponse(_base_card(request, engine).model_dump())
    record = await engine.get_adapter(namespace, adapter_for(model, engine) or model)
    return JSONResponse(ModelCard(id=record.adapter_id, created=_epoch(record.created_at),
                                  owned_by=namespace).model_dump())
