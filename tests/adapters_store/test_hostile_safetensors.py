"""Hand-crafted safetensors headers: each is refused as a 400 naming the file and the reason,
and a header too big to be an adapter's is refused before the safetensors library parses it."""

from __future__ import annotations

import json
import struct

import pytest
from safetensors.torch import save

from adapters_store import Limits, TooManyTensorsError, WeightsFormatError, parse_files
from adapters_store import weights as weights_module
from tests.adapters_store.conftest import spec_for
from tests.adapters_store.helpers import config_bytes, tensors_of

SAFE = "adapter_model.safetensors"
GPT2 = spec_for("gpt2")  # token_dim 48; the prompt-tuning adapter has 8 rows
DEFAULT = Limits()


def safetensors_bytes(header: object, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A file with exactly this header (any JSON) and data; `length` overrides the prefix."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _entry(dtype: str = "F32", shape: object = (8, 48), offsets: object = None) -> dict:
    if offsets is None:
        offsets = [0, 8 * 48 * 4]
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": offsets}


@pytest.fixture
def pt(peft_adapter):
    return peft_adapter("gpt2", "prompt_tuning")


def _parse(pt, data: bytes, limits: Limits = DEFAULT):
    return parse_files(config=config_bytes(pt), weights=data, weights_name=SAFE, spec=GPT2,
                       limits=limits)


# Bytes for 8 x 48 elements: the sizes the library expects, so only the dtype is wrong.
@pytest.mark.parametrize(("dtype", "nbytes"), [
    ("XX9", 384), ("F4", 192), ("F6_E2M3", 288), ("F8_E4M3", 384), ("F8_E5M2", 384),
    ("BOOL", 384), ("I64", 3072), ("U16", 768), ("C64", 3072),
])
def test_a_dtype_other_than_float16_to_64_is_refused_naming_file_and_tensor(dtype, nbytes, pt):
    data = safetensors_bytes({"prompt_embeddings": _entry(dtype, (8, 48), [0, nbytes])},
                             bytes(nbytes))
    with pytest.raises(WeightsFormatError,
                       match=rf"{SAFE} .*'prompt_embeddings' has dtype '{dtype}'.*F16, BF16"):
        _parse(pt, data)


@pytest.mark.parametrize(("header", "reason"), [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00", "not valid JSON"),
    (b"[" * 50_000 + b"]" * 50_000, "not valid JSON"),
    ([1, 2], "a JSON list"),
    (b'{"prompt_embeddings": 1, "prompt_embeddings": 2}', "appears twice"),
    ({"__metadata__": {"format": 1}}, "__metadata__ must map names to strings"),
    ({"__metadata__": "pt"}, "__metadata__ must map names to strings"),
    ({"prompt_embeddings": [1]}, "not a tensor description"),
    ({"prompt_embeddings": _entry(shape=(-8, 48))}, "has shape"),
    ({"prompt_embeddings": _entry(shape=[8.0, 48])}, "has shape"),
    ({"prompt_embeddings": _entry(shape=[True, 48])}, "has shape"),
    ({"prompt_embeddings": _entry(shape="8x48")}, "has shape"),
    ({"prompt_embeddings": _entry(shape=(2**62, 2**62))}, "needs .* bytes"),
    ({"prompt_embeddings": _entry(offsets=[0, 10**30])}, "within the file"),
    ({"prompt_embeddings": _entry(offsets=[100, 0])}, "within the file"),
    ({"prompt_embeddings": _entry(offsets=[0])}, "data_offsets"),
    ({"prompt_embeddings": _entry(offsets=[0, 16])}, "needs 1536 bytes .* span 16"),
    ({"prompt_embeddings": {"shape": [8, 48], "data_offsets": [0, 1536]}}, "dtype 'None'"),
])
def test_a_malformed_header_is_refused_with_the_reason(header, reason, pt):
    data = safetensors_bytes(header, bytes(8 * 48 * 4))
    with pytest.raises(WeightsFormatError, match=rf"{SAFE} is not a valid safetensors file: "
                                                 rf".*{reason}"):
        _parse(pt, data)


@pytest.mark.parametrize("length", [2**64 - 1, 2**63, 10**9])
def test_a_header_length_beyond_the_file_is_refused(length, pt):
    with pytest.raises(WeightsFormatError, match="its header claims"):
        _parse(pt, safetensors_bytes({}, length=length))


@pytest.mark.parametrize("data", [b"", b"\x00" * 7])
def test_a_file_shorter_than_the_length_prefix_is_refused(data, pt):
    with pytest.raises(WeightsFormatError, match="too short for the 8-byte header length"):
        _parse(pt, data)


def test_offsets_that_leave_gaps_are_refused_by_the_library_as_a_400(pt):
    """Overlap and gaps pass the per-entry check; the library's own refusal is wrapped."""
    good = 8 * 48 * 4
    header = {"prompt_embeddings": _entry(offsets=[0, good]),
              "other": _entry(shape=(1,), offsets=[good + 4, good + 8])}
    with pytest.raises(WeightsFormatError, match=f"{SAFE} is not a valid safetensors file"):
        _parse(pt, safetensors_bytes(header, bytes(good + 8)))


def test_a_header_of_400k_tiny_entries_is_refused_before_it_is_parsed(pt, monkeypatch):
    entry = b'{"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}'
    entries = b"{" + b",".join(b'"t%d": %s' % (i, entry) for i in range(400_000)) + b"}"
    data = safetensors_bytes(entries)
    assert len(data) < 40 * 1024 * 1024
    parsed: list[int] = []  # sizes of the JSON documents parsed, and -1 for the library

    def loads(text, *args, **kwargs):
        parsed.append(len(text))
        return real_loads(text, *args, **kwargs)

    def load_safetensors(*args, **kwargs):
        parsed.append(-1)
        return real_load(*args, **kwargs)

    real_loads, real_load = json.loads, weights_module.load_safetensors
    monkeypatch.setattr(json, "loads", loads)
    monkeypatch.setattr(weights_module, "load_safetensors", load_safetensors)
    with pytest.raises(WeightsFormatError, match="its header claims"):
        _parse(pt, data)
    assert -1 not in parsed  # the library never saw the file
    assert all(size < 4096 for size in parsed)  # the config at most: never the header


def test_more_tensors_than_the_limit_are_refused_from_the_header(pt):
    table = tensors_of(pt)["prompt_embeddings"]
    tensors = {"prompt_embeddings": table, **{f"extra.{i}": table[:1].clone() for i in range(64)}}
    data = save(tensors)
    with pytest.raises(TooManyTensorsError, match=f"{SAFE} holds 65 tensors.*at most 64"):
        _parse(pt, data)
    parsed = _parse(pt, data, Limits(max_tensors=65))
    assert parsed.embeddings.shape == (8, 48)


def test_the_metadata_save_pretrained_writes_is_accepted(pt):
    data = (pt / SAFE).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    assert b"__metadata__" in data[8:8 + length]
    assert _parse(pt, data).embeddings.shape == (8, 48)
