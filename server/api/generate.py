"""POST /v1/generate: the native shape over the shared engine path (server.api.admission, then
server.api.submission).

The engine does the batching; each handler just awaits its own request, so concurrent HTTP
requests become batch mates. Validation, quotas and admission live in admission.py,
disconnect aborts and metrics in submission.py, and the OpenAI-compatible routes use both too;
this module only reads GenerateRequest and writes GenerateResponse or the native SSE events.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from server.api.admission import admit, check_params, to_engine_request, tokenize_text
from server.api.deps import EngineDep, MetricsDep, SettingsDep, TenantDep
from server.api.errors import error_event, error_responses
from server.api.off_loop import PiecewiseJSONResponse, off_loop
from server.api.quotas import Quotas, quotas_for
from server.api.schemas import (
    GenerateRequest,
    GenerateResponse,
    StreamEvent,
    logprobs_out,
    usage_of,
)
from server.api.submission import (
    StreamItem,
    complete,
    open_stream,
    sse_events,
    sse_response,
    unsent,
)
from server.config import Settings
from server.engine.interface import (
    EngineClient,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    TokenChunk,
)

router = APIRouter(tags=["generate"])


def _stream_doc() -> dict:
    schema = StreamEvent.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)  # Usage and FinishReason are components already
    return {
        "description": "JSON body, or with `stream: true` Server-Sent Events: one `data:` "
                       "event per token chunk (finish_reason null), a final event with "
                       "finish_reason and usage, then `data: [DONE]`. An error after the stream "
                       "started is one `data:` event holding the error envelope, then "
                       "`data: [DONE]`.",
        "content": {"text/event-stream": {"schema": schema}},
    }


async def _to_engine_request(body: GenerateRequest, *, engine: EngineClient,
                             settings: Settings, namespace: str,
                             quotas: Quotas) -> GenerationRequest:
    """The edge's checks (limits that depend on settings and the tenant's quotas) and
    tokenization, done once (admission.py: the same for the OpenAI routes)."""
    params = SamplingParams(max_new_tokens=body.max_new_tokens, temperature=body.temperature,
                            top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                            stop=tuple(body.stop), ignore_eos=body.ignore_eos,
                            presence_penalty=body.presence_penalty,
                            frequency_penalty=body.frequency_penalty,
                            repetition_penalty=body.repetition_penalty,
                            logprobs=body.logprobs)
    check_params(params, settings=settings, quotas=quotas,
                 vocab_size=engine.model_info.vocab_size)
    prompt_ids = await tokenize_text(engine, body.text, quotas=quotas,
                                     max_new_tokens=body.max_new_tokens)
    return to_engine_request(prompt_ids, adapter_id=body.adapter_id, namespace=namespace,
                             params=params)


@router.post(
    "/v1/generate", response_model=GenerateResponse, summary="Generate with an adapter",
    responses={200: _stream_doc(), **error_responses(401, 404, 413, 422, 429, 500, 503)},
)
async def generate(
    body: GenerateRequest, request: Request, engine: EngineDep,
    settings: SettingsDep, metrics: MetricsDep,
    namespace: TenantDep,
) -> Any:
    _, quotas = quotas_for(request, namespace)
    engine_request = await _to_engine_request(body, engine=engine, settings=settings,
                                        namespace=namespace, quotas=quotas)
    lease = admit(request, namespace, quotas, engine_request, stream=body.stream)
    headers = {"X-Request-Id": engine_request.request_id}
    if body.stream:
        items = await open_stream(request, engine, engine_request, metrics=metrics, lease=lease)
        return sse_response(_events(items, engine_request.adapter_id), headers)
    result, engine_ms = await complete(request, engine, engine_request, metrics=metrics,
                                       lease=lease)
    # Server-Timing tells a client how much of its latency was the engine's (benchmarks use it
    # to compute the HTTP layer's overhead).
    headers["Server-Timing"] = f"engine;dur={engine_ms:.3f}"
    top = body.logprobs
    # Thousands of tokens with top logprobs are written off the event loop.
    return await off_loop(lambda: PiecewiseJSONResponse(_body(result), headers=headers),
                          tokens=len(result.token_ids) * (1 if top is None else 1 + top))


def _body(result: GenerationResult) -> dict:
    """GenerateResponse as JSON; its logprobs written as logprobs_out writes them rather than
    validated as models (tens of thousands of them would hold the interpreter lock, and the
    event loop, for a second)."""
    body = GenerateResponse.from_result(dataclasses.replace(result, logprobs=None))
    out = body.model_dump(mode="json")
    if result.logprobs is not None:
        out["logprobs"] = logprobs_out(result.logprobs)
    return out


def _event(adapter_id: str | None, text: str, token_ids: Any, logprobs: Any,
           **extra: Any) -> str:
    payload = {"adapter_id": adapter_id, "text": text, "token_ids": list(token_ids),
               "finish_reason": None, "usage": None} | extra
    if logprobs is not None:
        payload["logprobs"] = logprobs_out(logprobs)
    return f"data: {json.dumps(payload)}\n\n"


def _events(items: AsyncIterator[StreamItem], adapter_id: str | None) -> AsyncIterator[str]:
    return sse_events(_frames(items, adapter_id), items, error_event)


async def _frames(items: AsyncIterator[StreamItem], adapter_id: str | None) -> AsyncIterator[str]:
    sent_text, sent_ids = "", 0
    async for item in items:
        if isinstance(item, TokenChunk):
            sent_text += item.text
            sent_ids += len(item.token_ids)
            yield _event(adapter_id, item.text, item.token_ids, item.logprobs)
            continue
        # Whatever the chunks did not carry yet (normally nothing) goes in the final event.
        rest = unsent(item.text, sent_text)
        usage = usage_of(item).model_dump()
        rest_logprobs = None if item.logprobs is None else item.logprobs[sent_ids:]
        yield _event(adapter_id, rest, item.token_ids[sent_ids:], rest_logprobs,
                     finish_reason=str(item.finish_reason), usage=usage)
