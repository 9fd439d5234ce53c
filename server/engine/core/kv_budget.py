"""How the engine core's KV memory is split: `--kv-cache-memory`, the batch size, the positions
a row can hold and the prefix cache.

`--kv-cache-memory` is `auto`, a fraction of the GPU memory free once the weights are loaded
(`0.5`), or a byte size (`8GiB`, `500MB`, `1073741824`). A slot holds one row's keys and values
for every position a row may use, so the budget decides how many rows can run at once: the
core allocates one slot per `--max-batch-size` row (and one scratch slot for padded decode
steps) when the budget holds them. What the slots leave holds the prefix cache's shared soft
prompts, up to the most it can ever use: a prefix for every soft-prompt row the prompt table
holds (an adapter no longer in the table has new ids when it comes back, so its old entry is
dead). `auto` is 90% of the free GPU memory on CUDA; on the CPU, where free memory is not
measured, it is all the slots and a prefix cache of `--max-batch-size` soft prompts of
`--max-virtual-tokens`.

When the operator left `--max-model-len` unset and a slot of the model's whole context does
not fit every row (a long-context model: 128k positions of an 8B model are 16 GiB), the rows
keep their number and each slot holds fewer positions instead: the prefix cache's room is set
aside, the rest divided between the slots, down to 2048 positions (or the context, if less).
Below that the slots keep that length and fewer rows run at once. The log says which, and the
server's context (what a request may use) becomes the slot's length.
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


AUTO_LENGTH_FLOOR = 2048  # a fitted slot never holds fewer positions (unless the context does)
LENGTH_STEP = 256  # a fitted slot's positions are a multiple of this


@dataclass(frozen=True)
class KVPlan:
    slots: int
    length: int  # positions per slot: the most one row (prompt and new tokens) can use
    prefix_tokens: int  # 0: no room for the prefix cache


def kv_plan(value: str, *, length: int, token_bytes: int, rows: int, prefix_tokens: int,
            device: torch.device, fit_length: bool = False,
            prefix_most: int | None = None) -> KVPlan:
    """Slots of `length` positions (rows + 1 at most, 2 at least) and then prefix-cache tokens
    (at most `prefix_most`, default `prefix_tokens`) within the budget; KVBudgetError naming
    the flag when the budget cannot hold two slots. `prefix_tokens`: the prefix cache's size
    where the budget is not measured (the CPU's auto), and the room set aside for it before a
    length is fitted. `fit_length`: the length was not pinned by the operator, so it may
    shrink for every row to run."""
    budget = parse_kv_cache_memory(value)
    wanted = rows + 1
    if budget is None and device.type != "cuda":
        return KVPlan(wanted, length, prefix_tokens)
    if isinstance(budget, float) or budget is None:
        if device.type != "cuda":
            raise KVBudgetError(f"--kv-cache-memory {value}: a fraction of GPU memory needs a GPU; "
                             "give a byte size on the CPU")
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * (AUTO_FRACTION if budget is None else budget))
    if fit_length and (wanted * length + prefix_tokens) * token_bytes > budget:
        length = _fitted_length(value, budget, token_bytes, wanted, length, prefix_tokens)
    slot_bytes = token_bytes * length
    slots = min(wanted, budget // slot_bytes)
    if slots < 2:
        raise KVBudgetError(f"--kv-cache-memory {value}: {budget} bytes hold {slots} KV slot(s) of "
                         f"{slot_bytes} bytes; at least 2 are needed (lower --max-model-len or "
                         "raise the budget)")
    if slots < wanted:
        log.warning("--kv-cache-memory %s holds %d KV slots of %d bytes: at most %d rows run "
                    "at once (--max-batch-size %d)", value, slots, slot_bytes, slots - 1, rows)
    left = budget - slots * slot_bytes
    most = prefix_tokens if prefix_most is None else prefix_most
    return KVPlan(slots, length, min(most, left // token_bytes))


def _fitted_length(value: str, budget: int, token_bytes: int, slots: int, context: int,
                   prefix_tokens: int) -> int:
    """The most positions per slot with which `slots` slots and the prefix cache fit."""
    fitted = (budget // token_bytes - prefix_tokens) // slots // LENGTH_STEP * LENGTH_STEP
    floor = min(context, AUTO_LENGTH_FLOOR)
    if fitted < floor:
        return floor  # the rows give way instead (kv_plan warns)
    log.warning("--kv-cache-memory %s cannot hold %d rows of the model's %d positions: each "
                "row may use at most %d positions (prompt and new tokens); set --max-model-len "
                "or raise the budget to change it", value, slots - 1, context, fitted)
    return fitted
