"""The shape of a raw P-tuning encoder, worked out and checked before any of it runs.

Sizes come from the tensors (the hidden size from the first layer) and must agree with each
other and with adapter_config.json; then the elements the collapse would touch, weights and
activations, are counted against ``limits.max_encoder_params``. A checkpoint whose shapes do
not add up is a ShapeMismatchError naming the tensor, never a RuntimeError from inside torch,
and one that would need gigabytes to run is refused before a byte is allocated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import torch

from adapters_store.config import AdapterConfig, optional_int, shown
from adapters_store.errors import (
    EncoderTooLargeError,
    ShapeMismatchError,
    TensorMissingError,
    UnsupportedAdapterTypeError,
)
from adapters_store.formats.keys import describe_keys
from adapters_store.records import Limits


class EncoderKind(StrEnum):
    """PEFT's encoder_reparameterization_type values this server can run."""

    MLP = "MLP"
    LSTM = "LSTM"


_KINDS = tuple(kind.value for kind in EncoderKind)  # a tuple: `in` must not hash the value
_LSTM_KEY_RE = re.compile(r"^lstm_head\.(weight|bias)_(ih|hh)_l(\d+)(_reverse)?$")


@dataclass(frozen=True)
class EncoderPlan:
    """What the collapse will run: every parameter's expected shape, all already checked."""

    kind: EncoderKind
    hidden: int
    num_layers: int  # LSTM layers; 0 for the MLP
    shapes: dict[str, tuple[int, ...]]  # parameter key (without prefix) -> shape


def _missing(params: Mapping[str, torch.Tensor], key: str) -> TensorMissingError:
    return TensorMissingError(
        f"P-tuning encoder checkpoint lacks {key!r} (found: {describe_keys(params)})"
    )


def _matrix_dim(params: Mapping[str, torch.Tensor], key: str, axis: int) -> int:
    """One dimension of a 2-D parameter, the size everything else is checked against."""
    if key not in params:
        raise _missing(params, key)
    shape = tuple(params[key].shape)
    if len(shape) != 2:
        raise ShapeMismatchError(
            f"P-tuning encoder parameter {key!r} has shape {list(shape)}, expected 2 dimensions"
        )
    return shape[axis]


def _declared(config: AdapterConfig, key: str) -> int | None:
    return optional_int(config.raw, key)


def _check_hidden(config: AdapterConfig, hidden: int) -> None:
    declared = _declared(config, "encoder_hidden_size")
    if declared is not None and declared != hidden:
        raise ShapeMismatchError(
            f"encoder_hidden_size is {declared} in adapter_config.json but the encoder "
            f"tensors have hidden size {hidden}"
        )


def reparam_type(config: AdapterConfig, params: Mapping[str, torch.Tensor]) -> EncoderKind:
    """MLP or LSTM, as the tensors say; the config may only confirm it."""
    has_lstm = any(k.startswith("lstm_head.") for k in params)
    found = EncoderKind.LSTM if has_lstm else EncoderKind.MLP
    declared = config.raw.get("encoder_reparameterization_type")
    if declared is None:
        return found
    if declared not in _KINDS:
        raise UnsupportedAdapterTypeError(
            f"encoder_reparameterization_type {shown(declared)} is not supported: "
            f"supported: {', '.join(_KINDS)}"
        )
    if declared != found:
        raise ShapeMismatchError(
            f"adapter_config.json says encoder_reparameterization_type={declared} but the "
            f"checkpoint holds an {found.value} encoder"
        )
    return found


def _mlp_shapes(dim: int, hidden: int) -> dict[str, tuple[int, ...]]:
    return {"mlp_head.0.weight": (hidden, dim), "mlp_head.0.bias": (hidden,),
            "mlp_head.2.weight": (hidden, hidden), "mlp_head.2.bias": (hidden,),
            "mlp_head.4.weight": (dim, hidden), "mlp_head.4.bias": (dim,)}


