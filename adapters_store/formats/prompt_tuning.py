"""PROMPT_TUNING: the table is the adapter; ``prompt_embeddings`` as save_pretrained writes it.

A raw training state dict (``…prompt_encoder.<name>.embedding.weight``) holds the same table
and is accepted too.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from adapters_store.config import AdapterConfig
from adapters_store.errors import ConfigInvalidError, TensorMissingError
from adapters_store.formats.keys import EMBEDDING_KEY, describe_keys, find_encoder, find_saved
from adapters_store.records import Limits
from adapters_store.validate import check_table


def extract(tensors: Mapping[str, torch.Tensor], config: AdapterConfig, token_dim: int, *,
            limits: Limits) -> torch.Tensor:
    """The virtual-token table of a PROMPT_TUNING adapter (not yet checked for finiteness)."""
    saved = find_saved(tensors)
    if saved is not None:
        return check_table(saved, config, token_dim, name="prompt_embeddings")
    params = find_encoder(tensors)
    if params is None:
        raise TensorMissingError(
            f"no prompt_embeddings tensor in the weights (found: {describe_keys(tensors)}): "
            "upload the adapter_model file written by PEFT's save_pretrained"
        )
    if any(k.startswith(("mlp_head.", "lstm_head.")) for k in params):
        raise ConfigInvalidError(
            "adapter_config.json says peft_type=PROMPT_TUNING but the weights hold a P-tuning "
            "encoder: set peft_type to P_TUNING"
        )
    return check_table(params[EMBEDDING_KEY], config, token_dim, name=EMBEDDING_KEY)
