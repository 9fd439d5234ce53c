"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

`model` selects the adapter, as in vLLM, LoRAX and TGI: the served base model's name
(ModelInfo.name, exactly as GET /v1/models lists it) means no adapter; anything else is an
adapter id in the caller's tenant namespace (404 model_not_found otherwise). Requests take the
same path as /v1/generate (server.api.admission, then server.api.submission): same auth,
quotas, batching, metrics and disconnect handling; only the shapes differ. Errors are
OpenAI-shaped (OpenAIRoute).
"""

from __future__ import annotations

import dataclasses
import re
import time
from datetime import datetime
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.api.admission import (
    admit,
    check_params,
    to_engine_request,
    tokenize_text,
    tokenize_within,
)
from server.api.deps import EngineDep, MetricsDep, SettingsDep, TenantDep
from server.api.errors import error_responses
from server.api.metrics import ApiMetrics
from server.api.off_loop import off_loop
from server.api.openai.errors import ModelNotFoundError, OpenAIParamError, OpenAIRoute
from server.api.openai.logprobs import TokenText
from server.api.openai.schemas import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    MAX_CHOICES,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from server.api.openai.stream import ChatFormat, Choice, CompletionFormat, respond
from server.api.quotas import Quotas, check_generation, quotas_for
from server.api.schemas import ADAPTER_ID_PATTERN, MAX_SEED
from server.config import Settings
from server.engine.errors import MaxNewTokensTooLongError, RequestTooLongError
from server.engine.interface import EngineClient, SamplingParams

router = APIRouter(tags=["openai"], route_class=OpenAIRoute)
_ERRORS = error_responses(400, 401, 404, 413, 429, 500, 503)
_STREAM_DOC = {"description": "JSON, or with `stream: true` Server-Sent Events: `data: "
                              "{chunk}` events, the last with finish_reason, an optional "
                              "usage chunk (stream_options.include_usage), then "
                              "`data: [DONE]`.",
               "content": {"text/event-stream": {}}}


def base_names(settings: Settings, engine: EngineClient) -> list[str]:
    """The base model's names: --served-model-name, else what --model said."""
    return settings.served_model_name or [engine.model_info.name]


def adapter_for(model: str, names: list[str]) -> str | None:
    """None for a name of the base model, else the adapter id (existence is the engine's
    404)."""
    if model in names:
        return None
    if not re.fullmatch(ADAPTER_ID_PATTERN, model):
        shown = " or ".join(repr(n) for n in names)
        raise ModelNotFoundError(f"the model {model!r} does not exist: use the served model's "
                                 f"name {shown} or one of your adapter ids")
    return model


def _refuse(checks: dict[str, tuple[bool, Any]]) -> None:
    """400 for the first parameter set to something we do not implement; never ignored."""
    for param, (unsupported, value) in checks.items():
        if unsupported:
            raise OpenAIParamError(f"{param}={value!r} is not supported by this server",
                                   param=param, code="unsupported_parameter")


def _common_checks(body: CompletionRequest | ChatCompletionRequest) -> dict:
    return {
        "logit_bias": (bool(body.logit_bias), body.logit_bias),
        "stream_options": (body.stream_options is not None and not body.stream,
                           "set without stream=true"),
    }


def _params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int, *,
            logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
        seed=body.seed, stop=tuple(body.stop_list()), ignore_eos=bool(body.ignore_eos),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logprobs=logprobs, prompt_logprobs=prompt_logprobs, min_tokens=body.min_tokens or 0,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        include_stop_str_in_output=bool(body.include_stop_str_in_output),
        skip_special_tokens=body.skip_special_tokens is not False)


def _check_extensions(body: CompletionRequest | ChatCompletionRequest, *, max_tokens: int,
                      vocab_size: int) -> None:
    """vLLM's extensions, checked as vLLM checks them, each named when wrong."""
    if body.min_tokens and body.min_tokens > max_tokens:
        raise OpenAIParamError(f"min_tokens={body.min_tokens} is more than max_tokens="
                               f"{max_tokens}", param="min_tokens")
    if vocab_size and any(not 0 <= t < vocab_size for t in body.stop_token_ids or ()):
        raise OpenAIParamError(f"stop_token_ids must be token ids in [0, {vocab_size})",
                               param="stop_token_ids")


def _token_text(body: CompletionRequest | ChatCompletionRequest,
                engine: EngineClient) -> TokenText:
    return TokenText(engine.detokenize, engine.token_bytes,
                     as_ids=bool(body.return_tokens_as_token_ids))


def _continuous_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    """Usage on every chunk: asked alone, or with include_usage as vLLM's clients ask."""
    return bool(body.stream_options and body.stream_options.continuous_usage_stats)


def _check_max_tokens(max_tokens: int, quotas: Quotas) -> None:
    """The tenant's limit, named as OpenAI's clients know it."""
    if max_tokens > quotas.max_new_tokens:
        raise OpenAIParamError(f"max_tokens={max_tokens} is above this server's limit of "
                               f"{quotas.max_new_tokens}", param="max_tokens")


