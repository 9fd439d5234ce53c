"""What the vllm engine cannot serve is refused at startup, naming the engine that can."""

from __future__ import annotations

import pytest

from server.config import Settings
from server.engine.engine_choice import choose_engine
from server.engine.model_source import ModelLoadError


def test_engine_vllm_refuses_a_seq2seq_model_naming_the_builtin_engine(tiny_model_dirs):
    settings = Settings(model=str(tiny_model_dirs["t5"]), device="cpu", engine="vllm")
    with pytest.raises(ModelLoadError, match="encoder-decoder.*--engine builtin"):
        choose_engine(settings)


def test_auto_keeps_the_builtin_engine_on_a_cpu_even_with_vllm_installed(tiny_model_dirs):
    assert choose_engine(Settings(model=str(tiny_model_dirs["llama"]), device="cpu")) == \
        "builtin"
