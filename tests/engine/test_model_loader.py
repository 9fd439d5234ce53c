"""Model loading: causal vs seq2seq from the config, frozen weights, device/dtype, builtin:tiny."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from server.config import Device, DType, Settings
from server.engine.builtin import ensure_builtin
from server.engine.generation import run_batch
from server.engine.interface import SamplingParams
from server.engine.model_loader import (
    DEFAULT_MAX_CONTEXT,
    load_model,
    resolve_device,
    resolve_dtype,
)
from server.engine.model_source import ModelLoadError
from server.engine.rows import BatchRow


def settings_for(model: str | Path, tmp_path: Path, **kw) -> Settings:
    return Settings(model=str(model), store=str(tmp_path / "store"),
                    model_cache=tmp_path / "model-cache", device=Device.CPU, **kw)


def test_causal_model_loads_frozen_with_info(tiny_model_dirs, tmp_path) -> None:
    loaded = load_model(settings_for(tiny_model_dirs["llama"], tmp_path))
    info = loaded.info
    assert (info.architecture, info.is_seq2seq, info.hidden_size) == ("LlamaForCausalLM", False, 64)
    assert (info.device, info.dtype, info.max_context) == ("cpu", "float32", 512)
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.pad_token_id is not None
    assert loaded.task_type == "CAUSAL_LM" and loaded.vocab_size == 260


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "bloom"])
def test_the_lm_head_of_a_frozen_model_gets_a_contiguous_input(arch, tiny_model_dirs,
                                                              tmp_path) -> None:
    """A prefill keeping only the last position's logits hands the LM head a strided slice;
    with frozen weights torch's matmul would expand the whole vocabulary matrix per row."""
    model = load_model(settings_for(tiny_model_dirs[arch], tmp_path)).model
    seen: list[bool] = []
    model.get_output_embeddings().register_forward_pre_hook(
        lambda _module, args: seen.append(args[0].is_contiguous()))
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
    assert seen == [True]


def test_seq2seq_model_is_chosen_from_config_and_gets_default_context(
        tiny_model_dirs, tmp_path) -> None:
    loaded = load_model(settings_for(tiny_model_dirs["t5"], tmp_path))
    assert loaded.info.is_seq2seq and loaded.task_type == "SEQ_2_SEQ_LM"
    assert loaded.model.config.is_encoder_decoder
    assert loaded.info.max_context == DEFAULT_MAX_CONTEXT  # relative positions: no window


def test_explicit_dtype_is_applied(tiny_model_dirs, tmp_path) -> None:
    loaded = load_model(settings_for(tiny_model_dirs["gpt2"], tmp_path, dtype=DType.BFLOAT16))
    assert loaded.dtype == torch.bfloat16 and loaded.info.dtype == "bfloat16"
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_auto_dtype_is_float32_on_cpu() -> None:
    assert resolve_dtype(DType.AUTO, torch.device("cpu")) == torch.float32
    assert resolve_dtype(DType.AUTO, torch.device("cuda")) == torch.bfloat16


def test_missing_model_fails_naming_the_flag(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="--model"):
        load_model(settings_for(tmp_path / "no-such-model", tmp_path))


def test_unknown_builtin_fails_naming_the_flag(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="builtin:tiny"):
        load_model(settings_for("builtin:huge", tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_fails_naming_the_flag() -> None:
    with pytest.raises(ModelLoadError, match="--device cuda"):
        resolve_device(Device.CUDA)


def test_builtin_tiny_is_deterministic_and_generates(tmp_path, caplog) -> None:
    first = ensure_builtin("builtin:tiny", tmp_path / "a")
    second = ensure_builtin("builtin:tiny", tmp_path / "b")
    w1 = load_file(str(first / "model.safetensors"))
    w2 = load_file(str(second / "model.safetensors"))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not list((tmp_path / "a").glob(".*tmp"))  # the temp dir was renamed, not left

    with caplog.at_level("WARNING"):
        loaded = load_model(settings_for("builtin:tiny", tmp_path))
    assert "NOT meaningful" in caplog.text
    assert loaded.info.architecture == "LlamaForCausalLM" and loaded.info.hidden_size == 128
    assert loaded.tokenizer.chat_template
    ids = loaded.tokenizer("hello")["input_ids"]
    out = run_batch(loaded.model, loaded.tokenizer,
                    [BatchRow(ids, None, SamplingParams(max_new_tokens=6, ignore_eos=True))])
    assert len(out[0].token_ids) == 6


def test_builtin_is_built_once_then_reused(tmp_path) -> None:
    path = ensure_builtin("builtin:tiny", tmp_path)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_builtin("builtin:tiny", tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
