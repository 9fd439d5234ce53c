"""Checks on the virtual-token table itself: dtype, shape against config and model, finiteness.

Shared by every format so each failure has one type and one message wherever it is found.
"""

from __future__ import annotations

import torch

from adapters_store.config import AdapterConfig, token_dim_mismatch
from adapters_store.errors import NonFiniteValuesError, ShapeMismatchError, WeightsFormatError
from adapters_store.records import ModelSpec


def check_float(tensor: torch.Tensor, name: str) -> None:
    """Only dense floating-point tensors make sense as embeddings or encoder weights."""
    if tensor.layout != torch.strided or not tensor.is_floating_point():
        raise WeightsFormatError(
            f"tensor {name!r} is {tensor.dtype} ({tensor.layout}); expected a dense "
            "floating-point tensor"
        )


def check_table_shape(tensor: torch.Tensor, config: AdapterConfig, token_dim: int, *,
                      name: str) -> None:
    """Check a [total_virtual_tokens, token_dim] table without touching its data.

    The caller has already checked that token_dim is the served model's hidden size.
    """
    check_float(tensor, name)
    if tensor.dim() != 2:
        raise ShapeMismatchError(
            f"{name} has shape {list(tensor.shape)}; expected 2 dimensions "
            "[num_virtual_tokens * num_transformer_submodules, token_dim]"
        )
    rows, cols = tensor.shape
    if cols != token_dim:
        raise token_dim_mismatch(cols, ModelSpec(token_dim=token_dim), where=name)
    if rows != config.total_virtual_tokens:
        raise ShapeMismatchError(
            f"{name} has {rows} rows but adapter_config.json declares num_virtual_tokens="
            f"{config.num_virtual_tokens} x num_transformer_submodules="
            f"{config.num_transformer_submodules} = {config.total_virtual_tokens}"
        )


def check_table(tensor: torch.Tensor, config: AdapterConfig, token_dim: int, *,
                name: str) -> torch.Tensor:
    """Check a [total_virtual_tokens, token_dim] table; returns it as float32."""
    check_table_shape(tensor, config, token_dim, name=name)
    return tensor.to(torch.float32)


def finalize(table: torch.Tensor, *, name: str = "prompt_embeddings") -> torch.Tensor:
    """Reject NaN/Inf and return an owned, contiguous float32 CPU tensor."""
    table = table.to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(table).all()):
        bad = int((~torch.isfinite(table)).sum())
        raise NonFiniteValuesError(
            f"{name} contains {bad} NaN or infinite values: the adapter is broken (check "
            "training for divergence) and cannot be served"
        )
    return table.contiguous().clone()
