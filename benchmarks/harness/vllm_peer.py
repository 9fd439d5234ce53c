"""Plain vLLM serving soft prompts the way a vLLM user does today: its OpenAI server with
`--enable-prompt-embeds`, and a client that builds every request's input embeddings itself.

The client holds the model's word-embedding table and each adapter's rows (as PEFT saved
them), and sends `[adapter rows ; word embeddings of the text]` (`[virtual + prompt, hidden]`,
float32) as `prompt_embeds` on `/v1/completions`: the base64 of `torch.save`'s bytes, which is
what vLLM's completions endpoint decodes (`vllm/renderers/embed_utils.py`,
`safe_load_prompt_embeds`). Building the tensor is part of each timed request, as it is part
of a real client's work. The server runs with the settings this server's vllm engine gets
(batch size, model length, batched tokens, KV cache bytes, dtype, seed, the same environment),
so the two differ in what goes over the wire and what the server does with it, not in vLLM's
configuration.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from benchmarks.harness.fixtures import RequestSpec, adapter_embeddings
from benchmarks.harness.http_runner import StreamingRunner
from benchmarks.harness.workloads import Workload, vllm_kv_cache
from server.config import Settings, parse_kv_cache_memory
from tests.e2e.server_process import LoopbackProcess

# Where each architecture's checkpoint keeps the input embedding table.
_EMBEDDING_KEYS = ("transformer.wte.weight", "model.embed_tokens.weight")


def require_vllm(what: str) -> None:
    """Fail before anything starts, with the line that installs what is missing."""
    if importlib.util.find_spec("vllm") is None:
        raise SystemExit(f"{what} needs vLLM installed in this environment: "
                         "pip install -c constraints-vllm.txt -e \".[vllm]\" "
                         "(on a CPU, vLLM's CPU build)")


def input_embeddings(model_dir: Path) -> torch.Tensor:
    """The model's word-embedding table (`[vocab, hidden]`), read from its safetensors
    without loading the model: all a client needs to embed text."""
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in _EMBEDDING_KEYS:
                if key in f.keys():  # noqa: SIM118 - safe_open has keys(), not __contains__
                    return f.get_tensor(key).float()
    raise FileNotFoundError(f"no input embedding ({', '.join(_EMBEDDING_KEYS)}) in {model_dir}")


def completion_body(model: str, spec: RequestSpec, word_embeddings: torch.Tensor,
                    adapter_rows: dict[int, torch.Tensor]) -> bytes:
    """The request as a vLLM user's client sends it: the adapter's rows before the text's
    word embeddings (`[virtual + prompt, hidden]`, what PEFT's prompt tuning feeds the model),
    serialized with torch.save and base64-encoded; greedy, `ignore_eos`, streamed."""
    embeds = word_embeddings[list(spec.prompt_ids)]  # [prompt, hidden]
    if spec.adapter is not None:
        embeds = torch.cat([adapter_rows[spec.adapter], embeds])
    buffer = io.BytesIO()
    torch.save(embeds.contiguous(), buffer)
    return json.dumps({
        "model": model, "prompt_embeds": base64.b64encode(buffer.getvalue()).decode("ascii"),
        "max_tokens": spec.new_tokens, "ignore_eos": True, "temperature": 0.0,
        "stream": True, "stream_options": {"include_usage": True}},
        separators=(",", ":")).encode()


class VllmPeerServer(LoopbackProcess):
    """`python -m vllm.entrypoints.openai.api_server` as a subprocess on a free loopback port
    (`vllm serve` is not installed under the name the CPU build's package has); ready when
`/health` answers."""

    ready_path = "/health"
    stop_wait_s = 60.0

    def __init__(self, model_dir: Path, settings: Settings, log_path: Path, *,
                 kv_cache_bytes: int) -> None:
        super().__init__(log_path)
        self.model = str(model_dir)
        self.args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
            "--enable-prompt-embeds", "--dtype", str(getattr(settings.dtype, "value",
                                                            settings.dtype)),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--max-model-len", str(settings.max_model_len),
            "--max-num-seqs", str(settings.max_batch_size),
            # As this server's vllm engine sets it (server/engine/vllm/runtime.py).
            "--max-num-batched-tokens", str(max(settings.max_batch_tokens,
                                                settings.max_model_len)),
            # A byte size also spares the CPU build's check that 92% of the RAM is free.
            "--kv-cache-memory-bytes", str(kv_cache_bytes),
            "--seed", "0", "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]

    def env(self) -> dict[str, str]:
        """The environment this server's vllm engine sets up for itself on a CPU."""
        env = super().env()
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        return env


class VllmPeerRunner(StreamingRunner):
    """The `vllm-peer` baseline: one streaming client per request, all started at t=0, as the
    http system's clients are."""

    path = "/v1/completions"

    def __init__(self, workload: Workload, settings: Settings, model_dir: Path,
                 requests: list[RequestSpec], log_path: Path) -> None:
        require_vllm("the vllm-peer baseline")
        self.word_embeddings = input_embeddings(model_dir)  # [vocab, hidden]
        self.adapter_rows = {i: adapter_embeddings(workload, i)  # [virtual, hidden] each
                             for i in sorted({r.adapter for r in requests} - {None})}
        # The KV cache --engine vllm gets for this workload, whichever engine the server runs.
        kv = parse_kv_cache_memory(vllm_kv_cache(workload, settings.max_model_len))
        assert isinstance(kv, int)
        self.server = VllmPeerServer(model_dir, settings, log_path, kv_cache_bytes=kv)
        self.server.start(timeout=1800.0)
        self._connect(requests)

    def body(self, spec: RequestSpec) -> bytes:
        return completion_body(self.server.model, spec, self.word_embeddings, self.adapter_rows)

    def is_token(self, event: dict[str, Any]) -> bool:
        return bool(event.get("choices"))

    def check(self, spec: RequestSpec, events: list[dict[str, Any]]) -> None:
        usage = next((e["usage"] for e in reversed(events) if e.get("usage")), None)
        if usage is None:
            raise RuntimeError("vLLM's stream ended without usage")
        virtual = 0 if spec.adapter is None else len(self.adapter_rows[spec.adapter])
        assert usage["prompt_tokens"] == virtual + len(spec.prompt_ids), usage
        assert usage["completion_tokens"] == spec.new_tokens, usage
