"""Hostile text and lenient-looking values through the real server, in both engine modes.

A lone UTF-16 surrogate (JSON's "\\ud800") in any text field is refused at the edge with the
route's validation error naming the field, never a 5xx from the tokenizer. Booleans are not
integers and strings are not numbers. An upload's template takes ASCII digits only, no control
or bidi-override characters, and a template over its limit is an `invalid_template` naming the
limit in characters. After each case the server still answers a normal request.
"""

from __future__ import annotations

import json

import httpx
import pytest

from adapters_store.template import MAX_TEMPLATE_CHARS
from tests.e2e.conftest import ENGINE_MODES
from tests.e2e.server_process import ServerProcess

SURROGATE = "\ud800"


@pytest.fixture(scope="module", **ENGINE_MODES)
def text_server(request, chat_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-text")
    with ServerProcess(chat_model_dir, root / "store", root / "server.log",
                       "--max-batch-size", "8", "--max-wait-ms", "5",
                       "--max-upload-bytes", "1000000", *request.param) as proc:
        yield proc


@pytest.fixture()
def tclient(text_server):
    with httpx.Client(base_url=text_server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model_name(text_server) -> str:
    return httpx.get(text_server.url + "/v1/models", timeout=60).json()["data"][0]["id"]


def _post_raw(client: httpx.Client, path: str, body: dict) -> httpx.Response:
    """json.dumps writes a lone surrogate as its \\ud800 escape; httpx's json= cannot."""
    return client.post(path, content=json.dumps(body).encode(),
                       headers={"content-type": "application/json"})


def _still_serves(client: httpx.Client) -> None:
    r = client.post("/v1/generate", json={"text": "still there?", "max_new_tokens": 2})
    assert r.status_code == 200, r.text[:500]


def _native_error(r: httpx.Response, status: int, error_type: str) -> str:
    assert r.status_code == status, (r.status_code, r.text[:500])
    error = r.json()["error"]
    assert error["type"] == error_type, error
    return error["message"]


def _openai_error(r: httpx.Response) -> dict:
    assert r.status_code == 400, (r.status_code, r.text[:500])
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error", error
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


# --- lone surrogates in every text field ---------------------------------------------------

NATIVE_SURROGATES = {
    "generate-text": ({"text": f"a{SURROGATE}b"}, "text"),
    "generate-stop": ({"text": "hi", "stop": ["ok", SURROGATE]}, "stop.1"),
}


@pytest.mark.parametrize("case", list(NATIVE_SURROGATES))
def test_a_lone_surrogate_in_generate_is_a_422_naming_the_field(tclient, case):
    body, field = NATIVE_SURROGATES[case]
    message = _native_error(_post_raw(tclient, "/v1/generate", body), 422, "validation_error")
    assert message.startswith(f"{field}:") and "surrogate" in message, message
    _still_serves(tclient)


# (path, body without `model`, the param OpenAI's error names)
OPENAI_SURROGATES = {
    "completions-prompt": ("/v1/completions", {"prompt": SURROGATE}, "prompt"),
    "completions-prompt-list": ("/v1/completions", {"prompt": ["fine", f"x{SURROGATE}"]},
                                "prompt.1"),
    "completions-stop": ("/v1/completions", {"prompt": "hi", "stop": SURROGATE}, "stop"),
    "completions-stop-list": ("/v1/completions", {"prompt": "hi", "stop": ["a", SURROGATE]},
                              "stop.1"),
    "completions-user": ("/v1/completions", {"prompt": "hi", "user": SURROGATE}, "user"),
    "completions-suffix": ("/v1/completions", {"prompt": "hi", "suffix": SURROGATE},
                           "suffix"),
    "chat-content": ("/v1/chat/completions",
                     {"messages": [{"role": "user", "content": f"hey {SURROGATE}"}]},
                     "messages.0.content"),
    "chat-content-part": ("/v1/chat/completions",
                          {"messages": [{"role": "system", "content": "be brief"},
                                        {"role": "user", "content": [
                                            {"type": "text", "text": "ok"},
                                            {"type": "text", "text": SURROGATE}]}]},
                          "messages.1.content.1.text"),
    "chat-name": ("/v1/chat/completions",
                  {"messages": [{"role": "user", "content": "hey", "name": SURROGATE}]},
                  "messages.0.name"),
    "chat-stop": ("/v1/chat/completions",
                  {"messages": [{"role": "user", "content": "hey"}], "stop": [SURROGATE]},
                  "stop.0"),
    "chat-user": ("/v1/chat/completions",
                  {"messages": [{"role": "user", "content": "hey"}], "user": SURROGATE},
                  "user"),
    "tokenize-prompt": ("/tokenize", {"prompt": f"{SURROGATE}!"}, "prompt"),
    "tokenize-messages": ("/tokenize",
                          {"messages": [{"role": "user", "content": SURROGATE}]},
                          "messages.0.content"),
    "tokenize-message-part": ("/tokenize",
                              {"messages": [{"role": "user", "content": [
                                  {"type": "text", "text": SURROGATE}]}]},
                              "messages.0.content.0.text"),
    "tokenize-message-name": ("/tokenize",
                              {"messages": [{"role": "user", "content": "x",
                                             "name": SURROGATE}]},
                              "messages.0.name"),
}


@pytest.mark.parametrize("case", list(OPENAI_SURROGATES))
def test_a_lone_surrogate_on_the_openai_routes_is_a_400_naming_the_param(tclient, model_name,
                                                                        case):
    path, body, param = OPENAI_SURROGATES[case]
    error = _openai_error(_post_raw(tclient, path, {"model": model_name} | body))
    assert error["param"] == param, error
    assert "surrogate" in error["message"] and "U+D800" in error["message"], error
    _still_serves(tclient)


def test_a_lone_surrogate_in_model_is_refused_not_a_5xx(tclient):
    r = _post_raw(tclient, "/v1/completions", {"model": SURROGATE, "prompt": "hi"})
    assert _openai_error(r)["param"] == "model"
    _still_serves(tclient)


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/generate", {"text": "hi", SURROGATE: 1}),
    ("/v1/completions", {"prompt": "hi", SURROGATE: 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", SURROGATE: 1}]}),
    ("/tokenize", {"prompt": "hi", SURROGATE: 1}),
], ids=["generate", "completions", "chat-message", "tokenize"])
def test_a_lone_surrogate_in_a_field_name_is_a_4xx(tclient, model_name, path, body):
    """Refused as any unknown field is; the error must not echo the name raw (a JSON
    response cannot encode it)."""
    if path != "/v1/generate":
        body = {"model": model_name} | body
    r = _post_raw(tclient, path, body)
    assert r.status_code == (422 if path == "/v1/generate" else 400), r.text[:500]
    assert r.json()["error"]["message"]
    _still_serves(tclient)


def test_a_surrogate_pair_is_ordinary_text(tclient, model_name):
    """\\ud83e\\uddea is one character (🧪), not a lone surrogate: served."""
    r = _post_raw(tclient, "/v1/completions",
                  {"model": model_name, "prompt": "\U0001f9ea", "max_tokens": 1})
    assert r.status_code == 200, r.text[:500]


# --- booleans are not integers, strings are not numbers ------------------------------------

COMPLETION_COERCIONS = {
    "prompt-bools": ({"prompt": [True, False]}, "prompt.0"),
    "prompt-nested-bools": ({"prompt": [[1, 2], [True]]}, "prompt.1.0"),
    "prompt-float-ids": ({"prompt": [1.0, 2.0]}, "prompt.0"),
    "prompt-string-ids": ({"prompt": [["1", "2"]]}, "prompt.0.0"),
    "prompt-mixed": ({"prompt": [5, "a"]}, "prompt.1"),
    "logprobs-string": ({"prompt": "hi", "logprobs": "3"}, "logprobs"),
    "logprobs-true": ({"prompt": "hi", "logprobs": True}, "logprobs"),
    "max_tokens-string": ({"prompt": "hi", "max_tokens": "2"}, "max_tokens"),
    "max_tokens-true": ({"prompt": "hi", "max_tokens": True}, "max_tokens"),
    "n-true": ({"prompt": "hi", "n": True}, "n"),
    "seed-string": ({"prompt": "hi", "seed": "7"}, "seed"),
    "temperature-string": ({"prompt": "hi", "temperature": "0.5"}, "temperature"),
    "temperature-true": ({"prompt": "hi", "temperature": True}, "temperature"),
    "echo-string": ({"prompt": "hi", "echo": "true"}, "echo"),
    "stream-int": ({"prompt": "hi", "stream": 1}, "stream"),
}


@pytest.mark.parametrize("case", list(COMPLETION_COERCIONS))
def test_completions_takes_no_lenient_coercion(tclient, model_name, case):
    body, param = COMPLETION_COERCIONS[case]
    error = _openai_error(tclient.post("/v1/completions",
                                       json={"model": model_name, "max_tokens": 1} | body))
    assert error["param"] == param, error
    _still_serves(tclient)


CHAT_COERCIONS = {
    "top_logprobs-string": ({"logprobs": True, "top_logprobs": "2"}, "top_logprobs"),
    "top_logprobs-true": ({"logprobs": True, "top_logprobs": True}, "top_logprobs"),
    "logprobs-string": ({"logprobs": "true"}, "logprobs"),
    "logprobs-int": ({"logprobs": 1}, "logprobs"),
    "max_completion_tokens-true": ({"max_completion_tokens": True}, "max_completion_tokens"),
    "stream_options-string": ({"stream": True, "stream_options": {"include_usage": "yes"}},
                              "stream_options.include_usage"),
}


@pytest.mark.parametrize("case", list(CHAT_COERCIONS))
def test_chat_takes_no_lenient_coercion(tclient, model_name, case):
    body, param = CHAT_COERCIONS[case]
    error = _openai_error(tclient.post("/v1/chat/completions", json={
        "model": model_name, "messages": [{"role": "user", "content": "hey"}],
        "max_tokens": 1} | body))
    assert error["param"] == param, error
    _still_serves(tclient)


GENERATE_COERCIONS = {
    "max_new_tokens-true": {"max_new_tokens": True},
    "max_new_tokens-string": {"max_new_tokens": "2"},
    "max_new_tokens-float": {"max_new_tokens": 2.0},
    "logprobs-true": {"logprobs": True},
    "top_k-string": {"top_k": "5"},
    "seed-true": {"seed": True},
    "temperature-string": {"temperature": "0"},
    "ignore_eos-int": {"ignore_eos": 1},
    "stream-string": {"stream": "false"},
    "text-number": {"text": 12},
}


@pytest.mark.parametrize("case", list(GENERATE_COERCIONS))
def test_generate_takes_no_lenient_coercion(tclient, case):
    body = {"text": "hi", "max_new_tokens": 1} | GENERATE_COERCIONS[case]
    field = next(iter(GENERATE_COERCIONS[case]))
    message = _native_error(tclient.post("/v1/generate", json=body), 422, "validation_error")
    assert message.startswith(f"{field}:"), message
    _still_serves(tclient)


@pytest.mark.parametrize("tokens", [[True, False], ["1"], [1.0]], ids=["bools", "strings",
                                                                       "floats"])
def test_detokenize_takes_token_ids_only(tclient, tokens):
    error = _openai_error(tclient.post("/detokenize", json={"tokens": tokens}))
    assert error["param"] == "tokens.0", error
    _still_serves(tclient)


def test_tokenize_flags_are_booleans(tclient):
    error = _openai_error(tclient.post("/tokenize", json={"prompt": "hi",
                                                          "add_special_tokens": "no"}))
    assert error["param"] == "add_special_tokens", error


def test_json_numbers_that_are_whole_still_fill_float_fields(tclient, model_name):
    """Clients write temperature 1 and top_p 1 as integers: a float field takes them."""
    r = tclient.post("/v1/completions", json={"model": model_name, "prompt": "hi",
                                              "max_tokens": 1, "temperature": 0, "top_p": 1,
                                              "presence_penalty": 0})
    assert r.status_code == 200, r.text[:500]
    r = tclient.post("/v1/generate", json={"text": "hi", "max_new_tokens": 1,
                                           "temperature": 1, "top_p": 1, "seed": 3})
    assert r.status_code == 200, r.text[:500]


# --- templates at upload ------------------------------------------------------------------

def _upload(client: httpx.Client, adapter_id: str, adapter_dir, template: str) -> httpx.Response:
    files = {
        "config": ("adapter_config.json", (adapter_dir / "adapter_config.json").read_bytes(),
                   "application/json"),
        "weights": ("adapter_model.safetensors",
                    (adapter_dir / "adapter_model.safetensors").read_bytes(),
                    "application/octet-stream"),
    }
    return client.post("/v1/adapters", data={"adapter_id": adapter_id, "template": template},
                       files=files)


@pytest.fixture(scope="module")
def rows4(adapter_dirs):
    """The 4-row prompt-tuning adapter's directory."""
    return adapter_dirs["prompt_tuning"][0]


LIMIT = f"at most {MAX_TEMPLATE_CHARS} characters"
BAD_TEMPLATES = {
    # (template for a 4-row adapter, what the message must name)
    "fullwidth-digit": ("{soft:\uff14}{text}", ("U+FF14", "ASCII digits")),
    "arabic-indic-digit": ("{soft:\u0663}{soft}{text}", ("U+0663", "ASCII digits")),
    "nul": ("{soft} Review:\x00{text}", ("U+0000", "at character 14")),
    "escape": ("{soft}\x1b[31m{text}", ("U+001B", "at character 6")),
    "delete": ("{soft}{text}\x7f", ("U+007F", "at character 12")),
    "c1-control": ("{soft}\x85{text}", ("U+0085", "at character 6")),
    "right-to-left-override": ("{soft}{text} \u202eSentiment:",
                               ("U+202E (RIGHT-TO-LEFT OVERRIDE)", "at character 13")),
    "first-strong-isolate": ("{soft}\u2068{text}", ("U+2068", "at character 6")),
    "over-the-limit": ("{soft}{text}" + "x" * MAX_TEMPLATE_CHARS, (LIMIT,)),
    "far-over-the-limit": ("{soft}{text}" + "x" * (20 * MAX_TEMPLATE_CHARS), (LIMIT,)),
}


@pytest.mark.parametrize("case", list(BAD_TEMPLATES))
def test_a_bad_template_is_an_invalid_template_naming_the_character(tclient, rows4, case):
    template, named = BAD_TEMPLATES[case]
    adapter_id = f"tpl-{case}"
    message = _native_error(_upload(tclient, adapter_id, rows4, template), 400,
                            "invalid_template")
    assert all(part in message for part in named), message
    assert tclient.get(f"/v1/adapters/{adapter_id}").status_code == 404  # nothing stored
    _still_serves(tclient)


GOOD_TEMPLATES = {
    "newline-and-tab": "{soft}Review:\n{text}\tLabel:",
    "carriage-return": "{soft}Q: {text}\r\nA:",
    "ascii-leading-zero": "{soft:04}{text}",
}


@pytest.mark.parametrize("case", list(GOOD_TEMPLATES))
def test_templates_within_the_grammar_are_stored_and_served(tclient, rows4, case):
    template = GOOD_TEMPLATES[case]
    r = _upload(tclient, f"tpl-ok-{case}", rows4, template)
    assert r.status_code == 201, r.text[:500]
    assert r.json()["template"] == template
    r = tclient.post("/v1/generate", json={"adapter_id": f"tpl-ok-{case}", "text": "hi",
                                           "max_new_tokens": 2})
    assert r.status_code == 200, r.text[:500]


def test_a_template_that_is_not_utf8_is_an_invalid_template(tclient, rows4):
    """UTF-8 has no form for a surrogate: the bytes of one (CESU-8's) are not a template."""
    files = {
        "config": ("adapter_config.json", (rows4 / "adapter_config.json").read_bytes(),
                   "application/json"),
        "weights": ("adapter_model.safetensors",
                    (rows4 / "adapter_model.safetensors").read_bytes(),
                    "application/octet-stream"),
        "template": (None, b"{soft}\xed\xa0\x80{text}"),
    }
    r = tclient.post("/v1/adapters", data={"adapter_id": "tpl-not-utf8"}, files=files)
    message = _native_error(r, 400, "invalid_template")
    assert "not UTF-8" in message and "byte 6" in message, message
    assert tclient.get("/v1/adapters/tpl-not-utf8").status_code == 404
    _still_serves(tclient)


def test_the_template_limit_counts_characters_not_bytes(tclient, rows4):
    """1,100 four-byte characters are 4,400 bytes but well within the character limit."""
    template = "{soft}{text} " + "\U0001f9ea" * 1100
    r = _upload(tclient, "tpl-ok-multibyte", rows4, template)
    assert r.status_code == 201, r.text[:500]
    assert r.json()["template"] == template
