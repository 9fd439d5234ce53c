"""`.bin` files whose tensors torch rebuilds into something unusable: meta, overlapping views,
sparse, quantized, shared storage. Each is a 400 naming the file and the tensor; what passes
owns dense data of exactly its shape's size."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch

from adapters_store import (
    Limits,
    NonFiniteValuesError,
    ShapeMismatchError,
    TooManyTensorsError,
    WeightsFormatError,
    parse_files,
)
from tests.adapters_store.conftest import spec_for
from tests.adapters_store.helpers import config_bytes, tensors_of, zip_of_empty_entries

BIN = "adapter_model.bin"
GPT2 = spec_for("gpt2")  # token_dim 48; the prompt-tuning adapter has 8 rows
DEFAULT = Limits()


def torch_save(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


@pytest.fixture
def pt(peft_adapter):
    return peft_adapter("gpt2", "prompt_tuning")


@pytest.fixture
def table(pt):
    return tensors_of(pt)["prompt_embeddings"]  # [8, 48]


def _parse(pt, data: bytes, limits: Limits = DEFAULT):
    return parse_files(config=config_bytes(pt), weights=data, weights_name=BIN, spec=GPT2,
                       limits=limits)


def test_a_meta_tensor_is_refused_naming_file_and_tensor(pt):
    data = torch_save({"prompt_embeddings": torch.empty(8, 48, device="meta")})
    with pytest.raises(WeightsFormatError,
                       match=rf"{BIN}: tensor 'prompt_embeddings' is on the meta device"):
        _parse(pt, data)


@pytest.mark.parametrize("make", [
    pytest.param(lambda: torch.zeros(1, 48).expand(8, 48), id="expand"),
    pytest.param(lambda: torch.zeros(48).as_strided((8, 48), (0, 1)), id="stride-0"),
    pytest.param(lambda: torch.arange(60.0).as_strided((8, 48), (1, 1)), id="overlapping"),
    pytest.param(lambda: torch.zeros(1, 48).expand(1_000_000, 48), id="huge-expand"),
])
def test_overlapping_views_are_refused_before_any_copy(make, pt):
    tensor = make()
    data = torch_save({"prompt_embeddings": tensor})
    assert len(data) < 4096  # whatever the shape claims, only the storage is on disk
    with pytest.raises(WeightsFormatError,
                       match=rf"{BIN}: tensor 'prompt_embeddings' has shape .* overlap"):
        _parse(pt, data)


@pytest.mark.parametrize("make", [
    pytest.param(lambda t: t.to_sparse(), id="sparse"),
    pytest.param(lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8), id="quantized"),
    pytest.param(lambda t: t.to(torch.float8_e4m3fn), id="float8"),
    pytest.param(lambda t: t.to(torch.complex64), id="complex"),
    pytest.param(lambda t: t.to(torch.int32), id="int32"),
])
def test_non_dense_or_non_float_tensors_are_refused(make, pt, table):
    data = torch_save({"prompt_embeddings": make(table)})
    with pytest.raises(WeightsFormatError,
                       match=rf"{BIN}: tensor 'prompt_embeddings' is .*dense floating-point"):
        _parse(pt, data)


def test_a_non_finite_value_in_a_bin_is_refused(pt, table):
    bad = table.clone()
    bad[3, 7] = float("inf")
    with pytest.raises(NonFiniteValuesError, match=rf"{BIN}: .*NaN or infinite"):
        _parse(pt, torch_save({"prompt_embeddings": bad}))


def test_many_views_of_one_storage_are_refused(pt, table):
    """Stored once, each view would be copied once: a small file, a large allocation."""
    data = torch_save({"prompt_embeddings": table, **{f"alias.{i}": table for i in range(40)}})
    with pytest.raises(WeightsFormatError, match=rf"{BIN}: its tensors hold .* share storage"):
        _parse(pt, data)


@pytest.mark.parametrize("make", [
    pytest.param(lambda t: t.t().contiguous().t(), id="transposed"),
    pytest.param(lambda t: torch.cat([torch.zeros(5, 48), t, torch.zeros(3, 48)])[5:13],
                 id="slice-of-a-larger-storage"),
    pytest.param(lambda t: torch.nn.Parameter(t.clone()), id="parameter"),
    pytest.param(lambda t: t.to(torch.bfloat16), id="bfloat16"),
])
def test_dense_views_are_materialised_exactly(make, pt, table):
    source = make(table)
    parsed = _parse(pt, torch_save({"prompt_embeddings": source}))
    assert parsed.embeddings.is_contiguous() and parsed.embeddings.storage_offset() == 0
    assert parsed.embeddings.untyped_storage().nbytes() == 8 * 48 * 4
    torch.testing.assert_close(parsed.embeddings, source.detach().float(), rtol=0, atol=0)


def test_the_legacy_pickle_format_is_refused_before_unpickling(pt, table):
    data = torch_save({"prompt_embeddings": table}, _use_new_zipfile_serialization=False)
    with pytest.raises(WeightsFormatError, match=rf"{BIN} could not be loaded as plain "
                                                 r"tensors.*not the zip archive"):
        _parse(pt, data)


def test_more_tensors_than_the_limit_are_refused(pt, table):
    data = torch_save({"prompt_embeddings": table,
                       **{f"extra.{i}": torch.zeros(1) for i in range(70)}})
    with pytest.raises(TooManyTensorsError, match=rf"{BIN} holds .*at most 64 tensors"):
        _parse(pt, data)


def test_a_huge_pickle_index_is_refused_before_unpickling(pt, table):
    data = torch_save({"prompt_embeddings": table, "x" * 200_000: torch.zeros(1)})
    with pytest.raises(TooManyTensorsError, match=r"tensor index \(data.pkl\)"):
        _parse(pt, data)


def test_a_zip_of_200k_records_is_refused_from_its_end_records(pt, monkeypatch):
    """Neither zipfile nor torch.load sees the file: both would parse all 200k records."""
    data = zip_of_empty_entries(200_000)
    readers: list[str] = []

    class ZipFile(zipfile.ZipFile):
        def __init__(self, *args, **kwargs) -> None:
            readers.append("zipfile")
            super().__init__(*args, **kwargs)

    def load(*args, **kwargs):
        readers.append("torch.load")
        return real_load(*args, **kwargs)

    real_load = torch.load
    monkeypatch.setattr(zipfile, "ZipFile", ZipFile)
    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(TooManyTensorsError, match=rf"{BIN} holds a zip directory of 200000"):
        _parse(pt, data)
    assert readers == []


def test_a_zip_whose_end_record_understates_its_directory_is_refused(pt):
    data = zip_of_empty_entries(50_000, claimed=3)
    with pytest.raises(TooManyTensorsError, match="zip directory of 3 records"):
        _parse(pt, data)


def test_a_truncated_bin_is_a_400(pt, table):
    data = torch_save({"prompt_embeddings": table})
    for cut in (len(data) // 2, len(data) - 10, 30):
        with pytest.raises(WeightsFormatError, match=BIN):
            _parse(pt, data[:cut])


def test_a_bin_with_the_wrong_shape_names_the_file(pt, table):
    with pytest.raises(ShapeMismatchError, match=rf"{BIN}: prompt_embeddings has 7 rows"):
        _parse(pt, torch_save({"prompt_embeddings": table[:7].clone()}))
