"""How many KV slots the engine core allocates: `--kv-cache-memory` and the batch size.

`--kv-cache-memory` is `auto`, a fraction of the GPU memory free once the weights are loaded
(`0.5`), or a byte size (`8GiB`, `500MB`, `1073741824`). A slot holds one row's keys and values
for the whole context (`--max-model-len`, default the model's), so the budget decides how many
rows can run at once: the core allocates one slot per `--max-batch-size` row (and one scratch
slot for padded decode steps) when the budget holds them, and fewer, with a warning, when not.
`auto` is all of them, checked against 90% of the free GPU memory on CUDA.
"""

from __future__ import annotations

import logging

import torch

from server.config import parse_kv_cache_memory

log = logging.getLogger(__name__)

AUTO_FRACTION = 0.9


class KVBudgetError(ValueError):
    """--kv-cache-memory cannot hold the KV cache the engine core needs."""


def kv_slots(value: str, *, slot_bytes: int, rows: int, device: torch.device) -> int:
    """Slots to allocate (rows + 1 at most, 2 at least); KVBudgetError naming the flag when
    the budget cannot hold two."""
    budget = parse_kv_cache_memory(value)
    wanted = rows + 1
    if budget is None and device.type != "cuda":
        return wanted
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
    return slots
