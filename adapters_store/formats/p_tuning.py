"""P_TUNING: saved ``prompt_embeddings``, or a raw prompt encoder collapsed once at parse time.

The encoder runs exactly as PEFT's PromptEncoder does in save_pretrained: the embedding table
over all ``num_virtual_tokens * num_transformer_submodules`` indices, then either
MLP (Linear -> ReLU -> Linear -> ReLU -> Linear) or a bidirectional, batch-first LSTM over
that whole sequence followed by Linear -> ReLU -> Linear on its ``2 * hidden`` output.
Sizes come from the tensor shapes and are cross-checked with the config. Collapsing leaves the
server one ``[rows, token_dim]`` table per tenant instead of a network to run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from adapters_store.config import AdapterConfig
from adapters_store.errors import (
    ShapeMismatchError,
    TensorMissingError,
    UnsupportedAdapterTypeError,
)
from adapters_store.formats.keys import EMBEDDING_KEY, describe_keys, find_encoder, find_saved
from adapters_store.validate import check_float, check_table

REPARAM_TYPES = ("MLP", "LSTM")
_LSTM_KEY_RE = re.compile(r"^lstm_head\.(weight|bias)_(ih|hh)_l(\d+)(_reverse)?$")


def _param(params: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 copy of one encoder parameter, after checking it exists and has `shape`."""
    if key not in params:
        raise TensorMissingError(
            f"P-tuning encoder checkpoint lacks {key!r} (found: {describe_keys(params)})"
        )
    tensor = params[key]
    check_float(tensor, key)
    if tuple(tensor.shape) != shape:
        raise ShapeMismatchError(
            f"P-tuning encoder parameter {key!r} has shape {list(tensor.shape)}, "
            f"expected {list(shape)} from the other encoder tensors"
        )
    return tensor.to(torch.float32)


def _check_hidden(config: AdapterConfig, hidden: int) -> None:
    declared = config.raw.get("encoder_hidden_size")
    if isinstance(declared, int) and declared != hidden:
        raise ShapeMismatchError(
            f"encoder_hidden_size is {declared} in adapter_config.json but the encoder "
            f"tensors have hidden size {hidden}"
        )


def _run_mlp(params: Mapping[str, torch.Tensor], x: torch.Tensor,
             config: AdapterConfig) -> torch.Tensor:
    dim = x.shape[1]
    hidden = params["mlp_head.0.weight"].shape[0] if "mlp_head.0.weight" in params else 0
    _check_hidden(config, hidden)
    x = F.relu(F.linear(x, _param(params, "mlp_head.0.weight", (hidden, dim)),
                        _param(params, "mlp_head.0.bias", (hidden,))))
    x = F.relu(F.linear(x, _param(params, "mlp_head.2.weight", (hidden, hidden)),
                        _param(params, "mlp_head.2.bias", (hidden,))))
    return F.linear(x, _param(params, "mlp_head.4.weight", (dim, hidden)),
                    _param(params, "mlp_head.4.bias", (dim,)))


