"""Reading weights files safely: safetensors, or `.bin` through torch's weights-only unpickler.

A `.bin` is a pickle; a pickle can run code. It is only ever read with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers, and
whatever it returns must be a flat ``{str: Tensor}`` mapping. Both formats are sized from their
own index (the safetensors header, the zip's end records) before the parser runs, and every
tensor read is checked and made dense before it is returned.
"""

from __future__ import annotations

import io
import zipfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from adapters_store.config import CONFIG_NAME
from adapters_store.errors import FileTooLargeError, WeightsFormatError
from adapters_store.records import Limits
from adapters_store.safetensors_header import check_header
from adapters_store.tensor_checks import check_tensors, too_many_tensors
from adapters_store.zip_directory import directory_too_large, read_zip_directory

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
WEIGHTS_NAMES = (SAFETENSORS_NAME, BIN_NAME)  # in order of preference, as PEFT loads them
# Records torch.save writes besides one per storage: data.pkl, version, byteorder, ...
_TORCH_RECORDS = 16
# data.pkl describes each tensor in about 150 bytes plus its name.
_PICKLE_BYTES_PER_TENSOR = 1024
_ZIP_MAGIC = b"PK\x03\x04"


def size_limit(name: str, limits: Limits) -> int:
    """adapter_config.json is small (and stored verbatim); any other file may be large."""
    return limits.max_config_bytes if name == CONFIG_NAME else limits.max_file_bytes


def check_size(name: str, size: int, limits: Limits) -> None:
    """Raise FileTooLargeError for a file above its limit (size_limit)."""
    limit = size_limit(name, limits)
    if size > limit:
        raise FileTooLargeError(
            f"{name} is {size} bytes, above this server's limit of {limit} bytes"
        )


def _read_safetensors(data: bytes, name: str, limits: Limits) -> dict[str, torch.Tensor]:
    check_header(data, name=name, limits=limits)
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError, KeyError, TypeError) as e:
        raise WeightsFormatError(f"{name} is not a valid safetensors file: {e}") from e


def _not_plain(name: str, reason: object) -> WeightsFormatError:
    return WeightsFormatError(
        f"{name} could not be loaded as plain tensors (only torch.load(weights_only=True) "
        f"is allowed; re-save with safe_serialization=True for safetensors): {reason}"
    )


def _check_torch_archive(data: bytes, name: str, limits: Limits) -> None:
    """Bound what torch.load will parse and unpickle, from the zip's own records."""
    if not data.startswith(_ZIP_MAGIC):
        raise _not_plain(name, "it is not the zip archive torch.save has written since torch 1.6")
    src = io.BytesIO(data)
    records = limits.max_tensors + _TORCH_RECORDS
    try:
        directory = read_zip_directory(src, len(data))
        if directory_too_large(directory, records):
            raise too_many_tensors(name, f"a zip directory of {directory.entries} records "
                                   f"({directory.size} bytes)", limits)
        with zipfile.ZipFile(src) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise _not_plain(name, f"corrupt zip archive: {e}") from e
    if len(infos) > records:
        raise too_many_tensors(name, f"{len(infos)} zip records", limits)
    pickles = [i for i in infos if i.filename.rsplit("/", 1)[-1] == "data.pkl"]
    if len(pickles) != 1:
        raise _not_plain(name, f"expected one data.pkl record, found {len(pickles)}")
    if pickles[0].file_size > limits.max_tensors * _PICKLE_BYTES_PER_TENSOR:
        raise too_many_tensors(name, f"a {pickles[0].file_size}-byte tensor index (data.pkl)",
                               limits)


def _read_bin(data: bytes, name: str, limits: Limits) -> dict[str, torch.Tensor]:
    _check_torch_archive(data, name, limits)
    try:
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # the unpickler raises many types; all mean "not plain tensors"
        raise _not_plain(name, e) from e
    if not isinstance(obj, dict):
        raise WeightsFormatError(
            f"{name} holds a {type(obj).__name__}, expected a state dict of name -> tensor"
        )
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise WeightsFormatError(
                f"{name} entry {str(key)[:100]!r} is a {type(value).__name__}, expected a "
                "state dict of name -> tensor"
            )
    return dict(obj)


def read_weights(data: bytes, *, weights_name: str, limits: Limits) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, chosen by its name's extension; nothing else is accepted.

    Every tensor returned is dense, floating-point, on the CPU and owns its data.
    """
    check_size(weights_name, len(data), limits)
    if weights_name.endswith(".safetensors"):
        tensors = _read_safetensors(data, weights_name, limits)
    elif weights_name.endswith(".bin"):
        tensors = _read_bin(data, weights_name, limits)
    else:
        raise WeightsFormatError(
            f"weights file {weights_name!r} has an unknown extension: upload "
            f"{SAFETENSORS_NAME} (preferred) or {BIN_NAME}"
        )
    return check_tensors(tensors, name=weights_name, file_bytes=len(data), limits=limits)
