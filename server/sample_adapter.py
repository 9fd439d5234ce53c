"""`softprompt-server make-sample-adapter`: a PEFT PROMPT_TUNING adapter without PEFT.

So a newcomer can try upload -> generate offline: the files are what PEFT's save_pretrained
writes for a randomly initialized prompt-tuning model (adapter_config.json +
adapter_model.safetensors holding `prompt_embeddings`), sized for the given model's hidden size.
PEFT itself stays a test-only dependency.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig

from server.engine.builtin import ensure_builtin
from server.engine.builtin_names import BUILTIN_PREFIX

PEFT_VERSION = "0.21.2"  # the version whose save_pretrained output this mirrors
SAMPLE_FILE_MODE = 0o644  # readable by the server whichever user runs it


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    is_seq2seq: bool


def model_shape(model: str, *, model_cache: Path) -> ModelShape:
    """Reads only the model's config (a builtin is built once into model_cache if missing)."""
    source = str(ensure_builtin(model, model_cache)) if model.startswith(BUILTIN_PREFIX) else model
    cfg = AutoConfig.from_pretrained(source)
    return ModelShape(hidden_size=int(cfg.hidden_size),
                      num_layers=int(getattr(cfg, "num_hidden_layers", 0) or 0),
                      num_attention_heads=int(getattr(cfg, "num_attention_heads", 0) or 0),
                      is_seq2seq=bool(getattr(cfg, "is_encoder_decoder", False)))


def write_sample_adapter(out_dir: Path, *, model: str, model_cache: Path,
                         num_virtual_tokens: int = 8, seed: int = 0) -> Path:
    """Write the adapter into out_dir (created if needed); returns out_dir."""
    if num_virtual_tokens < 1:
        raise ValueError("--num-virtual-tokens must be at least 1")
    shape = model_shape(model, model_cache=model_cache)
    submodules = 2 if shape.is_seq2seq else 1
    config = {
        "auto_mapping": None,
        "base_model_name_or_path": model,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": shape.num_attention_heads,
        "num_layers": shape.num_layers,
        "num_transformer_submodules": submodules,
        "num_virtual_tokens": num_virtual_tokens,
        "peft_type": "PROMPT_TUNING",
        "peft_version": PEFT_VERSION,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "revision": None,
        "task_type": "SEQ_2_SEQ_LM" if shape.is_seq2seq else "CAUSAL_LM",
        "token_dim": shape.hidden_size,
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    }
    generator = torch.Generator().manual_seed(seed)
    # PEFT's RANDOM init is nn.Embedding's: standard normal. [n * submodules, hidden]
    embeddings = torch.randn(num_virtual_tokens * submodules, shape.hidden_size,
                             generator=generator, dtype=torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "adapter_config.json"
    weights_path = out_dir / "adapter_model.safetensors"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    save_file({"prompt_embeddings": embeddings}, str(weights_path))
    # safetensors writes 0600; an adapter is handed to other users and containers (a server
    # image runs as another user), so both files are world-readable, as PEFT's usually are.
    for path in (config_path, weights_path):
        path.chmod(SAMPLE_FILE_MODE)
    return out_dir
