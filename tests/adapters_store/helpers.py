"""Small builders for the store tests and for malformed uploads derived from real PEFT adapters.

No transformers import here: the crash-writer subprocesses import this module."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from adapters_store import ParsedAdapter, PeftType, TaskType


def config_bytes(adapter_dir: Path, **changes) -> bytes:
    """The adapter's config with fields changed (value None deletes the field)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return json.dumps(config).encode()


def tensors_of(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def weights_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()})


def make_parsed(seed: int = 0, rows: int = 4, dim: int = 8) -> ParsedAdapter:
    """A small prompt-tuning adapter as the parser hands it to a store's put."""
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": rows}
    return ParsedAdapter(
        peft_type=PeftType.PROMPT_TUNING, task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=rows, num_transformer_submodules=1, token_dim=dim, config=config,
        config_bytes=json.dumps(config).encode(),
        embeddings=torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)))
