"""Real PEFT adapters on tiny models, built once per session and shared by the store tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters_store import ModelSpec, TaskType
from tests.factories import is_seq2seq, make_adapter, make_encoder_checkpoint, tiny_config

TEST_ARCHS = ("gpt2", "llama", "t5")


def spec_for(arch: str) -> ModelSpec:
    """What the server would pass for a model of this architecture."""
    cfg = tiny_config(arch)
    dim = getattr(cfg, "n_embd", None) or getattr(cfg, "d_model", None) or cfg.hidden_size
    task = TaskType.SEQ_2_SEQ_LM if is_seq2seq(arch) else TaskType.CAUSAL_LM
    return ModelSpec(token_dim=dim, task_type=task)


@pytest.fixture(scope="session")
def peft_adapter(tiny_model_dirs, tmp_path_factory):
    """peft_adapter(arch, kind) -> directory written by PEFT's save_pretrained (cached)."""
    cache: dict[tuple, Path] = {}

    def build(arch: str, kind: str) -> Path:
        if (arch, kind) not in cache:
            out = tmp_path_factory.mktemp(f"adapter-{arch}-{kind}")
            cache[(arch, kind)] = make_adapter(tiny_model_dirs[arch], out, kind)
        return cache[(arch, kind)]

    return build


@pytest.fixture(scope="session")
def encoder_checkpoint(tiny_model_dirs, tmp_path_factory):
    """encoder_checkpoint(arch, kind, strip_prefix) -> (raw checkpoint dir, PEFT's saved dir)."""
    cache: dict[tuple, tuple[Path, Path]] = {}

    def build(arch: str, kind: str, strip_prefix: bool) -> tuple[Path, Path]:
        key = (arch, kind, strip_prefix)
        if key not in cache:
            ckpt = tmp_path_factory.mktemp(f"ckpt-{arch}-{kind}")
            ref = tmp_path_factory.mktemp(f"ref-{arch}-{kind}")
            make_encoder_checkpoint(tiny_model_dirs[arch], ckpt, kind, strip_prefix=strip_prefix,
                                    reference_dir=ref)
            cache[key] = (ckpt, ref)
        return cache[key]

    return build
