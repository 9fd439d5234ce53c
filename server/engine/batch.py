"""Batch building: each row's soft prompt prepended to its token embeddings, left-padded.

Left padding with an attention mask of 0 on the pads keeps every row's output independent of
its batch mates: transformers derives position ids from the mask (causal LMs) and the pads are
masked out of attention, so a row sees exactly what it would see alone. PEFT's own batching
instead puts the virtual tokens before the padding; we deliberately do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowInput:
    """What one row contributes to the batch."""

    prompt_ids: Sequence[int]
    prompt_embeds: torch.Tensor | None  # [num_virtual_tokens, hidden], or None: no adapter


@dataclass(frozen=True)
class BatchInputs:
    inputs_embeds: torch.Tensor  # [batch, max_len, hidden], zeros on the left pads
    attention_mask: torch.Tensor  # [batch, max_len] int64: 0 on pads, 1 on virtual + text tokens
    lengths: tuple[int, ...]  # per row: num_virtual_tokens + len(prompt_ids)


def build_batch_inputs(embedding: torch.nn.Module, rows: Sequence[RowInput]) -> BatchInputs:
    """Embed every row's text in one call, prepend its soft prompt, left-pad to the longest row.

    `embedding` is `model.get_input_embeddings()`; its output dtype and device decide the
    batch's. Soft prompts are cast to that dtype/device (a no-op when the caller already did).
    Raises ValueError for an empty batch, a row with neither tokens nor virtual tokens, or a
    soft prompt whose width is not the model's hidden size.
    """
    if not rows:
        raise ValueError("cannot build a batch of zero rows")
    weight = getattr(embedding, "weight", None)
    device = weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")

    flat_ids = [int(t) for row in rows for t in row.prompt_ids]
    ids = torch.tensor(flat_ids, dtype=torch.long, device=device)  # [total_text_tokens]
    token_embeds = embedding(ids)  # [total_text_tokens, hidden]
    hidden, dtype = token_embeds.shape[-1], token_embeds.dtype

    lengths: list[int] = []
    for i, row in enumerate(rows):
        n_virtual = 0
        if row.prompt_embeds is not None:
            pe = row.prompt_embeds
            if pe.dim() != 2 or pe.shape[1] != hidden:
                raise ValueError(
                    f"row {i}: prompt_embeds has shape {tuple(pe.shape)}, "
                    f"expected [num_virtual_tokens, {hidden}]"
                )
            n_virtual = pe.shape[0]
        length = n_virtual + len(row.prompt_ids)
        if length == 0:
            raise ValueError(f"row {i}: no prompt tokens and no virtual tokens")
        lengths.append(length)

    max_len = max(lengths)
    inputs_embeds = torch.zeros(len(rows), max_len, hidden, dtype=dtype, device=device)
    attention_mask = torch.zeros(len(rows), max_len, dtype=torch.long, device=device)
    offset = 0
    for i, (row, length) in enumerate(zip(rows, lengths, strict=True)):
        start = max_len - length
        attention_mask[i, start:] = 1
        if row.prompt_embeds is not None and row.prompt_embeds.shape[0]:
            n_virtual = row.prompt_embeds.shape[0]
            inputs_embeds[i, start : start + n_virtual] = row.prompt_embeds.to(device, dtype)
            start += n_virtual
        n_text = len(row.prompt_ids)
        if n_text:
            inputs_embeds[i, start:] = token_embeds[offset : offset + n_text]
            offset += n_text
    return BatchInputs(inputs_embeds, attention_mask, tuple(lengths))
