"""A safetensors header checked by hand before the safetensors library parses the file.

The library accepts any number of entries and every dtype it knows (bool, integers, complex,
float8, float4 — some of which its torch bindings then fail on with a bare KeyError), and it
spends seconds and hundreds of MB on a header of 400k tiny entries before a caller can count
them. Reading the 8-byte length and the JSON ourselves bounds that work by the header's size
and lets every entry be checked (dtype, shape, offsets inside the file) with a message naming
the file and the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable

from adapters_store.errors import WeightsFormatError
from adapters_store.records import Limits
from adapters_store.tensor_checks import too_many_tensors

# The dtypes an embedding table or encoder weight can have; bytes per element.
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
# A saved adapter's header is about 150 bytes per tensor plus a small __metadata__.
MAX_HEADER_BYTES = 1 << 20
_METADATA = "__metadata__"


class _DuplicateKeyError(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """JSON objects with a repeated key are refused: readers disagree on which one wins."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(f"key {key[:100]!r} appears twice")
        out[key] = value
    return out


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(key: str, entry: object, data_bytes: int,
                 fail: Callable[[str], WeightsFormatError]) -> None:
    if not isinstance(entry, dict):
        raise fail(f"entry {key[:100]!r} is a {type(entry).__name__}, not a tensor description")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES:
        raise fail(
            f"tensor {key[:100]!r} has dtype {str(dtype)[:20]!r}; expected a floating-point "
            f"dtype ({', '.join(FLOAT_DTYPES)})"
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise fail(f"tensor {key[:100]!r} has shape {str(shape)[:100]}; expected a list of "
                   "non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets))
            or not offsets[0] <= offsets[1] <= data_bytes):
        raise fail(f"tensor {key[:100]!r} has data_offsets {str(offsets)[:100]}; expected "
                   f"[begin, end] within the file's {data_bytes} data bytes")
    needed = math.prod(shape) * FLOAT_DTYPES[dtype]
    if offsets[1] - offsets[0] != needed:
        raise fail(f"tensor {key[:100]!r} of shape {shape} ({dtype}) needs {needed} bytes but "
                   f"its data_offsets span {offsets[1] - offsets[0]}")


def check_header(data: bytes, *, name: str, limits: Limits) -> None:
    """Refuse anything the safetensors loader would fail on, or spend time on, in data."""

    def fail(reason: str) -> WeightsFormatError:
        return WeightsFormatError(f"{name} is not a valid safetensors file: {reason}")

    if len(data) < 8:
        raise fail(f"it is {len(data)} bytes, too short for the 8-byte header length")
    (header_bytes,) = struct.unpack("<Q", data[:8])
    if header_bytes > min(MAX_HEADER_BYTES, len(data) - 8):
        raise fail(f"its header claims {header_bytes} bytes; the file has {len(data) - 8} after "
                   f"the length and a header may take at most {MAX_HEADER_BYTES}")
    try:
        header = json.loads(data[8:8 + header_bytes], object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise fail(f"its header is not valid JSON: {str(e)[:200]}") from e
    if not isinstance(header, dict):
        raise fail(f"its header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop(_METADATA, None)
    if metadata is not None and not (
            isinstance(metadata, dict)
            and all(isinstance(v, str) for v in metadata.values())):
        raise fail(f"its {_METADATA} must map names to strings")
    if len(header) > limits.max_tensors:
        raise too_many_tensors(name, f"{len(header)} tensors", limits)
    for key, entry in header.items():
        _check_entry(key, entry, len(data) - 8 - header_bytes, fail)
