"""P_TUNING: saved ``prompt_embeddings``, or a raw prompt encoder collapsed once at parse time.

The encoder runs exactly as PEFT's PromptEncoder does in save_pretrained: the embedding table
over all ``num_virtual_tokens * num_transformer_submodules`` indices, then either
MLP (Linear -> ReLU -> Linear -> ReLU -> Linear) or a bidirectional, batch-first LSTM over
that whole sequence followed by Linear -> ReLU -> Linear on its ``2 * hidden`` output.
Sizes come from the tensor shapes and are cross-checked with the config, and the cost of the
run with the limits, before anything runs (p_tuning_plan). Collapsing leaves the server one
``[rows, token_dim]`` table per tenant instead of a network to run.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from adapters_store.config import AdapterConfig
from adapters_store.errors import NonFiniteValuesError, TensorMissingError
from adapters_store.formats.keys import EMBEDDING_KEY, describe_keys, find_encoder, find_saved
from adapters_store.formats.p_tuning_plan import EncoderKind, EncoderPlan, plan_encoder
from adapters_store.records import Limits
from adapters_store.validate import check_float, check_table, check_table_shape


def _float32(params: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    """A float32 copy of one encoder parameter whose shape the plan has checked."""
    tensor = params[key]
    check_float(tensor, key)
    tensor = tensor.to(torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteValuesError(
            f"P-tuning encoder parameter {key!r} contains NaN or infinite values: the "
            "checkpoint is broken (check training for divergence)"
        )
    return tensor


def _run_mlp(params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    w = {key: _float32(params, key) for key in (
        "mlp_head.0.weight", "mlp_head.0.bias", "mlp_head.2.weight", "mlp_head.2.bias",
        "mlp_head.4.weight", "mlp_head.4.bias")}
    x = F.relu(F.linear(x, w["mlp_head.0.weight"], w["mlp_head.0.bias"]))
    x = F.relu(F.linear(x, w["mlp_head.2.weight"], w["mlp_head.2.bias"]))
    return F.linear(x, w["mlp_head.4.weight"], w["mlp_head.4.bias"])


def _run_lstm(params: Mapping[str, torch.Tensor], x: torch.Tensor,
              plan: EncoderPlan) -> torch.Tensor:
    state = {key.removeprefix("lstm_head."): _float32(params, key)
             for key in plan.shapes if key.startswith("lstm_head.")}
    head = {key: _float32(params, key) for key in plan.shapes if key.startswith("mlp_head.")}
    # Built on the meta device so no random init runs (and the global RNG is left alone),
    # then the checkpoint's tensors are assigned in.
    lstm = torch.nn.LSTM(x.shape[1], plan.hidden, num_layers=plan.num_layers,
                         bidirectional=True, batch_first=True, device="meta")
    lstm.load_state_dict(state, assign=True)
    lstm.eval()
    out = lstm(x.unsqueeze(0))[0][0]  # [rows, 2 * hidden]
    out = F.relu(F.linear(out, head["mlp_head.0.weight"], head["mlp_head.0.bias"]))
    return F.linear(out, head["mlp_head.2.weight"], head["mlp_head.2.bias"])


def collapse_encoder(params: Mapping[str, torch.Tensor], config: AdapterConfig,
                     token_dim: int, *, limits: Limits) -> torch.Tensor:
    """Run a raw P-tuning encoder once; returns [total_virtual_tokens, token_dim] float32."""
    check_table_shape(params[EMBEDDING_KEY], config, token_dim, name=EMBEDDING_KEY)
    plan = plan_encoder(params, config, token_dim, limits=limits)
    table = _float32(params, EMBEDDING_KEY)  # [rows, token_dim]
    with torch.inference_mode():
        if plan.kind == EncoderKind.LSTM:
            out = _run_lstm(params, table, plan)
        else:
            out = _run_mlp(params, table)
    return out.contiguous()


def extract(tensors: Mapping[str, torch.Tensor], config: AdapterConfig, token_dim: int, *,
            limits: Limits) -> torch.Tensor:
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
    return collapse_encoder(params, config, token_dim, limits=limits)
