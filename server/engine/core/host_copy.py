"""The step's one copy of its drawn tokens to the host, waited for without the GIL.

`tensor.tolist()` on an accelerator blocks in the copy while holding the interpreter lock, so
nothing else in the process runs until the device has finished the step. Here the copy goes
into a pinned buffer without blocking, and the wait is on an event, which releases the lock:
the frontend's detokenizing and streaming of earlier steps, and the HTTP side's work, run
while the device computes. Tensors already on the host need no copy.
"""

from __future__ import annotations

import torch


class HostCopy:
    """Owned by the engine thread (one buffer, reused each step)."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self._rows = rows
        self._buffer: torch.Tensor | None = None
        self._event = torch.cuda.Event() if device.type == "cuda" else None

    def tokens(self, drawn: torch.Tensor) -> list[int]:
        """`drawn` ([rows] token ids on the device) as a list, once the device has them."""
        if self._event is None:
            return drawn.tolist()
        n = drawn.numel()
        if self._buffer is None or self._buffer.dtype != drawn.dtype or self._buffer.numel() < n:
            self._buffer = torch.empty(max(n, self._rows), dtype=drawn.dtype, pin_memory=True)
        host = self._buffer[:n]
        host.copy_(drawn.view(-1), non_blocking=True)
        self._event.record()
        self._event.synchronize()  # releases the GIL while the device finishes the step
        return host.tolist()
