"""What every tensor read from a weights file must be before any math touches it.

A `.bin` is rebuilt by torch from whatever strides and storages the pickle names, so a tensor
can be on the meta device (a shape with no data), an expanded or ``as_strided`` view whose
elements overlap (``torch.zeros(1, 4).expand(10**6, 4)`` is stored as 16 bytes), sparse,
quantized, or one of many views of a single storage. Each of these either fails deep inside
torch or turns a small file into a huge allocation. After these checks every tensor owns
contiguous data of exactly the size its shape says, all of it read from the file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from adapters_store.errors import TooManyTensorsError, WeightsFormatError
from adapters_store.records import Limits

FLOAT_TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_EXPECTED = "expected a dense floating-point tensor (float16, bfloat16, float32 or float64)"


def too_many_tensors(name: str, found: str, limits: Limits) -> TooManyTensorsError:
    """The one message for a weights file with more tensors than limits.max_tensors."""
    return TooManyTensorsError(
        f"{name} holds {found}, more than this server reads from one weights file (at most "
        f"{limits.max_tensors} tensors): upload the adapter_model file written by PEFT's "
        "save_pretrained"
    )


def _overlaps(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """True when two indices reach the same element (a zero or too-small stride)."""
    expected = 1
    for step, size in sorted((step, size) for size, step in zip(shape, stride, strict=True)
                             if size > 1):
        if step < expected:
            return True
        expected = step * size
    return False


def _check_one(tensor: torch.Tensor, key: str, name: str) -> None:
    where = f"{name}: tensor {key[:100]!r}"
    if tensor.is_meta:
        raise WeightsFormatError(
            f"{where} is on the meta device and holds no data; save the trained values "
            "(e.g. with save_pretrained)"
        )
    if tensor.device.type != "cpu":  # torch.load maps every real device to the CPU
        raise WeightsFormatError(f"{where} is on {tensor.device}, not the CPU")
    if tensor.layout != torch.strided or tensor.is_nested:
        raise WeightsFormatError(f"{where} is {tensor.layout}; {_EXPECTED}")
    if tensor.is_quantized or tensor.dtype not in FLOAT_TORCH_DTYPES:
        raise WeightsFormatError(f"{where} is {tensor.dtype}; {_EXPECTED}")
    shape, stride = tuple(tensor.shape), tuple(tensor.stride())
    if math.prod(shape) and _overlaps(shape, stride):
        raise WeightsFormatError(
            f"{where} has shape {list(shape)} with strides {list(stride)}: its elements "
            "overlap (an expanded or as_strided view); save tensor.contiguous() instead"
        )
    if math.prod(shape):
        last = tensor.storage_offset() + sum((n - 1) * s for n, s in zip(shape, stride,
                                                                          strict=True))
        if (last + 1) * tensor.element_size() > tensor.untyped_storage().nbytes():
            raise WeightsFormatError(f"{where} reaches past the end of its storage")


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """A plain, contiguous tensor owning exactly its elements (views and bit flags resolved)."""
    exact = tensor.numel() * tensor.element_size()
    if (type(tensor) is torch.Tensor and tensor.is_contiguous() and not tensor.requires_grad
            and tensor.storage_offset() == 0 and not tensor.is_neg() and not tensor.is_conj()
            and tensor.untyped_storage().nbytes() == exact):
        return tensor
    out = torch.empty(tensor.shape, dtype=tensor.dtype)
    with torch.no_grad():
        out.copy_(tensor)
    return out


def check_tensors(tensors: Mapping[str, torch.Tensor], *, name: str, file_bytes: int,
                  limits: Limits) -> dict[str, torch.Tensor]:
    """Refuse unusable tensors, naming the file and the tensor; return owned, dense copies.

    The sum of all tensors' bytes may not exceed the file's: each element must come from the
    file once, so many views of one storage cannot multiply what a small upload allocates.
    """
    if len(tensors) > limits.max_tensors:
        raise too_many_tensors(name, f"{len(tensors)} tensors", limits)
    for key, tensor in tensors.items():
        _check_one(tensor, key, name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total > file_bytes:
        raise WeightsFormatError(
            f"{name}: its tensors hold {total} bytes but the file is {file_bytes}: they share "
            "storage; save each tensor's own data (e.g. with save_pretrained)"
        )
    return {key: _owned(tensor) for key, tensor in tensors.items()}
