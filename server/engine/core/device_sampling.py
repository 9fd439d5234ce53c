"""Each KV slot's sampling parameters, resident on the device, for the engine core's draws
(server.engine.sampling.sample, the one sampler both runners use)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.engine.interface import SamplingParams
from server.engine.sampling import TENSOR_PARAMS, SamplingBatch, param_tensors


class SlotSampling:
    """Each KV slot's sampling parameters, resident on the device: written once when a row
    takes the slot, gathered by slot index at each step, so a step sends only the rows' slots
    and draw counters to the device."""

    def __init__(self, slots: int, device: torch.device | str) -> None:
        self.params = {name: torch.full((slots,), off, dtype=dtype, device=device)
                       for name, (dtype, off) in TENSOR_PARAMS.items()}
        self.seeds = torch.zeros(slots, dtype=torch.long, device=device)

    def assign(self, slots: Sequence[int], params: Sequence[SamplingParams],
               seeds: Sequence[int]) -> None:
        """Rows taking these slots (one copy to the device per kind of parameter)."""
        if not slots:
            return
        device = self.seeds.device
        at = torch.tensor(list(slots), dtype=torch.long, device=device)
        for name, values in param_tensors(params, device).items():
            self.params[name][at] = values
        self.seeds[at] = torch.tensor(list(seeds), dtype=torch.long, device=device)

    def batch(self, slots: torch.Tensor, counters: torch.Tensor) -> SamplingBatch:
        """The parameters of the rows in these slots ([rows] long each)."""
        return SamplingBatch(**{name: values[slots] for name, values in self.params.items()},
                             seeds=self.seeds[slots], counters=counters)
