"""Host values to the device without waiting for it.

A copy from pageable host memory to a GPU first waits for every kernel queued on the stream.
Made once a step's forward is launched (the sampling parameters of the rows that draw, the
rows that want logprobs), that wait is the whole forward, and the kernels that follow are
launched only after it, leaving the device idle meanwhile. From pinned memory the copy is
queued like a kernel and the host goes on; the pinned buffer is kept until the copy is done
(PyTorch's pinned-memory cache records the copy's stream).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def upload(values: Sequence[Any], device: torch.device | str,
           dtype: torch.dtype = torch.long) -> torch.Tensor:
    """`values` (a list, or a list of lists) as a tensor on `device`."""
    host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
