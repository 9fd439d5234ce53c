"""One real server per test module, on the tiny Llama-shaped model, plus PEFT-made adapters.

Modules that take ENGINE_MODES run against the built-in engine in process and in its own
process and, where vLLM is installed (the environment `.ci/vllm-env` builds), against
`--engine vllm` too: the same requests, the same expected answers. Select those with
`pytest -k onvllm tests/e2e`. Modules that take BUILTIN_AND_VLLM (the HTTP surface's own
tests) skip the built-in engine's second process.
"""

from __future__ import annotations

import importlib.util
import tarfile
from pathlib import Path

import httpx
import pytest

from tests.e2e.server_process import ServerProcess
from tests.factories import make_adapter, make_encoder_checkpoint, with_chat_template

# Heads of 32 dimensions: vLLM's CPU attention takes no smaller, and the built-in engine
# does not care, so one model serves every engine mode.
ARCH = "llama-hd32"


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs[ARCH]


@pytest.fixture(scope="module")
def chat_model_dir(model_dir, tmp_path_factory) -> Path:
    """The tiny model with a chat template in its tokenizer config."""
    return with_chat_template(model_dir, tmp_path_factory.mktemp("chat-model") / "model")


@pytest.fixture(scope="module")
def adapter_dirs(model_dir, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (directory to upload, directory PEFT loads as the reference)."""
    root = tmp_path_factory.mktemp("adapters")
    out: dict[str, tuple[Path, Path]] = {}
    for i, kind in enumerate(("prompt_tuning", "p_tuning_mlp", "p_tuning_lstm")):
        path = make_adapter(model_dir, root / kind, kind, num_virtual_tokens=4 + i, seed=10 + i)
        out[kind] = (path, path)
    reference = root / "encoder-reference"
    raw = make_encoder_checkpoint(model_dir, root / "encoder-raw", "p_tuning_mlp",
                                  num_virtual_tokens=6, seed=21, reference_dir=reference)
    out["encoder_raw"] = (raw, reference)
    return out


def tar_gz(adapter_dir: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            tar.add(adapter_dir / name, arcname=name)
    return out


def upload(client: httpx.Client, adapter_id: str, adapter_dir: Path, *,
           overwrite: bool = False, template: str | None = None,
           headers: dict[str, str] | None = None) -> httpx.Response:
    files = {
        "config": ("adapter_config.json", (adapter_dir / "adapter_config.json").read_bytes(),
                   "application/json"),
        "weights": ("adapter_model.safetensors",
                    (adapter_dir / "adapter_model.safetensors").read_bytes(),
                    "application/octet-stream"),
    }
    params = {"overwrite": "true"} if overwrite else None
    data = {"adapter_id": adapter_id}
    if template is not None:
        data["template"] = template
    return client.post("/v1/adapters", data=data, files=files, params=params, headers=headers)


def upload_archive(client: httpx.Client, adapter_id: str, archive: Path) -> httpx.Response:
    return client.post("/v1/adapters", data={"adapter_id": adapter_id},
                       files={"archive": (archive.name, archive.read_bytes(),
                                          "application/gzip")})


SERVER_FLAGS = ("--max-batch-size", "32", "--max-wait-ms", "10", "--max-upload-bytes", "1000000")
# vLLM's engine on a CPU: a small KV cache and context, so a module's engine starts in about a
# minute; flags given after SERVER_FLAGS win.
VLLM_MODE = ("--engine", "vllm", "--kv-cache-memory", "128MiB", "--max-model-len", "512",
             "--max-batch-size", "8")
VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None
# A module overrides its server fixture with these params to run its tests against every
# engine: the built-in one in process and in a process of its own, and vLLM where installed.
ENGINE_MODES = {
    "params": [(), ("--engine-process",), *([VLLM_MODE] if VLLM_INSTALLED else [])],
    "ids": ["in-process", "engine-process", *(["onvllm"] if VLLM_INSTALLED else [])],
}
# For modules whose subject is the HTTP surface rather than the engine's transport: the
# built-in engine in process, and vLLM where installed.
BUILTIN_AND_VLLM = {
    "params": [(), *([VLLM_MODE] if VLLM_INSTALLED else [])],
    "ids": ["in-process", *(["onvllm"] if VLLM_INSTALLED else [])],
}


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    with ServerProcess(model_dir, root / "store", root / "server.log", *SERVER_FLAGS) as proc:
        yield proc


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