def _lstm_layers(params: Mapping[str, torch.Tensor], config: AdapterConfig) -> int:
    layers = set()
    for key in params:
        if key.startswith("lstm_head."):
            match = _LSTM_KEY_RE.match(key)
            if match is None:
                raise UnsupportedAdapterTypeError(
                    f"P-tuning LSTM parameter {key[:100]!r} is not supported (only PEFT's "
                    "bidirectional LSTM with biases and no projection)"
                )
            layers.add(int(match[3]))
    num_layers = len(layers)
    if layers != set(range(num_layers)):
        shown = sorted(layers)[:8]
        raise TensorMissingError(f"P-tuning LSTM layers are not contiguous: {shown}")
    declared = _declared(config, "encoder_num_layers")
    if declared is not None and declared != num_layers:
        raise ShapeMismatchError(
            f"encoder_num_layers is {declared} in adapter_config.json but the checkpoint "
            f"holds {num_layers} LSTM layers"
        )
    return num_layers


def _lstm_shapes(dim: int, hidden: int, num_layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(num_layers):
        in_dim = dim if layer == 0 else 2 * hidden
        for suffix in ("", "_reverse"):
            shapes[f"lstm_head.weight_ih_l{layer}{suffix}"] = (4 * hidden, in_dim)
            shapes[f"lstm_head.weight_hh_l{layer}{suffix}"] = (4 * hidden, hidden)
            shapes[f"lstm_head.bias_ih_l{layer}{suffix}"] = (4 * hidden,)
            shapes[f"lstm_head.bias_hh_l{layer}{suffix}"] = (4 * hidden,)
    shapes.update({"mlp_head.0.weight": (2 * hidden, 2 * hidden),
                   "mlp_head.0.bias": (2 * hidden,),
                   "mlp_head.2.weight": (dim, 2 * hidden), "mlp_head.2.bias": (dim,)})
    return shapes


def _activation_width(kind: EncoderKind, dim: int, hidden: int, num_layers: int) -> int:
    """Elements per virtual token of the intermediate results, float32 copies included."""
    if kind == EncoderKind.LSTM:
        # per layer: both directions' gates and outputs; then the MLP head on 2 * hidden
        return dim + num_layers * (2 * 4 * hidden + 2 * 2 * hidden) + 2 * 2 * hidden + dim
    return dim + 2 * hidden + 2 * hidden + dim  # each Linear's output and its ReLU


def _check_cost(shapes: Mapping[str, tuple[int, ...]], rows: int, width: int,
                limits: Limits) -> None:
    weights = sum(math.prod(shape) for shape in shapes.values())
    activations = rows * width
    if weights + activations > limits.max_encoder_params:
        raise EncoderTooLargeError(
            f"collapsing this P-tuning encoder needs {weights + activations} elements "
            f"({weights} of weights, {activations} of activations), above this server's "
            f"limit of {limits.max_encoder_params} (--max-encoder-params): train a smaller "
            "encoder, or upload the prompt_embeddings written by PEFT's save_pretrained"
        )


def plan_encoder(params: Mapping[str, torch.Tensor], config: AdapterConfig, dim: int, *,
                 limits: Limits) -> EncoderPlan:
    """Check every parameter's presence and shape, and the cost of running them, up front."""
    kind = reparam_type(config, params)
    if kind == EncoderKind.LSTM:
        num_layers = _lstm_layers(params, config)
        hidden = _matrix_dim(params, "lstm_head.weight_hh_l0", 1)
        shapes = _lstm_shapes(dim, hidden, num_layers)
    else:
        num_layers = 0
        hidden = _matrix_dim(params, "mlp_head.0.weight", 0)
        shapes = _mlp_shapes(dim, hidden)
    _check_hidden(config, hidden)
    for key, shape in shapes.items():
        if key not in params:
            raise _missing(params, key)
        if tuple(params[key].shape) != shape:
            raise ShapeMismatchError(
                f"P-tuning encoder parameter {key!r} has shape {list(params[key].shape)}, "
                f"expected {list(shape)} from the other encoder tensors"
            )
    _check_cost({"embedding.weight": (config.total_virtual_tokens, dim), **shapes},
                config.total_virtual_tokens, _activation_width(kind, dim, hidden, num_layers),
                limits)
    return EncoderPlan(kind, hidden, num_layers, shapes)
