"""Every validation failure: its own error type and a message a user can act on."""

from __future__ import annotations

import json

import pytest
import torch

from adapters_store import (
    ConfigInvalidError,
    ConfigMissingError,
    FileTooLargeError,
    Limits,
    ModelSpec,
    NonFiniteValuesError,
    ShapeMismatchError,
    TaskType,
    TaskTypeMismatchError,
    TensorMissingError,
    TokenDimMismatchError,
    TooManyVirtualTokensError,
    UnsupportedAdapterTypeError,
    WeightsFormatError,
    parse_directory,
    parse_files,
    parse_paths,
)
from tests.adapters_store.conftest import spec_for
from tests.adapters_store.helpers import config_bytes, tensors_of, weights_bytes

SAFE = "adapter_model.safetensors"
GPT2 = spec_for("gpt2")  # token_dim 48, CAUSAL_LM
DEFAULT = Limits()


@pytest.fixture
def pt(peft_adapter):
    return peft_adapter("gpt2", "prompt_tuning")


def _parse(adapter_dir, *, config=None, tensors=None, spec=GPT2, limits=DEFAULT, **changes):
    config = config if config is not None else config_bytes(adapter_dir, **changes)
    tensors = tensors if tensors is not None else tensors_of(adapter_dir)
    return parse_files(config=config, weights=weights_bytes(tensors), weights_name=SAFE,
                       spec=spec, limits=limits)


# ---- the config ----------------------------------------------------------------------------

def test_missing_config_is_reported(pt):
    with pytest.raises(ConfigMissingError, match="adapter_config.json is missing"):
        parse_files(config=None, weights=(pt / SAFE).read_bytes(), weights_name=SAFE, spec=GPT2)


