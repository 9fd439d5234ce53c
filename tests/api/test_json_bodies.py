"""JSON bodies that a client got slightly wrong get a message that says how to fix them: a body
sent without `content-type: application/json` names the header (on every JSON route), and an
unknown field on the OpenAI routes suggests the field it meant, as /v1/generate does."""

from __future__ import annotations

import json

from tests.api.test_openai_api import assert_openai_error, base_name

# A valid body for each JSON route; only the content-type is wrong.
BODIES = {"/v1/generate": {"text": "x"},
          "/v1/completions": {"prompt": "x"},
          "/v1/chat/completions": {"messages": [{"role": "user", "content": "x"}]},
          "/tokenize": {"prompt": "x"},
          "/detokenize": {"tokens": [1]}}


async def _json_routes(client) -> set[str]:
    """Every route whose request body is JSON, as the served schema says."""
    paths = (await client.get("/openapi.json")).json()["paths"]
    return {path for path, ops in paths.items() for op in ops.values()
            if "application/json" in op.get("requestBody", {}).get("content", {})}


async def test_a_json_body_without_its_content_type_is_told_to_send_it(client):
    assert await _json_routes(client) == set(BODIES)
    model = await base_name(client)
    for path, body in BODIES.items():
        if path.startswith("/v1/c"):
            body = {"model": model} | body
        for content_type in ("application/x-www-form-urlencoded", "text/plain"):
            r = await client.post(path, content=json.dumps(body),
                                  headers={"content-type": content_type})
            assert r.status_code in (400, 422), (path, r.text)
            message = r.json()["error"]["message"]
            assert "content-type: application/json" in message, (path, message)
        # The same bytes with the header are served (or refused for another reason).
        r = await client.post(path, content=json.dumps(body),
                              headers={"content-type": "application/json"})
        assert "content-type" not in r.text, (path, r.text)


async def test_openai_routes_suggest_the_field_a_misspelled_one_meant(client):
    model = await base_name(client)
    r = await client.post("/v1/completions", json={"model": model, "prompt": "x",
                                                   "max_token": 3})
    error = assert_openai_error(r, 400, param="max_token")
    assert "unknown field 'max_token' (did you mean 'max_tokens'?)" in error["message"]
    assert "the fields are model, max_tokens," in error["message"]

    r = await client.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "x", "nmae": "a"}],
        "max_new_tokens": 3, "temperature": -1})
    error = assert_openai_error(r, 400)
    message = error["message"]
    assert "'max_new_tokens' (did you mean 'max_tokens'?)" in message
    assert "messages.0: unknown field 'nmae' (did you mean 'name'?)" in message
    assert "temperature:" in message  # the other problems are still named

    r = await client.post("/tokenize", json={"model": model, "promt": "x"})
    error = assert_openai_error(r, 400, param="promt")
    assert "'promt' (did you mean 'prompt'?)" in error["message"]
