"""What the fairness scenario serves, the same on either engine: builtin:tiny with its tweet
prompt, or a harness workload's model (random weights built from its shape, as `python -m
benchmarks` builds it) with random token ids as text, sized as the harness sizes it
(--max-model-len, and the vllm engine's KV cache). vLLM's CPU attention needs heads of 32
dimensions or more: builtin:tiny's are 32, and a workload's are checked before it is built.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.harness.fixtures import build_model, make_requests
from benchmarks.harness.vllm_peer import require_vllm
from benchmarks.harness.workloads import (
    WORKLOADS,
    Workload,
    check_vllm_shape,
    max_model_len,
    model_line,
    vllm_kv_cache,
)

ENGINES = ("builtin", "vllm")
TINY = "builtin:tiny"
# --model: builtin:tiny, or a harness workload whose model shape is built with random weights.
MODELS = (TINY, *WORKLOADS)

PROMPT = "Tweet: I love it. Label:"
PROMPT_TOKENS = 25  # PROMPT with builtin:tiny's byte tokenizer, its BOS included


def long_prompt(tokens: int) -> str:
    """The prompt's text repeated to at least `tokens` characters (about a token each with
    builtin:tiny's byte tokenizer)."""
    return " ".join([PROMPT] * (tokens // len(PROMPT) + 1))


@dataclass(frozen=True)
class ServedModel:
    """The model the engine loads, what the report calls it, and every request's text."""

    path: str  # --model: builtin:tiny, or the directory a workload's shape was built into
    line: str
    text: str
    max_model_len: int = 0  # 0: the model's own context
    kv_cache_memory: str = "auto"  # the vllm engine's --kv-cache-memory


def fairness_workload(name: str, *, device: str, prompt_tokens: int | None, new_tokens: int,
                      max_batch_size: int, layers: int | None = None) -> Workload:
    """Workload `name`'s model with this benchmark's requests (no virtual tokens: requests
    name no adapter), so that the harness's sizing applies: --max-model-len, and the vllm
    engine's KV cache."""
    w = WORKLOADS[name]
    shape = w.shape if layers is None else replace(w.shape, layers=layers)
    return replace(w, shape=shape, device=device, requests=1, adapters=1,
                   virtual_tokens=0, prompt_tokens=prompt_tokens or PROMPT_TOKENS,
                   new_tokens=new_tokens, new_tokens_max=None, max_batch_size=max_batch_size)


def served_model(w: Workload | None, root: Path, *, engine: str,
                 prompt_tokens: int | None) -> ServedModel:
    """builtin:tiny (w None) with the tweet prompt, or `w`'s model built into `root` with
    random token ids as text (its word-level tokenizer knows no words)."""
    if w is None:
        text = PROMPT if prompt_tokens is None else long_prompt(prompt_tokens)[:prompt_tokens]
        return ServedModel(TINY, f"{TINY} (byte tokenizer)", text)
    model_dir = build_model(w.shape, root / "model", dtype=w.dtype, device=w.device)
    max_len = max_model_len(w)
    return ServedModel(str(model_dir), f"{w.name}'s model: {model_line(w)}",
                       make_requests(w)[0].text, max_model_len=max_len,
                       kv_cache_memory=vllm_kv_cache(w, max_len) if engine == "vllm"
                       else "auto")


def check_vllm(w: Workload | None, *, http: bool, engine_process: bool, batching: str,
               contended_tenant_rows: int) -> None:
    """What the vllm engine cannot run here, refused before anything is built."""
    if not http:
        raise SystemExit("--engine vllm is the real server's: run benchmarks/fairness.py "
                         "--http --engine vllm (the engine in this process is the builtin "
                         "one)")
    builtin_only = [flag for flag, given in (
        ("--engine-process", engine_process), ("--batching static", batching != "core"))
        if given]
    if builtin_only:
        raise SystemExit(f"{', '.join(builtin_only)}: the builtin engine's, not the vllm "
                         "engine's, whose fairness is its admission's weighted fair shares")
    if w is not None:
        check_vllm_shape(w)
    require_vllm("--engine vllm")
