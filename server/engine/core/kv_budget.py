"""How the engine core's KV memory is split: `--kv-cache-memory`, the batch size and the
prefix cache.

`--kv-cache-memory` is `auto`, a fraction of the GPU memory free once the weights are loaded
(`0.5`), or a byte size (`8GiB`, `500MB`, `1073741824`). A slot holds one row's keys and values
for the whole context (`--max-model-len`, default the model's), so the budget decides how many
rows can run at once: the core allocates one slot per `--max-batch-size` row (and one scratch
slot for padded decode steps) when the budget holds them, and fewer, with a warning, when not.
What the slots leave of the budget holds the prefix cache's shared soft prompts, up to the
tokens it can use. `auto` is 90% of the free GPU memory on CUDA; on the CPU it is all the slots
and the whole prefix cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from server.config import parse_kv_cache_memory

log = logging.getLogger(__name__)

AUTO_FRACTION = 0.9


class KVBudgetError(ValueError):
    """--kv-cache-memory cannot hold the KV cache the engine core needs."""


@dataclass(frozen=True)
class KVPlan:
    slots: int
    prefix_tokens: int  # 0: no room for the prefix cache


def kv_plan(value: str, *, slot_bytes: int, token_bytes: int, rows: int, prefix_tokens: int,
            device: torch.device) -> KVPlan:
    """Slots (rows + 1 at most, 2 at least) and then prefix-cache tokens (at most
    `prefix_tokens`) within the budget; KVBudgetError naming the flag when the budget cannot
    hold two slots."""
    budget = parse_kv_cache_memory(value)
    wanted = rows + 1
    if budget is None and device.type != "cuda":
        return KVPlan(wanted, prefix_tokens)
    if isinstance(budget, float) or budget is None:
        if device.type != "cuda":
            raise KVBudgetError(f"--kv-cache-memory {value}: a fraction of GPU memory needs a GPU; "
                             "give a byte size on the CPU")
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * (AUTO_FRACTION if budget is None else budget))
    slots = min(wanted, budget // slot_bytes)
    if slots < 2:
        raise KVBudgetError(f"--kv-cache-memory {value}: {budget} bytes hold {slots} KV slot(s) of "
                         f"{slot_bytes} bytes; at least 2 are needed (lower --max-model-len or "
                         "raise the budget)")
    if slots < wanted:
        log.warning("--kv-cache-memory %s holds %d KV slots of %d bytes: at most %d rows run "
                    "at once (--max-batch-size %d)", value, slots, slot_bytes, slots - 1, rows)
    left = budget - slots * slot_bytes
    return KVPlan(slots, min(prefix_tokens, left // token_bytes))
