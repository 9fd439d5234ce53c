"""One module per PEFT type, each exposing ``extract(tensors, config, token_dim, *, limits)``.

Adding a type is adding a module and a line here, never another branch in the parser.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from adapters_store.config import AdapterConfig
from adapters_store.formats import p_tuning, prompt_tuning
from adapters_store.records import Limits, PeftType


class Extractor(Protocol):
    """Turns checked tensors into the [total_virtual_tokens, token_dim] table, or raises."""

    def __call__(self, tensors: Mapping[str, torch.Tensor], config: AdapterConfig,
                 token_dim: int, *, limits: Limits) -> torch.Tensor: ...


EXTRACTORS: dict[PeftType, Extractor] = {
    PeftType.PROMPT_TUNING: prompt_tuning.extract,
    PeftType.P_TUNING: p_tuning.extract,
}
