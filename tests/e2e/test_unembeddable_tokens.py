"""Ids the model cannot embed, through the real server: a tokenizer that knows more tokens
than the model's input embedding has rows.

The embedding reads an id at or above its row count as a row of the prompt table, so such an
id in a request's text, chat, token-id prompt or template anchor would run the request with
whatever adapter holds that row: another tenant's soft prompt. Every such request is refused
with a 400 that names the token, on both engine modes, and the server keeps serving.
"""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from transformers import AutoTokenizer

from tests.e2e.conftest import ARCH, ENGINE_MODES, SERVER_FLAGS, upload
from tests.e2e.server_process import ServerProcess
from tests.factories import (
    UNEMBEDDABLE_TOKENS,
    make_adapter,
    with_chat_template,
    with_unembeddable_tokens,
)

TOKEN = UNEMBEDDABLE_TOKENS[0]
KEYS = {"tenant-a": "key-a", "tenant-b": "key-b"}
# Stored while the model's tokenizer did not know TOKEN (it was bytes then); served after the
# tokenizer gained it, its anchor tokenizes to an id past the embedding.
OLD_TEMPLATE = "{soft} " + TOKEN + " {text}"


def _auth(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


def _upload(client: httpx.Client, tenant: str, adapter_id: str, adapter_dir, *,
            template: str | None = None) -> httpx.Response:
    return upload(client, adapter_id, adapter_dir, template=template, headers=_auth(tenant))


@pytest.fixture(scope="module")
def setup(tiny_model_dirs, tmp_path_factory):
    """(the model whose tokenizer outgrew its embedding, a keys file, a store written while the
    tokenizer was the plain one, the adapter dir)."""
    root = tmp_path_factory.mktemp("unembeddable")
    plain = with_chat_template(tiny_model_dirs[ARCH], root / "plain")
    grown = with_unembeddable_tokens(plain, root / "grown")
    keys = root / "keys.json"
    keys.write_text(json.dumps({"tenants": [{"name": n, "keys": [k]} for n, k in KEYS.items()]}))
    adapter = make_adapter(plain, root / "adapter", "prompt_tuning", num_virtual_tokens=4,
                           seed=3)
    store = root / "store"
    with ServerProcess(plain, store, root / "plain.log", *SERVER_FLAGS,
                       "--api-keys", str(keys)) as proc, \
            httpx.Client(base_url=proc.url, timeout=60) as c:
        assert _upload(c, "tenant-a", "old-tpl", adapter, template=OLD_TEMPLATE).status_code == 201
        assert _upload(c, "tenant-b", "b-prompt", adapter).status_code == 201
    return grown, keys, store, adapter


@pytest.fixture(scope="module", **ENGINE_MODES)
def served(request, setup, tmp_path_factory):
    grown, keys, store, adapter = setup
    root = tmp_path_factory.mktemp("grown-server")
    shutil.copytree(store, root / "store", symlinks=True)
    with ServerProcess(grown, root / "store", root / "server.log", *SERVER_FLAGS,
                       "--api-keys", str(keys), *request.param) as proc:
        yield proc, adapter, grown


@pytest.fixture()
def client(served):
    with httpx.Client(base_url=served[0].url, timeout=60) as c:
        yield c


def _names_the_token(response: httpx.Response) -> str:
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert TOKEN in message and "embed" in message, message
    return message


def _still_serves(client: httpx.Client) -> None:
    r = client.post("/v1/generate", json={"adapter_id": "b-prompt", "text": "hello",
                                          "max_new_tokens": 3}, headers=_auth("tenant-b"))
    assert r.status_code == 200, r.text


def test_the_tokenizer_outgrew_the_embedding(served):
    grown = served[2]
    assert len(AutoTokenizer.from_pretrained(grown)) > json.loads(
        (grown / "config.json").read_text())["vocab_size"]


def test_the_startup_log_names_the_tokens_the_model_cannot_embed(served):
    log = served[0].log()
    assert "token(s) the model's input embedding has no row for" in log
    assert TOKEN in log


def test_a_stored_template_whose_anchor_became_unembeddable_is_refused(client):
    """Before: the anchor's id read a row of the prompt table, so tenant a's request ran with
    whatever adapter held it (tenant b's soft prompt here)."""
    r = client.post("/v1/generate", json={"adapter_id": "old-tpl", "text": "hi",
                                          "max_new_tokens": 4}, headers=_auth("tenant-a"))
    assert r.json()["error"]["type"] == "unembeddable_token"
    assert "template" in _names_the_token(r)
    _still_serves(client)


def test_an_upload_whose_anchor_holds_the_token_is_refused_and_not_stored(client, served):
    r = _upload(client, "tenant-a", "new-tpl", served[1], template=OLD_TEMPLATE)
    assert r.json()["error"]["type"] == "invalid_template"
    _names_the_token(r)
    assert client.get("/v1/adapters/new-tpl", headers=_auth("tenant-a")).status_code == 404


def test_text_holding_the_token_is_refused_on_generate(client):
    r = client.post("/v1/generate", json={"adapter_id": "b-prompt", "text": f"x {TOKEN} y",
                                          "max_new_tokens": 2}, headers=_auth("tenant-b"))
    assert r.json()["error"]["type"] == "unembeddable_token"
    _names_the_token(r)


@pytest.mark.parametrize("extra", [{}, {"echo": True, "logprobs": 1, "max_tokens": 1}],
                         ids=["plain", "echo"])
def test_a_completion_prompt_holding_the_token_is_refused(client, extra):
    body = {"model": "b-prompt", "prompt": f"a {TOKEN}", "max_tokens": 2, **extra}
    _names_the_token(client.post("/v1/completions", json=body, headers=_auth("tenant-b")))


def test_a_token_id_prompt_naming_the_token_is_refused(client, served):
    grown = served[2]
    token_id = AutoTokenizer.from_pretrained(grown).convert_tokens_to_ids(TOKEN)
    body = {"model": "b-prompt", "prompt": [5, 6, token_id], "max_tokens": 2}
    r = client.post("/v1/completions", json=body, headers=_auth("tenant-b"))
    assert r.status_code == 400, r.text
    assert str(token_id) in r.json()["error"]["message"]


def test_a_chat_message_holding_the_token_is_refused(client):
    body = {"model": "b-prompt", "max_tokens": 2,
            "messages": [{"role": "user", "content": f"look: {TOKEN}"}]}
    _names_the_token(client.post("/v1/chat/completions", json=body, headers=_auth("tenant-b")))
    _still_serves(client)
