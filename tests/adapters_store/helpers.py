"""Small builders for malformed uploads, derived from real PEFT adapters."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save


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
