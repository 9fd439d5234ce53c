"""Raw P-tuning encoder checkpoints that do not add up are rejected with a precise reason."""

from __future__ import annotations

import pytest
import torch

from adapters_store import (
    ConfigInvalidError,
    ShapeMismatchError,
    TensorMissingError,
    UnsupportedAdapterTypeError,
    WeightsFormatError,
    parse_files,
)
from tests.adapters_store.conftest import spec_for
from tests.adapters_store.helpers import config_bytes, tensors_of, weights_bytes

GPT2 = spec_for("gpt2")


def _parse(ckpt, tensors, **changes):
    return parse_files(config=config_bytes(ckpt, **changes), weights=weights_bytes(tensors),
                       weights_name="adapter_model.safetensors", spec=GPT2)


@pytest.fixture
def mlp(encoder_checkpoint):
    return encoder_checkpoint("gpt2", "p_tuning_mlp", True)[0]


@pytest.fixture
def lstm(encoder_checkpoint):
    return encoder_checkpoint("gpt2", "p_tuning_lstm", True)[0]


def test_missing_encoder_parameter_is_named(mlp):
    tensors = tensors_of(mlp)
    del tensors["mlp_head.4.bias"]
    with pytest.raises(TensorMissingError, match="lacks 'mlp_head.4.bias'"):
        _parse(mlp, tensors)


def test_missing_lstm_parameter_is_named(lstm):
    tensors = tensors_of(lstm)
    del tensors["lstm_head.weight_hh_l1_reverse"]
    with pytest.raises(TensorMissingError, match="lacks 'lstm_head.weight_hh_l1_reverse'"):
        _parse(lstm, tensors)


def test_encoder_parameter_with_wrong_shape_is_reported(mlp):
    tensors = tensors_of(mlp)
    tensors["mlp_head.2.weight"] = tensors["mlp_head.2.weight"][:, :-1]
    with pytest.raises(ShapeMismatchError, match="'mlp_head.2.weight' has shape"):
        _parse(mlp, tensors)


def test_hidden_size_must_match_the_config(mlp):
    with pytest.raises(ShapeMismatchError, match="encoder_hidden_size is 99"):
        _parse(mlp, tensors_of(mlp), encoder_hidden_size=99)


def test_lstm_layer_count_must_match_the_config(lstm):
    with pytest.raises(ShapeMismatchError, match="encoder_num_layers is 3 .* holds 2"):
        _parse(lstm, tensors_of(lstm), encoder_num_layers=3)


def test_reparameterization_type_must_match_the_tensors(lstm):
    with pytest.raises(ShapeMismatchError, match="MLP but the checkpoint holds an LSTM"):
        _parse(lstm, tensors_of(lstm), encoder_reparameterization_type="MLP")


def test_unknown_reparameterization_type_is_unsupported(mlp):
    with pytest.raises(UnsupportedAdapterTypeError, match="supported: MLP, LSTM"):
        _parse(mlp, tensors_of(mlp), encoder_reparameterization_type="GRU")


def test_embedding_without_encoder_is_reported(mlp):
    tensors = {"embedding.weight": tensors_of(mlp)["embedding.weight"]}
    with pytest.raises(TensorMissingError, match="no encoder"):
        _parse(mlp, tensors)


def test_encoder_rows_must_match_the_config(mlp):
    tensors = tensors_of(mlp)
    tensors["embedding.weight"] = tensors["embedding.weight"][:5]
    with pytest.raises(ShapeMismatchError, match="has 5 rows"):
        _parse(mlp, tensors)


def test_two_encoders_in_one_file_are_ambiguous(mlp):
    tensors = tensors_of(mlp)
    both = {**{f"prompt_encoder.a.{k}": v for k, v in tensors.items()},
            **{f"prompt_encoder.b.{k}": v.clone() for k, v in tensors.items()}}
    with pytest.raises(WeightsFormatError, match="several prompt encoders"):
        _parse(mlp, both)


def test_prompt_tuning_config_with_an_encoder_is_reported(mlp):
    with pytest.raises(ConfigInvalidError, match="set peft_type to P_TUNING"):
        _parse(mlp, tensors_of(mlp), peft_type="PROMPT_TUNING")


def test_non_finite_encoder_output_is_rejected(mlp):
    from adapters_store import NonFiniteValuesError

    tensors = tensors_of(mlp)
    tensors["mlp_head.4.bias"] = torch.full_like(tensors["mlp_head.4.bias"], float("nan"))
    with pytest.raises(NonFiniteValuesError):
        _parse(mlp, tensors)


def test_prompt_tuning_state_dict_is_accepted(peft_adapter):
    pt = peft_adapter("gpt2", "prompt_tuning")
    table = tensors_of(pt)["prompt_embeddings"]
    parsed = _parse(pt, {"base_model.prompt_encoder.default.embedding.weight": table})
    torch.testing.assert_close(parsed.embeddings, table)
