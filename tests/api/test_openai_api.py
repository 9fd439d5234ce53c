"""OpenAI routes in process: the exact error shape, a model without a chat template, SSE framing,
and that /v1/generate keeps the DESIGN envelope."""

from __future__ import annotations

import json
import logging
import typing
from types import SimpleNamespace

import pytest

from server.api.errors import AuthError, RequestQuotaError, TooManyRequestsError
from server.api.openai.errors import openai_error
from server.api.openai.schemas import FinishReason as OpenAIFinishReason
from server.api.openai.stream import finish_reason
from server.engine.interface import FinishReason
from tests.api.conftest import assert_envelope


def assert_openai_error(r, status: int, *, param: str | None = None,
                        code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


async def base_name(client) -> str:
    return (await client.get("/v1/models")).json()["data"][0]["id"]


async def test_chat_without_template_is_400_naming_it(client):
    r = await client.post("/v1/chat/completions", json={
        "model": await base_name(client), "messages": [{"role": "user", "content": "hi"}]})
    error = assert_openai_error(r, 400)
    assert "chat template" in error["message"]
    assert error["type"] == "invalid_request_error"


async def test_validation_errors_are_400_in_openai_shape(client):
    r = await client.post("/v1/completions", json={"model": "m", "prompt": "x",
                                                   "temperature": -1})
    assert_openai_error(r, 400, param="temperature")
    r = await client.post("/v1/completions", json={"model": "m"})
    assert_openai_error(r, 400, param="prompt")
    r = await client.post("/v1/completions", json={"model": "m", "prompt": "x",
                                                   "frobnicate": 1})
    assert_openai_error(r, 400, param="frobnicate")


async def test_bad_token_id_prompts_and_quota_limits_are_400(client):
    name = await base_name(client)
    r = await client.post("/v1/completions", json={"model": name, "prompt": [1, -2, 3]})
    assert_openai_error(r, 400, param="prompt")
    r = await client.post("/v1/completions", json={"model": name, "prompt": [1, "a"]})
    assert_openai_error(r, 400, param="prompt.1")  # token ids, the second one not an id
    r = await client.post("/v1/completions", json={"model": name, "prompt": []})
    assert_openai_error(r, 400, param="prompt")
    r = await client.post("/v1/completions", json={"model": name, "prompt": "x",
                                                   "max_tokens": 1000})  # limit is 64 here
    error = assert_openai_error(r, 400, param="max_tokens")
    assert "max_tokens=1000" in error["message"] and "max_new_tokens" not in error["message"]


async def test_unknown_model_is_404_model_not_found(client):
    r = await client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert_openai_error(r, 404, param="model", code="model_not_found")


async def test_native_generate_keeps_design_envelope(client):
    r = await client.post("/v1/generate", json={"adapter_id": "nope", "text": "x"})
    assert_envelope(r, 404, "adapter_not_found")


async def test_completion_stream_framing(client):
    body = {"model": await base_name(client), "prompt": "hello", "max_tokens": 5,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 5


async def test_openapi_documents_openai_routes(client):
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(paths)


async def test_draining_refusal_is_openai_shaped(app, client):
    app.state.draining = True
    try:
        r = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
        native = await client.post("/v1/generate", json={"text": "x"})
    finally:
        app.state.draining = False
    assert_openai_error(r, 503, code="draining")
    assert_envelope(native, 503, "draining")


async def test_chat_stream_final_delta_is_empty(app, client, monkeypatch):
    engine = app.state.engine  # the plain tiny model has no template: render "hi" instead
    monkeypatch.setattr(engine, "apply_chat_template", lambda messages, **_: engine.tokenize("hi"))
    r = await client.post("/v1/chat/completions", json={
        "model": await base_name(client), "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3, "ignore_eos": True, "stream": True})
    chunks = [json.loads(e.removeprefix("data: ")) for e in r.text.split("\n\n")
              if e and e != "data: [DONE]"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": "length"}


def test_quota_refusals_map_to_openai_statuses():
    status, body, headers = openai_error(TooManyRequestsError("rate limit: x", retry_after_s=2.2))
    assert (status, body["error"]["type"], headers) == (429, "rate_limit_error",
                                                        {"retry-after": "3"})
    status, body, _ = openai_error(RequestQuotaError("max_new_tokens 9 is above the limit"))
    assert (status, body["error"]["type"]) == (400, "invalid_request_error")
    status, body, headers = openai_error(AuthError("invalid API key"))
    assert (status, body["error"]["type"]) == (401, "authentication_error")
    assert headers == {"www-authenticate": "Bearer"}


async def test_the_access_line_counts_every_choice(client, caplog):
    """n choices, whole or streamed: one access line whose token counts add up all of them,
    as usage does (each choice's prompt counted in the log, as the engine ran it)."""
    caplog.set_level(logging.INFO, logger="softprompt.access")
    name = await base_name(client)
    for stream in (False, True):
        caplog.clear()
        r = await client.post("/v1/completions", json={
            "model": name, "prompt": "log me", "max_tokens": 3, "n": 3, "ignore_eos": True,
            "stream": stream})
        assert r.status_code == 200
        lines = [json.loads(rec.getMessage()) for rec in caplog.records
                 if rec.name == "softprompt.access"]
        assert len(lines) == 1
        assert lines[0]["completion_tokens"] == 9 and lines[0]["prompt_tokens"] == 3 * 7


@pytest.mark.parametrize("reason", list(FinishReason))
@pytest.mark.parametrize("score_only", [False, True])
def test_every_engine_finish_reason_is_an_openai_one(reason, score_only):
    got = finish_reason(SimpleNamespace(finish_reason=reason),
                        SimpleNamespace(score_only=score_only))
    assert got in typing.get_args(OpenAIFinishReason)
    assert got == ("length" if score_only or reason is FinishReason.LENGTH else "stop")
