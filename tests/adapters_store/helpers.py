"""Small builders for the store tests and for malformed uploads derived from real PEFT adapters.

No transformers import here: the crash-writer subprocesses import this module."""

from __future__ import annotations

import json
import struct
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


def zip_of_empty_entries(count: int, *, claimed: int | None = None,
                         prefix: str = "archive/data/") -> bytes:
    """A zip64 of `count` empty stored entries, built directly; its end records may lie."""
    local, central = bytearray(), bytearray()
    for i in range(count):
        name = f"{prefix}{i}".encode()
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 45, 20, 0, 0, 0, 0, 0, 0, 0,
                               len(name), 0, 0, 0, 0, 0, len(local)) + name
        local += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0,
                             len(name), 0) + name
    claimed = count if claimed is None else claimed
    cd_at, cd_size = len(local), len(central)
    eocd64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, claimed, claimed,
                         cd_size, cd_at)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, cd_at + cd_size, 1)
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, min(claimed, 0xFFFF),
                       min(claimed, 0xFFFF), 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return bytes(local + central) + eocd64 + locator + eocd
