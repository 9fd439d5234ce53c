"""Finding the tensors a format needs among a weights file's keys.

Saved adapters hold ``prompt_embeddings``; training checkpoints hold the prompt encoder's own
parameters under whatever prefix the training code used (``prompt_encoder.default.``,
``base_model.prompt_encoder.default.``, or none). Parameters are grouped by that prefix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from adapters_store.errors import WeightsFormatError

SAVED_KEY = "prompt_embeddings"
EMBEDDING_KEY = "embedding.weight"
_ENCODER_KEY_RE = re.compile(
    r"^(?P<prefix>.*?)(?P<local>embedding\.weight|mlp_head\.\d+\.(?:weight|bias)|lstm_head\.\w+)$"
)


def find_saved(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The save_pretrained tensor, tolerating a leading path before ``prompt_embeddings``."""
    if SAVED_KEY in tensors:
        return tensors[SAVED_KEY]
    found = [k for k in tensors if k.endswith("." + SAVED_KEY)]
    if len(found) > 1:
        raise WeightsFormatError(
            f"the weights hold several {SAVED_KEY} tensors ({', '.join(sorted(found))}): "
            "upload one adapter at a time"
        )
    return tensors[found[0]] if found else None


def find_encoder(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The prompt encoder's parameters keyed without prefix (``embedding.weight``, ...)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _ENCODER_KEY_RE.match(key)
        if match is None:
            continue
        prefix = match["prefix"]
        if prefix and not prefix.endswith("."):
            continue  # e.g. "word_embedding.weight" is not ours
        groups.setdefault(prefix, {})[match["local"]] = tensor
    candidates = {p: g for p, g in groups.items() if EMBEDDING_KEY in g}
    if len(candidates) > 1:
        names = ", ".join(repr(p + EMBEDDING_KEY) for p in sorted(candidates))
        raise WeightsFormatError(
            f"the weights hold several prompt encoders ({names}): upload one adapter at a time"
        )
    return next(iter(candidates.values()), None)


def describe_keys(tensors: Mapping[str, torch.Tensor], limit: int = 8) -> str:
    """A short list of the keys found, for error messages."""
    keys = sorted(tensors)
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
    return shown or "no tensors at all"
