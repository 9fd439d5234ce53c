"""A raw P-tuning encoder is sized and shape-checked before it runs: too large is a 413 naming
--max-encoder-params, inconsistent is a 400 naming the tensor, never an error from torch."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import save

from adapters_store import (
    ConfigInvalidError,
    EncoderTooLargeError,
    LimitExceededError,
    Limits,
    NonFiniteValuesError,
    ShapeMismatchError,
    TensorMissingError,
    WeightsFormatError,
    parse_files,
)
from tests.adapters_store.conftest import spec_for
from tests.adapters_store.helpers import config_bytes, tensors_of

SAFE = "adapter_model.safetensors"
GPT2 = spec_for("gpt2")  # token_dim 48; the encoders have hidden 24 and 8 virtual tokens
DEFAULT = Limits()
DIM, ROWS = 48, 8


@pytest.fixture
def mlp(encoder_checkpoint):
    return encoder_checkpoint("gpt2", "p_tuning_mlp", True)[0]


@pytest.fixture
def lstm(encoder_checkpoint):
    return encoder_checkpoint("gpt2", "p_tuning_lstm", True)[0]


def _parse(ckpt, tensors, *, name: str = SAFE, limits: Limits = DEFAULT, **changes):
    if name.endswith(".bin"):
        buf = io.BytesIO()
        torch.save(tensors, buf)
        weights = buf.getvalue()
    else:
        weights = save({k: v.contiguous() for k, v in tensors.items()})
    return parse_files(config=config_bytes(ckpt, **changes), weights=weights, weights_name=name,
                       spec=GPT2, limits=limits)


def _mlp_encoder(hidden: int, *, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A well-formed MLP encoder of any hidden size, with real (seeded) values."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    return {"embedding.weight": r(ROWS, DIM), "mlp_head.0.weight": r(hidden, DIM),
            "mlp_head.0.bias": r(hidden), "mlp_head.2.weight": r(hidden, hidden),
            "mlp_head.2.bias": r(hidden), "mlp_head.4.weight": r(DIM, hidden),
            "mlp_head.4.bias": r(DIM)}


@pytest.mark.parametrize("kind", ["p_tuning_mlp", "p_tuning_lstm"])
def test_a_raw_encoder_checkpoint_in_a_bin_collapses_like_safetensors(kind, encoder_checkpoint):
    ckpt = encoder_checkpoint("gpt2", kind, False)[0]
    tensors = {k: torch.nn.Parameter(v) for k, v in tensors_of(ckpt).items()}
    from_bin = _parse(ckpt, tensors, name="adapter_model.bin")
    from_safetensors = _parse(ckpt, tensors_of(ckpt))
    torch.testing.assert_close(from_bin.embeddings, from_safetensors.embeddings, rtol=0, atol=0)


def test_an_encoder_within_the_default_limit_collapses(mlp):
    parsed = _parse(mlp, _mlp_encoder(512), encoder_hidden_size=512)
    assert parsed.embeddings.shape == (ROWS, DIM)


def test_an_encoder_above_the_limit_is_a_413_naming_the_flag(mlp):
    tensors = _mlp_encoder(1024)  # 1024 * 1024 + 2 * 1024 * 48 + ... elements
    with pytest.raises(EncoderTooLargeError) as err:
        _parse(mlp, tensors, encoder_hidden_size=1024,
               limits=Limits(max_encoder_params=1_000_000))
    assert isinstance(err.value, LimitExceededError)
    message = str(err.value)
    assert message.startswith(f"{SAFE}: collapsing this P-tuning encoder needs ")
    assert "above this server's limit of 1000000 (--max-encoder-params)" in message


def test_activations_count_against_the_limit(mlp):
    """Weights alone fit; weights plus [rows, hidden] intermediates do not."""
    tensors = tensors_of(mlp)
    weights = sum(t.numel() for t in tensors.values())
    with pytest.raises(EncoderTooLargeError, match="of activations"):
        _parse(mlp, tensors, limits=Limits(max_encoder_params=weights + 1))


def test_a_zero_stride_encoder_weight_is_refused_before_it_is_copied(mlp):
    """Tiny on disk, [4096, 4096] in shape: refused as it is read, not expanded in memory."""
    hidden = 4096
    tensors = {
        "embedding.weight": torch.zeros(ROWS, DIM, dtype=torch.bfloat16),
        "mlp_head.0.weight": torch.zeros(1, DIM, dtype=torch.bfloat16).expand(hidden, DIM),
        "mlp_head.0.bias": torch.zeros(1, dtype=torch.bfloat16).expand(hidden),
        "mlp_head.2.weight": torch.zeros(1, 1, dtype=torch.bfloat16).expand(hidden, hidden),
        "mlp_head.2.bias": torch.zeros(1, dtype=torch.bfloat16).expand(hidden),
        "mlp_head.4.weight": torch.zeros(1, 1, dtype=torch.bfloat16).expand(DIM, hidden),
        "mlp_head.4.bias": torch.zeros(DIM, dtype=torch.bfloat16),
    }
    with pytest.raises(WeightsFormatError,
                       match=r"adapter_model.bin: tensor 'mlp_head.0.weight' has shape "
                             r"\[4096, 48\] .* overlap"):
        _parse(mlp, tensors, name="adapter_model.bin", encoder_hidden_size=hidden)


@pytest.mark.parametrize("key", ["mlp_head.0.weight", "mlp_head.2.weight"])
@pytest.mark.parametrize("bad", [torch.tensor(1.0), torch.zeros(24), torch.zeros(2, 24, 48)])
def test_an_encoder_weight_of_the_wrong_rank_is_a_shape_error(key, bad, mlp):
    tensors = tensors_of(mlp)
    tensors[key] = bad
    with pytest.raises(ShapeMismatchError, match=rf"{SAFE}: .*'{key}' has shape"):
        _parse(mlp, tensors)


def test_an_lstm_without_its_first_recurrent_weight_is_reported_missing(lstm):
    tensors = tensors_of(lstm)
    del tensors["lstm_head.weight_hh_l0"]
    with pytest.raises(TensorMissingError, match="lacks 'lstm_head.weight_hh_l0'"):
        _parse(lstm, tensors)


@pytest.mark.parametrize("key", ["lstm_head.weight_hh_l0", "lstm_head.weight_ih_l1_reverse",
                                 "lstm_head.bias_hh_l1", "mlp_head.2.weight"])
def test_an_lstm_weight_of_the_wrong_shape_is_named(key, lstm):
    tensors = tensors_of(lstm)
    tensors[key] = tensors[key][:-1].clone()
    with pytest.raises(ShapeMismatchError, match=rf"'{key}' has shape"):
        _parse(lstm, tensors)


@pytest.mark.parametrize("value", ["24", True, 24.0, -1, 0, [24], {"h": 24}])
def test_encoder_hidden_size_must_be_a_positive_integer(value, mlp):
    with pytest.raises(ConfigInvalidError, match="encoder_hidden_size must be a positive integer"):
        _parse(mlp, tensors_of(mlp), encoder_hidden_size=value)


def test_an_enormous_encoder_hidden_size_is_a_mismatch_not_an_allocation(mlp):
    with pytest.raises(ShapeMismatchError, match=r"encoder_hidden_size is 10{30} "):
        _parse(mlp, tensors_of(mlp), encoder_hidden_size=10**30)


@pytest.mark.parametrize("value", ["2", True, 2.0, 0])
def test_encoder_num_layers_must_be_a_positive_integer(value, lstm):
    with pytest.raises(ConfigInvalidError, match="encoder_num_layers must be a positive integer"):
        _parse(lstm, tensors_of(lstm), encoder_num_layers=value)


@pytest.mark.parametrize("value", [["MLP"], {"t": "MLP"}, 3])
def test_a_non_string_reparameterization_type_is_unsupported(value, mlp):
    from adapters_store import UnsupportedAdapterTypeError

    with pytest.raises(UnsupportedAdapterTypeError, match="supported: MLP, LSTM"):
        _parse(mlp, tensors_of(mlp), encoder_reparameterization_type=value)


def test_a_non_finite_weight_is_refused_even_where_relu_would_hide_it(mlp):
    tensors = tensors_of(mlp)
    tensors["mlp_head.0.bias"] = torch.full_like(tensors["mlp_head.0.bias"], float("-inf"))
    with pytest.raises(NonFiniteValuesError, match="'mlp_head.0.bias' contains NaN or infinite"):
        _parse(mlp, tensors)


def test_a_huge_lstm_layer_index_is_reported_briefly(lstm):
    tensors = tensors_of(lstm)
    tensors["lstm_head.weight_ih_l" + "9" * 40] = torch.zeros(1)
    with pytest.raises(TensorMissingError, match="not contiguous") as err:
        _parse(lstm, tensors)
    assert len(str(err.value)) < 300
