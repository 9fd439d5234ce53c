"""P-tuning templates through the real server: rows anywhere around the text, with anchors.

The upload field, the record, the errors, /v1/generate and chat, on the Llama-shaped model
(the engine core). Outputs are checked token for token against the definition: the adapter's
rows (PEFT's get_prompt) and the token embeddings of the anchors and the text, spliced in
template order, decoded greedily by full recomputation in float32. BLOOM and T5 (static
batching; T5's template is its encoder's input) are checked the same way on the engine in
process (tests/engine/test_engine.py).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from server.engine.chat import render_chat
from server.engine.detokenizer import DECODE_KWARGS
from tests.e2e.conftest import SERVER_FLAGS, tar_gz
from tests.e2e.server_process import ServerProcess
from tests.factories import load_base, make_adapter, templated_reference, with_chat_template

ROWS = 5
TEMPLATE = "{soft:2} Review: {text} {soft} Sentiment:"
TEXTS = ("I love it.", "terrible, never again", "ok")


@pytest.fixture(scope="module")
def arch() -> str:
    return "llama"


@pytest.fixture(scope="module")
def served(arch, tiny_model_dirs, tmp_path_factory):
    """(model dir with a chat template, its server, the adapter dir)."""
    root = tmp_path_factory.mktemp(f"templates-{arch}")
    model_dir = with_chat_template(tiny_model_dirs[arch], root / "model")
    adapter = make_adapter(model_dir, root / "adapter", "p_tuning_mlp", num_virtual_tokens=ROWS,
                           seed=7)
    with ServerProcess(model_dir, root / "store", root / "server.log", *SERVER_FLAGS) as proc:
        yield model_dir, proc, adapter


@pytest.fixture()
def client(served):
    with httpx.Client(base_url=served[1].url, timeout=60) as c:
        yield c


def _upload(client: httpx.Client, adapter_id: str, adapter_dir: Path, template: str | None, *,
            overwrite: bool = False) -> httpx.Response:
    files = {name: (name, (adapter_dir / name).read_bytes())
             for name in ("adapter_config.json", "adapter_model.safetensors")}
    data = {"adapter_id": adapter_id}
    if template is not None:
        data["template"] = template
    return client.post("/v1/adapters", data=data,
                       files={"config": files["adapter_config.json"],
                              "weights": files["adapter_model.safetensors"]},
                       params={"overwrite": "true"} if overwrite else None)


def _expected(model_dir: Path, adapter_dir: Path, text_ids: list[int], n: int) -> list[int]:
    return templated_reference(model_dir, adapter_dir, ROWS, text_ids, n)


def _anchor_tokens(model_dir: Path) -> int:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return sum(len(tokenizer(a, add_special_tokens=False)["input_ids"])
               for a in (" Review: ", " ", " Sentiment:"))


def test_the_record_carries_the_template_and_null_without_one(client, served, tmp_path):
    _, _, adapter = served
    r = _upload(client, "tpl", adapter, TEMPLATE)
    assert r.status_code == 201, r.text
    assert r.json()["template"] == TEMPLATE
    assert client.get("/v1/adapters/tpl").json()["template"] == TEMPLATE
    plain = _upload(client, "plain", adapter, None)
    assert plain.status_code == 201 and plain.json()["template"] is None
    listed = {a["adapter_id"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert listed["plain"]["template"] is None and listed["tpl"]["template"] == TEMPLATE
    archive = upload_archive_with_template(client, "tpl-archive",
                                           tar_gz(adapter, tmp_path / "a.tar.gz"))
    assert archive.status_code == 201 and archive.json()["template"] == TEMPLATE


def upload_archive_with_template(client: httpx.Client, adapter_id: str,
                                 archive: Path) -> httpx.Response:
    return client.post("/v1/adapters", data={"adapter_id": adapter_id, "template": TEMPLATE},
                       files={"archive": (archive.name, archive.read_bytes())})


@pytest.mark.parametrize(("template", "message"), [
    ("{soft}", "{text} exactly once"),
    ("{soft:2}{text}", "uses 2 rows; the adapter has 5"),
    ("{soft:9}{text}", "uses 9 rows"),
    ("{soft:0}{soft}{text}", "at least one row"),
    ("{soft}{text}{oops}", "unknown marker {oops}"),
    ("{soft}{text} {", "unmatched '{'"),
])
def test_a_bad_template_is_refused_and_nothing_is_stored(client, served, template, message):
    _, _, adapter = served
    r = _upload(client, "bad", adapter, template)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_template"
    assert message in r.json()["error"]["message"]
    assert client.get("/v1/adapters/bad").status_code == 404
    # An overwrite with a bad template keeps the version already stored.
    assert _upload(client, "kept", adapter, TEMPLATE).status_code in (201, 409)
    r = _upload(client, "kept", adapter, template, overwrite=True)
    assert r.status_code == 400
    assert client.get("/v1/adapters/kept").json()["template"] == TEMPLATE


def test_generate_splices_rows_anchors_and_text_in_template_order(client, served):
    model_dir, _, adapter = served
    assert _upload(client, "gen", adapter, TEMPLATE, overwrite=True).status_code == 201
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for text in TEXTS:
        r = client.post("/v1/generate", json={"adapter_id": "gen", "text": text,
                                              "max_new_tokens": 8})
        assert r.status_code == 200, r.text
        body = r.json()
        text_ids = tokenizer(text)["input_ids"]
        assert body["token_ids"] == _expected(model_dir, adapter, text_ids, 8), text
        assert body["usage"]["prompt_tokens"] == len(text_ids) + _anchor_tokens(model_dir)
        assert body["usage"]["virtual_tokens"] == ROWS
    # The same rows without the template are a different request (a prefix).
    assert _upload(client, "pre", adapter, None, overwrite=True).status_code == 201
    r = client.post("/v1/generate", json={"adapter_id": "pre", "text": TEXTS[0],
                                          "max_new_tokens": 8})
    assert r.json()["usage"]["prompt_tokens"] == len(tokenizer(TEXTS[0])["input_ids"])


def test_tokenize_counts_rows_as_virtual_and_anchors_as_prompt_tokens_as_generate_does(
        client, served):
    """/tokenize and /v1/generate agree: virtual_tokens is the rows, the anchors are counted
    with the text, and count is every position the request takes."""
    _, _, adapter = served
    assert _upload(client, "tok", adapter, TEMPLATE, overwrite=True).status_code == 201
    tokenized = client.post("/tokenize", json={"model": "tok", "prompt": TEXTS[0]})
    generated = client.post("/v1/generate", json={"adapter_id": "tok", "text": TEXTS[0],
                                                  "max_new_tokens": 1})
    assert tokenized.status_code == 200 and generated.status_code == 200, tokenized.text
    usage, body = generated.json()["usage"], tokenized.json()
    assert body["virtual_tokens"] == usage["virtual_tokens"] == ROWS
    assert body["count"] == usage["prompt_tokens"] + usage["virtual_tokens"]
    assert body["count"] > len(body["tokens"]) + ROWS  # the anchors are in the count


def test_chat_puts_the_rendered_messages_where_text_stands(client, served, arch):
    model_dir, _, adapter = served
    assert _upload(client, "chat", adapter, TEMPLATE, overwrite=True).status_code == 201
    messages = [{"role": "user", "content": "Is this review positive?"}]
    r = client.post("/v1/chat/completions", json={"model": "chat", "messages": messages,
                                                  "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = render_chat(tokenizer, messages, model_name=arch)
    assert r.json()["usage"]["prompt_tokens"] == len(ids) + _anchor_tokens(model_dir)
    expected = _expected(model_dir, adapter, ids, 6)
    if expected[-1] == load_base(model_dir).generation_config.eos_token_id:
        expected = expected[:-1]
    content = r.json()["choices"][0]["message"]["content"]
    assert content == tokenizer.decode(expected, **DECODE_KWARGS)
