"""The named workloads. Each fixes a model shape, the requests and how they are served.

Shapes are random-weight models built from config (nothing is downloaded): throughput does not
depend on the weights' values, and the token ids are random, so the text is irrelevant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    arch: str  # "gpt2" or "llama"
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int | None = None  # llama: grouped-query attention
    intermediate: int | None = None  # llama MLP width

    def params(self) -> int:
        """Parameter count (embeddings untied for llama, tied for gpt2), for the printout."""
        h, v, n = self.hidden, self.vocab, self.layers
        if self.arch == "gpt2":
            return v * h + 1024 * h + n * (12 * h * h + 13 * h) + 2 * h
        kv = (self.kv_heads or self.heads) * (h // self.heads)
        inter = self.intermediate or 4 * h
        return 2 * v * h + n * (2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h) + h


GPT2_SMALL = ModelShape("gpt2", vocab=50257, hidden=768, layers=12, heads=12)
LLAMA_1B = ModelShape("llama", vocab=32000, hidden=2048, layers=16, heads=32, kv_heads=8,
                      intermediate=8192)
LLAMA_8B = ModelShape("llama", vocab=128256, hidden=4096, layers=32, heads=32, kv_heads=8,
                      intermediate=14336)


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    shape: ModelShape
    dtype: str  # float32 | bfloat16
    device: str  # cpu | cuda
    requests: int
    adapters: int  # distinct adapters stored; requests use them round-robin or Zipf-like
    virtual_tokens: int
    prompt_tokens: int
    new_tokens: int  # every request's max_new_tokens (ignore_eos: generation length forced)
    new_tokens_max: int | None = None  # mixed-lengths: uniform in [new_tokens, new_tokens_max]
    zipf_s: float | None = None  # many-adapters: adapter popularity ~ 1 / rank**s
    cache_adapters: int | None = None  # prompt cache sized for this many adapters
    max_batch_size: int = 32
    baselines: tuple[str, ...] = ("plain", "peft-sequential", "peft-batched")
    # Timed PEFT-sequential requests (the rest extrapolated); None: all of them.
    peft_sample: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def with_overrides(self, **changes: Any) -> Workload:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"]["params"] = self.shape.params()
        return out


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("cpu-ref", "GPT-2-small shape, float32 on the CPU: 32 requests from 32 distinct "
             "prompt-tuning adapters, 20 virtual tokens, 32 in, 32 out",
             GPT2_SMALL, "float32", "cpu", requests=32, adapters=32, virtual_tokens=20,
             prompt_tokens=32, new_tokens=32, peft_sample=8),
    Workload("gpu-1b", "Llama shape, 1.1B parameters, bfloat16 on CUDA: 64 concurrent requests "
             "from 64 distinct adapters, 20 virtual tokens, 64 in, 64 out",
             LLAMA_1B, "bfloat16", "cuda", requests=64, adapters=64, virtual_tokens=20,
             prompt_tokens=64, new_tokens=64, max_batch_size=64, peft_sample=16,
             baselines=("plain", "hf-static-compile", "peft-sequential")),
    Workload("gpu-8b", "Llama-8B shape, bfloat16 on CUDA: 64 concurrent requests from 64 "
             "distinct adapters, 20 virtual tokens, 64 in, 64 out",
             LLAMA_8B, "bfloat16", "cuda", requests=64, adapters=64, virtual_tokens=20,
             prompt_tokens=64, new_tokens=64, max_batch_size=64, peft_sample=16,
             baselines=("plain", "hf-static-compile", "peft-sequential")),
    Workload("many-adapters", "10,000 stored adapters, requests spread Zipf-like (s=1.1), "
             "prompt cache sized for 1,000: hit rate, cold-load latency, throughput "
             "(GPT-2-small shape, float32 on the CPU)",
             GPT2_SMALL, "float32", "cpu", requests=256, adapters=10_000, virtual_tokens=20,
             prompt_tokens=32, new_tokens=16, zipf_s=1.1, cache_adapters=1000,
             baselines=("plain", "peft-sequential"), peft_sample=8),
    Workload("mixed-lengths", "outputs from 8 to 256 tokens in the same batches: how much "
             "compute static batching wastes (GPT-2-small shape, float32 on the CPU)",
             GPT2_SMALL, "float32", "cpu", requests=32, adapters=32, virtual_tokens=20,
             prompt_tokens=32, new_tokens=8, new_tokens_max=256, peft_sample=4),
)}

# vLLM's CPU attention takes no smaller heads.
VLLM_MIN_HEAD_DIM = 32


def check_vllm_shape(workload: Workload) -> None:
    """Refuse a model vLLM's CPU attention cannot run, before anything is built."""
    head_dim = workload.shape.hidden // workload.shape.heads
    if head_dim < VLLM_MIN_HEAD_DIM:
        raise SystemExit(f"{workload.name}'s model has {head_dim}-dimension heads; vLLM's CPU "
                         f"attention needs at least {VLLM_MIN_HEAD_DIM}")


def model_line(workload: Workload) -> str:
    """The model the run serves, as printed and recorded: with vLLM in the run, that its
    heads suit vLLM's CPU attention and that both engines serve the same model."""
    s = workload.shape
    return (f"{s.arch} shape, {s.layers} layers, hidden {s.hidden}, {s.heads} heads of "
            f"{s.hidden // s.heads}, vocab {s.vocab}, {workload.dtype}, {workload.device}: "
            "the same model for --engine builtin and --engine vllm")


def max_model_len(workload: Workload) -> int:
    """--max-model-len as an operator would set it: the workload's longest request (virtual,
    prompt and new tokens) rounded up to a power of two."""
    longest = workload.virtual_tokens + workload.prompt_tokens + max(
        workload.new_tokens, workload.new_tokens_max or 0)
    return 1 << (longest - 1).bit_length()


def vllm_kv_cache(workload: Workload, max_model_len: int) -> str:
    """--engine vllm's --kv-cache-memory: twice what every row of the workload takes at
    --max-model-len, in whole GiB, at least 1 (cpu-ref: 32 rows of 128 positions need 0.3 GiB,
    so 1GiB). A byte size rather than the server's default (2 GiB on a CPU; most of a GPU),
    since a second vLLM server (the vllm-peer baseline) may run beside it."""
    s = workload.shape
    element = 4 if workload.dtype == "float32" else 2
    per_position = 2 * s.layers * (s.kv_heads or s.heads) * (s.hidden // s.heads) * element
    need = 2 * workload.max_batch_size * max_model_len * per_position
    return f"{max(1, -(-need // 2**30))}GiB"


# Not a workload of its own: the fairness scenario (tenant A's backlog vs tenant B) has its
# own runner in benchmarks/fairness.py and is listed here for the CLI.
SCENARIOS = ("fairness",)