def _prompts(prompt: Any) -> list[str | list[int]]:
    """A string, a list of token ids, or a list of several of either, as a list of prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise OpenAIParamError("prompt: an empty list holds no prompt", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def _choice_seed(seed: int | None, j: int) -> int | None:
    """Choice j's seed: the request's for the first, then distinct ones derived from it, so
    the same request gives the same n choices."""
    if seed is None or j == 0:
        return seed
    return (seed + j * 0x9E3779B97F4A7C15) % MAX_SEED


def _choices(prompts: list[tuple[list[int], str]], n: int, *, adapter_id: str | None,
             namespace: str, params: SamplingParams, fit_context: bool = False,
             echo: bool = False, score_only: bool = False) -> list[Choice]:
    """n choices per prompt, indexed prompt by prompt (OpenAI's order)."""
    if len(prompts) * n > MAX_CHOICES:
        raise OpenAIParamError(f"{len(prompts)} prompts times n={n} is more than "
                               f"{MAX_CHOICES} choices", param="n")
    out = []
    for ids, text in prompts:
        for j in range(n):
            request = to_engine_request(
                ids, adapter_id=adapter_id, namespace=namespace,
                params=dataclasses.replace(params, seed=_choice_seed(params.seed, j)))
            out.append(Choice(len(out), dataclasses.replace(request, fit_context=fit_context),
                              counts_prompt=j == 0, prompt_text=text, echo=echo,
                              score_only=score_only))
    return out


async def _prompt_ids(prompt: str | list[int], engine: EngineClient, *, quotas: Quotas,
                      max_new_tokens: int, add_special_tokens: bool) -> list[int]:
    if isinstance(prompt, str):
        return await tokenize_text(engine, prompt, quotas=quotas, max_new_tokens=max_new_tokens,
                                   add_special_tokens=add_special_tokens)
    check_generation(quotas, max_new_tokens=max_new_tokens, input_tokens=len(prompt))
    vocab = engine.model_info.vocab_size
    if vocab and await off_loop(lambda: any(not 0 <= t < vocab for t in prompt),
                                tokens=len(prompt)):
        raise OpenAIParamError(f"prompt: token ids must be in [0, {vocab})", param="prompt")
    return prompt


@router.post("/v1/completions", response_model=CompletionResponse,
             summary="OpenAI-compatible text completion",
             responses={200: _STREAM_DOC, **_ERRORS})
async def completions(body: CompletionRequest, request: Request, engine: EngineDep,
                      settings: SettingsDep, metrics: MetricsDep,
                      namespace: TenantDep) -> Any:
    _refuse(_common_checks(body) | {
        "best_of": (body.best_of not in (None, 1), body.best_of),
        "suffix": (bool(body.suffix), body.suffix),
    })
    max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise OpenAIParamError("max_tokens=0 only scores the prompt: it needs echo=true",
                               param="max_tokens")
    adapter_id = adapter_for(body.model, base_names(settings, engine))
    _, quotas = quotas_for(request, namespace)
    _check_max_tokens(max_tokens, quotas)
    echo_logprobs = body.logprobs if body.echo else None
    params = _params(body, max(max_tokens, 1), logprobs=body.logprobs,
                     prompt_logprobs=echo_logprobs)
    check_params(params, settings=settings, quotas=quotas,
                 vocab_size=engine.model_info.vocab_size)
    _check_extensions(body, max_tokens=max_tokens, vocab_size=engine.model_info.vocab_size)
    prompts = []
    for prompt in _prompts(body.prompt):
        ids = await _prompt_ids(prompt, engine, quotas=quotas,
                                max_new_tokens=params.max_new_tokens,
                                add_special_tokens=body.add_special_tokens is not False)
        text = prompt if isinstance(prompt, str) else await off_loop(
            partial(engine.detokenize, ids), tokens=len(ids))
        prompts.append((ids, text))
    choices = _choices(prompts, body.n or 1, adapter_id=adapter_id, namespace=namespace,
                       params=params, echo=bool(body.echo), score_only=max_tokens == 0)
    fmt = CompletionFormat(choices[0].request.request_id, body.model,
                           _token_text(body, engine), logprobs=body.logprobs,
                           continuous_usage=_continuous_usage(body))
    return await _submit(request, engine, body, fmt, choices, namespace=namespace,
                         quotas=quotas, metrics=metrics)


async def _submit(request: Request, engine: EngineClient,
                  body: CompletionRequest | ChatCompletionRequest, fmt: CompletionFormat,
                  choices: list[Choice], *, namespace: str, quotas: Quotas,
                  metrics: ApiMetrics) -> Any:
    """Both routes end the same way: admit under the tenant's quotas, run, answer in `fmt`."""
    lease = admit(request, namespace, quotas, choices[0].request, stream=bool(body.stream),
                  sequences=len(choices))
    try:
        return await respond(request, engine, choices, metrics=metrics, lease=lease, fmt=fmt,
                             stream=bool(body.stream),
                             include_usage=bool(body.stream_options
                                                and body.stream_options.include_usage))
    except RequestTooLongError as e:  # the engine's words, in OpenAI's names
        if isinstance(e, MaxNewTokensTooLongError):
            param = "max_tokens"
        else:
            param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        raise OpenAIParamError(str(e).replace("max_new_tokens", "max_tokens"),
                               param=param) from e


def _chat_max_tokens(body: ChatCompletionRequest) -> int | None:
    """The request's bound on new tokens, or None: what the context leaves."""
    if (body.max_tokens is not None and body.max_completion_tokens is not None
            and body.max_tokens != body.max_completion_tokens):
        raise OpenAIParamError("give max_tokens or max_completion_tokens, not both",
                               param="max_completion_tokens")
    given = body.max_completion_tokens if body.max_completion_tokens is not None else (
        body.max_tokens)
    if given == 0:
        raise OpenAIParamError("max_tokens must be at least 1", param="max_tokens")
    return given


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             summary="OpenAI-compatible chat completion (the model's chat template)",
             responses={200: _STREAM_DOC, **_ERRORS})