def _run_lstm(params: Mapping[str, torch.Tensor], x: torch.Tensor,
              config: AdapterConfig) -> torch.Tensor:
    dim = x.shape[1]
    layers = set()
    for key in params:
        if key.startswith("lstm_head."):
            match = _LSTM_KEY_RE.match(key)
            if match is None:
                raise UnsupportedAdapterTypeError(
                    f"P-tuning LSTM parameter {key!r} is not supported (only PEFT's "
                    "bidirectional LSTM with biases and no projection)"
                )
            layers.add(int(match[3]))
    num_layers = len(layers)
    if layers != set(range(num_layers)):
        raise TensorMissingError(f"P-tuning LSTM layers are not contiguous: {sorted(layers)}")
    declared = config.raw.get("encoder_num_layers")
    if isinstance(declared, int) and declared != num_layers:
        raise ShapeMismatchError(
            f"encoder_num_layers is {declared} in adapter_config.json but the checkpoint "
            f"holds {num_layers} LSTM layers"
        )
    hh = params.get("lstm_head.weight_hh_l0")
    hidden = hh.shape[-1] if hh is not None and hh.dim() == 2 else 0
    _check_hidden(config, hidden)
    state = {}
    for layer in range(num_layers):
        in_dim = dim if layer == 0 else 2 * hidden
        for suffix in ("", "_reverse"):
            for name, shape in (("weight_ih", (4 * hidden, in_dim)),
                                ("weight_hh", (4 * hidden, hidden)),
                                ("bias_ih", (4 * hidden,)), ("bias_hh", (4 * hidden,))):
                key = f"{name}_l{layer}{suffix}"
                state[key] = _param(params, f"lstm_head.{key}", shape)
    # Built on the meta device so no random init runs (and the global RNG is left alone),
    # then the checkpoint's tensors are assigned in.
    lstm = torch.nn.LSTM(dim, hidden, num_layers=num_layers, bidirectional=True,
                         batch_first=True, device="meta")
    lstm.load_state_dict(state, assign=True)
    lstm.eval()
    out = lstm(x.unsqueeze(0))[0][0]  # [rows, 2 * hidden]
    out = F.relu(F.linear(out, _param(params, "mlp_head.0.weight", (2 * hidden, 2 * hidden)),
                          _param(params, "mlp_head.0.bias", (2 * hidden,))))
    return F.linear(out, _param(params, "mlp_head.2.weight", (dim, 2 * hidden)),
                    _param(params, "mlp_head.2.bias", (dim,)))


def _reparam_type(config: AdapterConfig, params: Mapping[str, torch.Tensor]) -> str:
    has_lstm = any(k.startswith("lstm_head.") for k in params)
    found = "LSTM" if has_lstm else "MLP"
    declared = config.raw.get("encoder_reparameterization_type")
    if declared is None:
        return found
    if declared not in REPARAM_TYPES:
        raise UnsupportedAdapterTypeError(
            f"encoder_reparameterization_type {declared!r} is not supported: "
            f"supported: {', '.join(REPARAM_TYPES)}"
        )
    if declared != found:
        raise ShapeMismatchError(
            f"adapter_config.json says encoder_reparameterization_type={declared} but the "
            f"checkpoint holds an {found} encoder"
        )
    return found


def collapse_encoder(params: Mapping[str, torch.Tensor], config: AdapterConfig,
                     token_dim: int) -> torch.Tensor:
    """Run a raw P-tuning encoder once; returns [total_virtual_tokens, token_dim] float32."""
    table = check_table(params[EMBEDDING_KEY], config, token_dim, name=EMBEDDING_KEY)
    kind = _reparam_type(config, params)
    with torch.inference_mode():
        if kind == "LSTM":
            out = _run_lstm(params, table, config)
        else:
            out = _run_mlp(params, table, config)
    return out.contiguous()


def extract(tensors: Mapping[str, torch.Tensor], config: AdapterConfig,
            token_dim: int) -> torch.Tensor:
    """The virtual-token table of a P_TUNING adapter (not yet checked for finiteness)."""
    saved = find_saved(tensors)
    if saved is not None:
        return check_table(saved, config, token_dim, name="prompt_embeddings")
    params = find_encoder(tensors)
    if params is None:
        raise TensorMissingError(
            "no prompt_embeddings tensor and no P-tuning encoder (…embedding.weight with "
            f"…mlp_head.* / …lstm_head.*) in the weights (found: {describe_keys(tensors)}): "
            "upload the adapter_model file written by PEFT's save_pretrained"
        )
    if not any(k.startswith(("mlp_head.", "lstm_head.")) for k in params):
        raise TensorMissingError(
            "the P-tuning checkpoint has an embedding table but no encoder (mlp_head.* or "
            "lstm_head.*): upload the adapter_model file written by PEFT's save_pretrained"
        )
    return collapse_encoder(params, config, token_dim)
