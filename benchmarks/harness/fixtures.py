"""What a workload runs on: a random model saved to disk, its adapters, and the requests.

Everything is deterministic (fixed seeds), so the engine, the HTTP server and every baseline
see the same model, the same adapters and the same token ids.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

from adapters_store import LocalAdapterStore, ModelSpec, TaskType, parse_files
from benchmarks.harness.workloads import ModelShape, Workload

NAMESPACE = "default"  # the tenant of a server without --api-keys


@dataclass(frozen=True)
class RequestSpec:
    index: int
    adapter: int | None  # adapter index (id f"a{adapter}"), None for the bare model
    prompt_ids: tuple[int, ...]
    new_tokens: int

    @property
    def adapter_id(self) -> str | None:
        return None if self.adapter is None else f"a{self.adapter}"

    @property
    def text(self) -> str:
        """Text that the benchmark tokenizer turns into exactly prompt_ids (for HTTP)."""
        return " ".join(f"<t{t}>" for t in self.prompt_ids)


def dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _config(shape: ModelShape):
    eos = shape.vocab - 1
    if shape.arch == "gpt2":
        return GPT2Config(vocab_size=shape.vocab, n_embd=shape.hidden, n_layer=shape.layers,
                          n_head=shape.heads, n_positions=1024, bos_token_id=eos,
                          eos_token_id=eos)
    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads or shape.heads,
                       intermediate_size=shape.intermediate or 4 * shape.hidden,
                       max_position_embeddings=4096, bos_token_id=eos, eos_token_id=eos,
                       pad_token_id=eos, tie_word_embeddings=False)


def build_model(shape: ModelShape, out: Path, *, dtype: str, device: str) -> Path:
    """Random weights from a fixed seed, saved in `dtype`; a word-level tokenizer whose text
    "<t5> <t9>" is exactly ids [5, 9], so HTTP clients can send any ids as text."""
    torch.manual_seed(0)
    init_device = device if device == "cuda" else "cpu"  # 8B shapes initialise on the GPU
    with torch.device(init_device):
        model = AutoModelForCausalLM.from_config(_config(shape), dtype=dtype_of(dtype))
    model.eval().save_pretrained(out)
    del model
    eos = shape.vocab - 1
    vocab = {f"<t{i}>": i for i in range(shape.vocab)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<t0>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=f"<t{eos}>",
                            pad_token=f"<t{eos}>", unk_token="<t0>",
                            padding_side="left").save_pretrained(out)
    return out


def adapter_config(workload: Workload) -> dict:
    """What PEFT's save_pretrained writes for prompt tuning with this shape."""
    return {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
            "num_virtual_tokens": workload.virtual_tokens, "token_dim": workload.shape.hidden,
            "num_transformer_submodules": 1, "num_attention_heads": workload.shape.heads,
            "num_layers": workload.shape.layers, "prompt_tuning_init": "RANDOM",
            "base_model_name_or_path": None, "inference_mode": True}


def adapter_embeddings(workload: Workload, index: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + index)
    return torch.randn(workload.virtual_tokens, workload.shape.hidden, generator=gen) * 0.1


def write_adapter_dir(workload: Workload, index: int, root: Path) -> Path:
    """One adapter exactly as PEFT writes it (for the PEFT baselines); made on demand."""
    d = root / f"a{index}"
    if not d.exists():
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text(json.dumps(adapter_config(workload)))
        save_file({"prompt_embeddings": adapter_embeddings(workload, index)},
                  str(d / "adapter_model.safetensors"))
    return d


def populate_store(workload: Workload, store_dir: Path, progress=None) -> LocalAdapterStore:
    """Parse, validate and store every adapter the way an upload does (shared by the engine
    and the HTTP server, so 10,000 adapters are not uploaded twice)."""
    store = LocalAdapterStore(store_dir)
    spec = ModelSpec(token_dim=workload.shape.hidden, task_type=TaskType.CAUSAL_LM)
    config = json.dumps(adapter_config(workload)).encode()
    for i in range(workload.adapters):
        weights = save({"prompt_embeddings": adapter_embeddings(workload, i)})
        parsed = parse_files(config=config, weights=weights,
                             weights_name="adapter_model.safetensors", spec=spec)
        store.put(NAMESPACE, f"a{i}", parsed, overwrite=True)
        if progress is not None:
            progress.update(1)
    return store


def make_requests(workload: Workload) -> list[RequestSpec]:
    rng = random.Random(3)
    vocab = workload.shape.vocab - 1  # never the eos id
    if workload.zipf_s is not None:
        weights = [1.0 / (rank + 1) ** workload.zipf_s for rank in range(workload.adapters)]
        adapters = rng.choices(range(workload.adapters), weights=weights, k=workload.requests)
    else:
        adapters = [i % workload.adapters for i in range(workload.requests)]
    out = []
    for i, adapter in enumerate(adapters):
        ids = tuple(rng.randrange(vocab) for _ in range(workload.prompt_tokens))
        new = workload.new_tokens
        if workload.new_tokens_max is not None:
            new = rng.randint(workload.new_tokens, workload.new_tokens_max)
        out.append(RequestSpec(i, adapter, ids, new))
    return out


def warm_up_requests(requests: list[RequestSpec], with_adapters: bool) -> list[RequestSpec]:
    """The whole workload (makes every adapter it uses resident), or a few bare-model requests
    of 2 tokens (allocations only, the prompt cache stays cold)."""
    if with_adapters:
        return requests
    return [RequestSpec(r.index, None, r.prompt_ids, 2) for r in requests[:8]]
