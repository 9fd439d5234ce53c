"""Reading weights files safely: safetensors, or `.bin` through torch's weights-only unpickler.

A `.bin` is a pickle; a pickle can run code. It is only ever read with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers, and
whatever it returns must be a flat ``{str: Tensor}`` mapping.
"""

from __future__ import annotations

import io

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from adapters_store.errors import FileTooLargeError, WeightsFormatError
from adapters_store.records import Limits

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
WEIGHTS_NAMES = (SAFETENSORS_NAME, BIN_NAME)  # in order of preference, as PEFT loads them


def check_size(name: str, size: int, limits: Limits) -> None:
    """Raise FileTooLargeError for a file above limits.max_file_bytes."""
    if size > limits.max_file_bytes:
        raise FileTooLargeError(
            f"{name} is {size} bytes, above this server's limit of {limits.max_file_bytes} bytes"
        )


def _read_safetensors(data: bytes, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as e:
        raise WeightsFormatError(f"{name} is not a valid safetensors file: {e}") from e


def _read_bin(data: bytes, name: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # the unpickler raises many types; all mean "not plain tensors"
        raise WeightsFormatError(
            f"{name} could not be loaded as plain tensors (only torch.load(weights_only=True) "
            f"is allowed; re-save with safe_serialization=True for safetensors): {e}"
        ) from e
    if not isinstance(obj, dict):
        raise WeightsFormatError(
            f"{name} holds a {type(obj).__name__}, expected a state dict of name -> tensor"
        )
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise WeightsFormatError(
                f"{name} entry {key!r} is a {type(value).__name__}, expected a state dict of "
                "name -> tensor"
            )
    return dict(obj)


def read_weights(data: bytes, *, weights_name: str, limits: Limits) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, chosen by its name's extension; nothing else is accepted."""
    check_size(weights_name, len(data), limits)
    if weights_name.endswith(".safetensors"):
        tensors = _read_safetensors(data, weights_name)
    elif weights_name.endswith(".bin"):
        tensors = _read_bin(data, weights_name)
    else:
        raise WeightsFormatError(
            f"weights file {weights_name!r} has an unknown extension: upload "
            f"{SAFETENSORS_NAME} (preferred) or {BIN_NAME}"
        )
    return tensors
