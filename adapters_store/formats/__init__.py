"""One module per PEFT type, each exposing ``extract(tensors, config, token_dim) -> table``.

Adding a type is adding a module and a line here, never another branch in the parser.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from adapters_store.config import AdapterConfig
from adapters_store.formats import p_tuning, prompt_tuning
from adapters_store.records import PeftType

Extractor = Callable[[Mapping[str, torch.Tensor], AdapterConfig, int], torch.Tensor]

EXTRACTORS: dict[PeftType, Extractor] = {
    PeftType.PROMPT_TUNING: prompt_tuning.extract,
    PeftType.P_TUNING: p_tuning.extract,
}
