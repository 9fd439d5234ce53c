"""Parsed tables equal what PEFT itself loads, for every supported type and shape."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from adapters_store import PeftType, TaskType, parse_directory, parse_files
from tests.adapters_store.conftest import TEST_ARCHS, spec_for
from tests.factories import ADAPTER_KINDS, load_base


@pytest.mark.parametrize("arch", TEST_ARCHS)
@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_parsed_embeddings_equal_what_peft_loads(arch, kind, peft_adapter, tiny_model_dirs):
    adapter_dir = peft_adapter(arch, kind)

    parsed = parse_directory(adapter_dir, spec=spec_for(arch))

    peft_model = PeftModel.from_pretrained(load_base(tiny_model_dirs[arch]), str(adapter_dir))
    expected = peft_model.prompt_encoder["default"].embedding.weight.detach()
    assert parsed.embeddings.dtype == torch.float32
    assert parsed.embeddings.is_contiguous()
    torch.testing.assert_close(parsed.embeddings, expected, rtol=0, atol=0)
    seq2seq = arch == "t5"
    assert parsed.task_type == (TaskType.SEQ_2_SEQ_LM if seq2seq else TaskType.CAUSAL_LM)
    assert parsed.peft_type == (PeftType.PROMPT_TUNING if kind == "prompt_tuning"
                                else PeftType.P_TUNING)
    assert parsed.num_transformer_submodules == (2 if seq2seq else 1)
    assert parsed.embeddings.shape == (8 * parsed.num_transformer_submodules,
                                       spec_for(arch).token_dim)
    assert parsed.config_bytes == (adapter_dir / "adapter_config.json").read_bytes()


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
@pytest.mark.parametrize("kind", ["p_tuning_mlp", "p_tuning_lstm"])
@pytest.mark.parametrize("strip_prefix", [False, True])
def test_encoder_checkpoint_collapses_to_peft_saved_output(arch, kind, strip_prefix,
                                                           encoder_checkpoint):
    ckpt, reference = encoder_checkpoint(arch, kind, strip_prefix)

    parsed = parse_directory(ckpt, spec=spec_for(arch))

    expected = load_file(str(reference / "adapter_model.safetensors"))["prompt_embeddings"]
    assert parsed.embeddings.shape == expected.shape
    assert (parsed.embeddings - expected).abs().max().item() <= 1e-5


def test_collapse_tolerates_a_leading_path_before_prompt_encoder(encoder_checkpoint):
    from safetensors.torch import save

    ckpt, reference = encoder_checkpoint("llama", "p_tuning_lstm", False)
    tensors = load_file(str(ckpt / "adapter_model.safetensors"))
    prefixed = {f"base_model.model.{k}": v for k, v in tensors.items()}

    parsed = parse_files(config=(ckpt / "adapter_config.json").read_bytes(),
                         weights=save(prefixed), weights_name="adapter_model.safetensors",
                         spec=spec_for("llama"))

    expected = load_file(str(reference / "adapter_model.safetensors"))["prompt_embeddings"]
    assert (parsed.embeddings - expected).abs().max().item() <= 1e-5


def test_collapse_leaves_the_global_rng_alone(encoder_checkpoint):
    ckpt, _ = encoder_checkpoint("gpt2", "p_tuning_lstm", True)
    state = torch.random.get_rng_state()

    parse_directory(ckpt, spec=spec_for("gpt2"))

    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype_is_normalized_to_float32(dtype, peft_adapter):
    from safetensors.torch import save

    adapter_dir = peft_adapter("gpt2", "prompt_tuning")
    table = load_file(str(adapter_dir / "adapter_model.safetensors"))["prompt_embeddings"]

    parsed = parse_files(config=(adapter_dir / "adapter_config.json").read_bytes(),
                         weights=save({"prompt_embeddings": table.to(dtype)}),
                         weights_name="adapter_model.safetensors", spec=spec_for("gpt2"))

    assert parsed.embeddings.dtype == torch.float32
    torch.testing.assert_close(parsed.embeddings, table.to(dtype).float())