def test_directory_without_config_is_reported(tmp_path, pt):
    (tmp_path / SAFE).write_bytes((pt / SAFE).read_bytes())
    with pytest.raises(ConfigMissingError, match="save_pretrained"):
        parse_directory(tmp_path, spec=GPT2)


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe\x00", b"[" * 30_000])
def test_config_that_is_not_json_is_reported(raw, pt):
    with pytest.raises(ConfigInvalidError, match="not valid JSON"):
        _parse(pt, config=raw)


def test_config_that_is_not_an_object_is_reported(pt):
    with pytest.raises(ConfigInvalidError, match="must hold a JSON object"):
        _parse(pt, config=b"[1, 2]")


def test_config_without_peft_type_is_reported(pt):
    with pytest.raises(ConfigInvalidError, match="has no peft_type"):
        _parse(pt, peft_type=None)


def test_config_without_num_virtual_tokens_is_reported(pt):
    with pytest.raises(ConfigInvalidError, match="has no num_virtual_tokens"):
        _parse(pt, num_virtual_tokens=None)


@pytest.mark.parametrize("value", ["8", 0, -3, True, 8.5])
def test_num_virtual_tokens_must_be_a_positive_integer(value, pt):
    with pytest.raises(ConfigInvalidError, match="positive integer"):
        _parse(pt, num_virtual_tokens=value)


@pytest.mark.parametrize("peft_type", ["LORA", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING",
                                       "ADAPTION_PROMPT", "garbage", 42])
def test_other_peft_types_are_unsupported(peft_type, pt):
    with pytest.raises(UnsupportedAdapterTypeError, match="supported peft_type: PROMPT_TUNING, "
                                                          "P_TUNING"):
        _parse(pt, peft_type=peft_type)


@pytest.mark.parametrize("task_type", ["SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION", "nope"])
def test_other_task_types_are_unsupported(task_type, pt):
    with pytest.raises(UnsupportedAdapterTypeError,
                       match="supported task types: CAUSAL_LM, SEQ_2_SEQ_LM"):
        _parse(pt, task_type=task_type, spec=ModelSpec(token_dim=48))


def test_missing_task_type_defaults_to_the_served_model(pt):
    assert _parse(pt, task_type=None).task_type == TaskType.CAUSAL_LM
    with pytest.raises(ConfigInvalidError, match="has no task_type"):
        _parse(pt, task_type=None, spec=ModelSpec(token_dim=48))


def test_task_type_must_match_the_served_model(pt):
    with pytest.raises(TaskTypeMismatchError, match="served model is SEQ_2_SEQ_LM"):
        _parse(pt, spec=ModelSpec(token_dim=48, task_type=TaskType.SEQ_2_SEQ_LM))


def test_spec_without_task_type_accepts_both(peft_adapter):
    t5 = peft_adapter("t5", "prompt_tuning")
    parsed = _parse(t5, spec=ModelSpec(token_dim=56))
    assert parsed.task_type == TaskType.SEQ_2_SEQ_LM


def test_causal_adapter_with_two_submodules_is_invalid(pt):
    with pytest.raises(ConfigInvalidError, match="num_transformer_submodules=2"):
        _parse(pt, num_transformer_submodules=2)


def test_too_many_virtual_tokens_is_rejected_before_reading_weights(pt):
    """The weights are not a weights file: reading them would raise WeightsFormatError, so
    this error can only come from the config, checked first."""
    config = config_bytes(pt, num_virtual_tokens=10**9)
    with pytest.raises(TooManyVirtualTokensError, match="above this server's limit of 512"):
        parse_files(config=config, weights=b"not even a weights file", weights_name=SAFE,
                    spec=GPT2)


def test_virtual_token_limit_is_configurable(pt):
    with pytest.raises(TooManyVirtualTokensError, match="limit of 4"):
        _parse(pt, limits=Limits(max_virtual_tokens=4))


# ---- the model it was trained for --------------------------------------------------------

def test_config_token_dim_must_match_the_model(pt):
    with pytest.raises(TokenDimMismatchError,
                       match=r"token_dim 48 .* hidden size is 64.*trained for another model"):
        _parse(pt, spec=ModelSpec(token_dim=64))


def test_tensor_token_dim_must_match_the_model(pt):
    with pytest.raises(TokenDimMismatchError, match=r"token_dim 48 .* hidden size is 64"):
        _parse(pt, token_dim=None, spec=ModelSpec(token_dim=64))


# ---- the tensors ---------------------------------------------------------------------------

def test_missing_tensor_is_reported(pt):
    tensors = {"something_else": torch.zeros(8, 48)}
    with pytest.raises(TensorMissingError, match="no prompt_embeddings tensor.*something_else"):
        _parse(pt, tensors=tensors)


def test_missing_weights_file_is_reported(pt, tmp_path):
    (tmp_path / "adapter_config.json").write_bytes((pt / "adapter_config.json").read_bytes())
    with pytest.raises(TensorMissingError, match="weights file is missing"):
        parse_directory(tmp_path, spec=GPT2)


def test_row_count_must_match_the_config(pt):
    tensors = {"prompt_embeddings": tensors_of(pt)["prompt_embeddings"][:7]}
    with pytest.raises(ShapeMismatchError, match="has 7 rows .* num_virtual_tokens=8"):
        _parse(pt, tensors=tensors)


def test_tensor_must_be_two_dimensional(pt):
    tensors = {"prompt_embeddings": tensors_of(pt)["prompt_embeddings"][None]}
    with pytest.raises(ShapeMismatchError, match="expected 2 dimensions"):
        _parse(pt, tensors=tensors)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_rejected(bad, pt):
    table = tensors_of(pt)["prompt_embeddings"].clone()
    table[3, 5] = bad
    with pytest.raises(NonFiniteValuesError, match="1 NaN or infinite values"):
        _parse(pt, tensors={"prompt_embeddings": table})


def test_integer_tensor_is_rejected(pt):
    with pytest.raises(WeightsFormatError, match="floating-point"):
        _parse(pt, tensors={"prompt_embeddings": torch.zeros(8, 48, dtype=torch.int64)})


# ---- sizes ---------------------------------------------------------------------------------

def test_weights_file_above_the_size_limit_is_rejected(pt):
    with pytest.raises(FileTooLargeError, match="adapter_model.safetensors is .* above"):
        _parse(pt, limits=Limits(max_file_bytes=1000))


def test_config_file_above_the_size_limit_is_rejected(pt):
    config = json.dumps({**json.loads(config_bytes(pt)), "pad": "x" * 5000}).encode()
    with pytest.raises(FileTooLargeError, match="adapter_config.json is .* above"):
        _parse(pt, config=config, limits=Limits(max_config_bytes=3000))


def test_parse_paths_checks_size_before_reading(pt, tmp_path):
    big = tmp_path / "spool-weights"
    with open(big, "wb") as f:
        f.truncate(2**40)  # sparse: 1 TiB claimed, nothing to read
    with pytest.raises(FileTooLargeError, match="above this server's limit"):
        parse_paths(pt / "adapter_config.json", big, weights_name=SAFE, spec=GPT2)


def test_parse_paths_rejects_a_bad_config_before_reading_weights(pt, tmp_path):
    bad_config = tmp_path / "c.json"
    bad_config.write_bytes(config_bytes(pt, peft_type="LORA"))
    with pytest.raises(UnsupportedAdapterTypeError):
        parse_paths(bad_config, tmp_path / "does-not-exist", weights_name=SAFE, spec=GPT2)


def test_parse_paths_uses_the_given_weights_name(pt, tmp_path):
    spooled = tmp_path / "upload-123.tmp"
    spooled.write_bytes((pt / SAFE).read_bytes())
    parsed = parse_paths(pt / "adapter_config.json", spooled, weights_name=SAFE, spec=GPT2)
    torch.testing.assert_close(parsed.embeddings, tensors_of(pt)["prompt_embeddings"])
