"""The vllm engine's tests: the real server with `--engine vllm`, on vLLM's CPU build.

They need vLLM installed (`.ci/vllm-env` builds that environment; CI runs them there) and
skip, saying so, where it is not. Each module starts one server: a vLLM engine takes tens of
seconds to start on a CPU. The model is the tiny Llama with 32-dimension heads (vLLM's CPU
attention takes no smaller), in float32, so greedy output is checked token for token against
the definition: the adapter's rows (PEFT's get_prompt) before the text's embeddings, decoded
greedily by full recomputation.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import upload as upload_as
from tests.e2e.server_process import ServerProcess

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed here (build its environment with .ci/vllm-env)",
                allow_module_level=True)

ARCH = "llama-hd32"
KEYS = {"tenant-a": "key-a", "tenant-b": "key-b"}
VLLM_FLAGS = ("--engine", "vllm", "--kv-cache-memory", "128MiB", "--max-model-len", "512",
              "--max-batch-size", "8", "--max-upload-bytes", "4000000", "--log-level", "info")


def auth(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


def keys_file(root: Path) -> Path:
    path = root / "keys.json"
    path.write_text(json.dumps({"tenants": [{"name": n, "keys": [k]} for n, k in KEYS.items()]}))
    return path


def vllm_server(model_dir: Path, root: Path, *flags: str) -> ServerProcess:
    """A server on the vllm engine (not started), with tenants a and b."""
    return ServerProcess(model_dir, root / "store", root / "server.log", *VLLM_FLAGS,
                         "--api-keys", str(keys_file(root)), *flags)


def upload(client: httpx.Client, tenant: str, adapter_id: str, adapter_dir: Path, *,
           template: str | None = None, overwrite: bool = False) -> httpx.Response:
    return upload_as(client, adapter_id, adapter_dir, template=template, overwrite=overwrite,
                     headers=auth(tenant))


@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs[ARCH]
