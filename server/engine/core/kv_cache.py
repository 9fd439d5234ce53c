"""The KV cache: fixed capacity, allocated once, one slot of `max_len` positions per row.

Per-row slots rather than paged blocks: a soft-prompt request's context is its virtual tokens,
a short text and its output, so rows are short and similar, and the memory a block table would
save is small next to what it costs: an indirection in every attention read, and a gather that
a captured graph has to replay over a table that changes each step. A slot is contiguous, so
attention reads one slice per row, and a row never outgrows its slot (its length is capped at
`max_len` when it is admitted); a row is admitted when a slot is free, and preempting a row
frees its slot at once (it is recomputed when it runs again). The layout, per layer:

    keys[layer], values[layer]: [slots * max_len, kv_heads, head_dim]

so the cache index of a row's position p is `slot * max_len + p`, and a step writes every new
token's keys and values with one index_copy_ per layer.

The model's own attention code computes the projections and rotary embeddings; the attention
itself (write into the cache, attend over the row's slot) is the function this module registers
with transformers' attention interface, driven by the StepLayout of the current step.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F  # noqa: N812
from transformers import AttentionInterface

from server.engine.core.prefill_batches import PrefillBatch

_names = itertools.count()


@dataclass(frozen=True)
class CacheShape:
    layers: int
    kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * self.layers * self.kv_heads * self.head_dim * element


def cache_shape(config: Any) -> CacheShape:
    """The per-token KV shape a decoder config implies."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return CacheShape(int(config.num_hidden_layers), kv_heads, head_dim)


@dataclass
class StepLayout:
    """Where the step's tokens go. The first `decodes` tokens are one per decoding row;
    the prefill runs follow.

    write_index: [tokens] long, the cache index of each token's keys and values;
    decode_slots: [decodes] long; decode_lengths: [decodes] long, each row's length including
    this token; decode_width: the positions attended over (at least the longest decode row)."""

    write_index: torch.Tensor
    decodes: int
    decode_slots: torch.Tensor
    decode_lengths: torch.Tensor
    decode_width: int
    prefills: tuple[PrefillBatch, ...] = ()


class SlotKVCache:
    """Owned by the engine thread. `attn_implementation` is the name to give the model."""

    def __init__(self, shape: CacheShape, *, slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        if slots < 1 or max_len < 1:
            raise ValueError(f"a KV cache needs at least one slot of one position "
                             f"(got {slots} slots of {max_len})")
        self.shape = shape
        self.slots = slots
        self.max_len = max_len
        self.keys = [torch.zeros(slots * max_len, shape.kv_heads, shape.head_dim, dtype=dtype,
                                 device=device) for _ in range(shape.layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self._free = list(range(slots - 1, -1, -1))
        self.layout: StepLayout | None = None
        self.calls = 0  # attention calls served: 0 after a forward means the model bypassed us
        self.attn_implementation = f"softprompt_slots_{next(_names)}"
        # transformers' registry lives as long as the process: it holds the cache weakly, so
        # a core given up at startup (the model runs static batching) frees its memory.
        cache = weakref.ref(self)

        def attention(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
            owner = cache()
            if owner is None:
                raise RuntimeError("this KV cache was released")
            return owner._attention(*args, **kwargs)

        AttentionInterface.register(self.attn_implementation, attention)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def reserve(self) -> int:
        """Take a slot out of use for good (a scratch slot for padding rows to write into)."""
        if not self._free:
            raise ValueError("no slot left to reserve")
        return self._free.pop(0)

    def allocate(self) -> int | None:
        """A free slot, or None when all are taken."""
        return self._free.pop() if self._free else None

    def free(self, slot: int) -> None:
        """Give a slot back; what it held is never read again (a new row writes before it
        attends)."""
        self._free.append(slot)

    # ---- the attention function ---------------------------------------------------------------

    def _attention(self, module: Any, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, attention_mask: Any, *, scaling: float | None = None,
                   **_: Any) -> tuple[torch.Tensor, None]:
        """query [1, heads, tokens, head_dim], key/value [1, kv_heads, tokens, head_dim] for the
        step's tokens; returns [1, tokens, heads, head_dim] as transformers expects."""
        layout = self.layout
        if layout is None:
            raise RuntimeError("the KV cache was called outside an engine step")
        self.calls += 1
        layer = module.layer_idx
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(0, layout.write_index, key[0].transpose(0, 1).to(keys.dtype))
        values.index_copy_(0, layout.write_index, value[0].transpose(0, 1).to(values.dtype))
        heads, tokens, dim = query.shape[1], query.shape[2], query.shape[3]
        kv = keys.shape[1]
        group = heads // kv  # query heads per KV head, kv-major as transformers orders them
        out = query.new_empty(tokens, heads, dim)
        per_slot_k = keys.view(self.slots, self.max_len, *keys.shape[1:])
        per_slot_v = values.view(self.slots, self.max_len, *values.shape[1:])
        # A KV head's query heads are stacked as if they were more queries of one head (or, for
        # a prefill run alone, as a batch over views of its keys and values), so the attention
        # kernels see plain multi-head attention with a mask (fused kernels that take a mask do
        # not all take grouped heads; the fallback would copy K and V per head).
        if layout.decodes:
            n, width = layout.decodes, layout.decode_width
            q = query[0, :, :n].transpose(0, 1).reshape(n, kv, group, dim)
            k = per_slot_k[layout.decode_slots, :width].transpose(1, 2)  # [n, kv, width, hd]
            v = per_slot_v[layout.decode_slots, :width].transpose(1, 2)
            seen = (torch.arange(width, device=q.device)[None, :]
                    < layout.decode_lengths[:, None])  # [n, width]
            o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype),
                                               attn_mask=seen[:, None, None, :], scale=scaling)
            out[:n] = o.reshape(n, heads, dim)
        for batch in layout.prefills:
            runs, width, queries = batch.runs, batch.width, batch.queries
            q = query[0].index_select(1, batch.tokens.view(-1)).view(kv, group, runs, queries,
                                                                       dim)
            k = keys.index_select(0, batch.keys.view(-1)).view(runs, width, kv, dim)
            v = values.index_select(0, batch.keys.view(-1)).view(runs, width, kv, dim)
            k, v = k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype)  # [R, kv, E, hd]
            if runs == 1:  # a long chunk, alone: query heads as a batch, K, V and mask as views
                o = F.scaled_dot_product_attention(
                    q.permute(1, 2, 0, 3, 4).reshape(group, kv, queries, dim),
                    k.expand(group, kv, width, dim), v.expand(group, kv, width, dim),
                    attn_mask=batch.attn_mask(1, q.dtype), scale=scaling)  # [group, kv, C, hd]
                o = o.permute(2, 1, 0, 3).reshape(queries, heads, dim)
            else:  # short runs: query heads as more queries, the mask repeated for them
                o = F.scaled_dot_product_attention(
                    q.permute(2, 0, 1, 3, 4).reshape(runs, kv, group * queries, dim), k, v,
                    attn_mask=batch.attn_mask(group, q.dtype), scale=scaling)
                o = o.view(runs, kv, group, queries, dim).permute(0, 3, 1, 2, 4).reshape(
                    runs * queries, heads, dim)
            out.index_copy_(0, batch.into, o.index_select(0, batch.valid))
        return out[None], None
