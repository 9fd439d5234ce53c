"""`.bin` goes through torch's weights-only loader and nothing else; safetensors must be valid."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch

from adapters_store import WeightsFormatError, parse_directory, parse_files
from tests.adapters_store.conftest import spec_for
from tests.adapters_store.helpers import config_bytes, tensors_of
from tests.factories import make_peft_model

GPT2 = spec_for("gpt2")


class _Pwn:
    """Unpickling this runs a shell command that creates a file."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _torch_save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _parse_bin(adapter_dir, data: bytes):
    return parse_files(config=config_bytes(adapter_dir), weights=data,
                       weights_name="adapter_model.bin", spec=GPT2)


@pytest.mark.parametrize("kind", ["prompt_tuning", "p_tuning_lstm"])
def test_bin_written_by_peft_round_trips(kind, tiny_model_dirs, peft_adapter, tmp_path):
    make_peft_model(tiny_model_dirs["gpt2"], kind).save_pretrained(tmp_path,
                                                                   safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()

    parsed = parse_directory(tmp_path, spec=GPT2)

    expected = tensors_of(peft_adapter("gpt2", kind))["prompt_embeddings"]
    torch.testing.assert_close(parsed.embeddings, expected, rtol=0, atol=0)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_rejected_and_never_runs(writer, peft_adapter, tmp_path):
    target = tmp_path / "pwned"
    payload = {"prompt_embeddings": _Pwn(str(target))}
    data = _torch_save(payload) if writer == "torch.save" else pickle.dumps(payload)
    pickle.loads(pickle.dumps(_Pwn(str(tmp_path / "control"))))
    assert (tmp_path / "control").exists()  # the payload really is live

    with pytest.raises(WeightsFormatError, match="could not be loaded as plain tensors"):
        _parse_bin(peft_adapter("gpt2", "prompt_tuning"), data)

    assert not target.exists()


def test_bin_holding_something_other_than_a_dict_is_rejected(peft_adapter):
    with pytest.raises(WeightsFormatError, match="holds a list, expected a state dict"):
        _parse_bin(peft_adapter("gpt2", "prompt_tuning"), _torch_save([torch.zeros(8, 48)]))


def test_bin_dict_with_non_tensor_values_is_rejected(peft_adapter):
    data = _torch_save({"prompt_embeddings": [1.0, 2.0]})
    with pytest.raises(WeightsFormatError, match="'prompt_embeddings' is a list"):
        _parse_bin(peft_adapter("gpt2", "prompt_tuning"), data)


def test_corrupt_bin_is_rejected(peft_adapter):
    with pytest.raises(WeightsFormatError, match="plain tensors"):
        _parse_bin(peft_adapter("gpt2", "prompt_tuning"), b"\x80\x04garbage")


def test_corrupt_safetensors_is_rejected(peft_adapter):
    pt = peft_adapter("gpt2", "prompt_tuning")
    data = (pt / "adapter_model.safetensors").read_bytes()
    with pytest.raises(WeightsFormatError, match="not a valid safetensors file"):
        parse_files(config=config_bytes(pt), weights=data[: len(data) // 2],
                    weights_name="adapter_model.safetensors", spec=GPT2)


def test_unknown_weights_extension_is_rejected(peft_adapter):
    pt = peft_adapter("gpt2", "prompt_tuning")
    with pytest.raises(WeightsFormatError, match="unknown extension"):
        parse_files(config=config_bytes(pt), weights=b"x", weights_name="model.pt", spec=GPT2)