async def chat_completions(body: ChatCompletionRequest, request: Request, engine: EngineDep,
                           settings: SettingsDep, metrics: MetricsDep,
                           namespace: TenantDep) -> Any:
    response_type = (body.response_format or {}).get("type", "text")
    _refuse(_common_checks(body) | {
        "response_format": (response_type != "text", body.response_format),
        "tools": (bool(body.tools), "tools"),
        "tool_choice": (body.tool_choice not in (None, "none"), body.tool_choice),
        "functions": (bool(body.functions), "functions"),
        "function_call": (body.function_call not in (None, "none"), body.function_call),
    })
    if body.top_logprobs is not None and not body.logprobs:
        raise OpenAIParamError("top_logprobs needs logprobs=true", param="top_logprobs")
    adapter_id = adapter_for(body.model, base_names(settings, engine))
    _, quotas = quotas_for(request, namespace)
    given = _chat_max_tokens(body)
    if given is not None:
        _check_max_tokens(given, quotas)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = _params(body, quotas.max_new_tokens if given is None else given,
                     logprobs=logprobs)
    check_params(params, settings=settings, quotas=quotas,
                 vocab_size=engine.model_info.vocab_size)
    _check_extensions(body, max_tokens=params.max_new_tokens,
                      vocab_size=engine.model_info.vocab_size)
    messages = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {})
                for m in body.messages]
    specials = bool(body.add_special_tokens)
    prompt_ids = await tokenize_within(lambda: engine.apply_chat_template(
                                           messages, add_special_tokens=specials),
                                       chars=sum(len(m["content"]) for m in messages),
                                       items=len(messages), quotas=quotas,
                                       max_new_tokens=params.max_new_tokens)
    choices = _choices([(prompt_ids, "")], body.n or 1, adapter_id=adapter_id,
                       namespace=namespace, params=params, fit_context=given is None)
    fmt = ChatFormat(choices[0].request.request_id, body.model, _token_text(body, engine),
                     logprobs=logprobs, continuous_usage=_continuous_usage(body))
    return await _submit(request, engine, body, fmt, choices, namespace=namespace,
                         quotas=quotas, metrics=metrics)


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0


def _base_cards(request: Request, names: list[str]) -> list[ModelCard]:
    """`created` is when this app first listed them (the served model has no upload time)."""
    started = getattr(request.app.state, "openai_created", None)
    if started is None:
        started = request.app.state.openai_created = int(time.time())
    return [ModelCard(id=name, created=started, owned_by="softprompt-server") for name in names]


async def _cards(request: Request, engine: EngineClient, namespace: str,
                 names: list[str]) -> list[ModelCard]:
    """The base model's names first, then the tenant's adapters by id."""
    cards = _base_cards(request, names)
    cards += [ModelCard(id=r.adapter_id, created=_epoch(r.created_at), owned_by=namespace)
              for r in sorted(await engine.list_adapters(namespace),
                              key=lambda r: r.adapter_id)
              if r.adapter_id not in names]
    return cards


@router.get("/v1/models", response_model=ModelList, summary="The base model and your adapters",
            responses=error_responses(401, 500, 503))
async def list_models(request: Request, engine: EngineDep, settings: SettingsDep,
                      namespace: TenantDep) -> Any:
    cards = await _cards(request, engine, namespace, base_names(settings, engine))
    return JSONResponse(ModelList(data=cards).model_dump(mode="json"))


@router.get("/v1/models/{model:path}", response_model=ModelCard, summary="One model",
            responses=error_responses(401, 404, 500, 503))
async def retrieve_model(model: str, request: Request, engine: EngineDep, settings: SettingsDep,
                         namespace: TenantDep) -> Any:
    names = base_names(settings, engine)
    if model in names:
        return JSONResponse(_base_cards(request, [model])[0].model_dump())
    record = await engine.get_adapter(namespace, adapter_for(model, names) or model)
    return JSONResponse(ModelCard(id=record.adapter_id, created=_epoch(record.created_at),
                                  owned_by=namespace).model_dump())
