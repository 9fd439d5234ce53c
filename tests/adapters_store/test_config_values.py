"""adapter_config.json with values of the wrong kind or size: each a 400 (or 413 for a limit)
naming the file, with the offending value shown briefly however large it is."""

from __future__ import annotations

import json

import pytest
import torch

from adapters_store import (
    ConfigInvalidError,
    FileTooLargeError,
    InvalidAdapterError,
    TokenDimMismatchError,
    TooManyVirtualTokensError,
    UnsupportedAdapterTypeError,
    parse_files,
)
from tests.adapters_store.conftest import spec_for
from tests.adapters_store.helpers import weights_bytes

SAFE = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
GPT2 = spec_for("gpt2")  # token_dim 48, CAUSAL_LM
BASE = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 8}


@pytest.fixture(scope="module")
def weights() -> bytes:
    return weights_bytes({"prompt_embeddings": torch.zeros(8, 48)})


def _parse(config: bytes, weights: bytes):
    return parse_files(config=config, weights=weights, weights_name=SAFE, spec=GPT2)


def _with(**changes) -> bytes:
    return json.dumps({**BASE, **changes}).encode()


def _raw(field: str, literal: str) -> bytes:
    """BASE with one field's value written as raw JSON text (e.g. 1e999, NaN, 5000 digits)."""
    body = json.dumps({k: v for k, v in BASE.items() if k != field})
    return (body[:-1] + f', "{field}": {literal}}}').encode()


@pytest.mark.parametrize(("config", "error", "reason"), [
    (_raw("num_virtual_tokens", "1e999"), ConfigInvalidError, "positive integer, got inf"),
    (_raw("num_virtual_tokens", "NaN"), ConfigInvalidError, "positive integer, got nan"),
    (_raw("num_virtual_tokens", "-Infinity"), ConfigInvalidError, "positive integer"),
    (_raw("num_virtual_tokens", "9" * 5000), ConfigInvalidError, "not valid JSON"),
    (_with(num_virtual_tokens=10**30), TooManyVirtualTokensError, "above this server's limit"),
    (_with(num_virtual_tokens=-3), ConfigInvalidError, "positive integer, got -3"),
    (_with(num_virtual_tokens=0), ConfigInvalidError, "positive integer, got 0"),
    (_with(num_virtual_tokens=True), ConfigInvalidError, "positive integer, got True"),
    (_with(num_virtual_tokens=8.0), ConfigInvalidError, "positive integer, got 8.0"),
    (_with(num_virtual_tokens="8"), ConfigInvalidError, "positive integer, got '8'"),
    (_with(num_virtual_tokens=[8]), ConfigInvalidError, "positive integer, got \\[8\\]"),
    (_with(num_virtual_tokens={"n": 8}), ConfigInvalidError, "positive integer"),
    (_with(num_transformer_submodules=10**30), ConfigInvalidError, "not valid for task_type"),
    (_with(num_transformer_submodules=True), ConfigInvalidError, "positive integer"),
    (_with(peft_type=5), UnsupportedAdapterTypeError, "peft_type=5"),
    (_with(peft_type=["PROMPT_TUNING"]), UnsupportedAdapterTypeError, "peft_type=\\["),
    (_with(peft_type={"a": 1}), UnsupportedAdapterTypeError, "peft_type={"),
    (_with(peft_type=True), UnsupportedAdapterTypeError, "peft_type=True"),
    (_with(peft_type=None), ConfigInvalidError, "has no peft_type"),
    (_with(peft_type="prompt_tuning"), UnsupportedAdapterTypeError, "'prompt_tuning'"),
    (_with(task_type=7), UnsupportedAdapterTypeError, "task_type=7"),
    (_with(task_type=["CAUSAL_LM"]), UnsupportedAdapterTypeError, "task_type=\\["),
    (_with(token_dim=47), TokenDimMismatchError, "token_dim 47"),
    (_with(token_dim=10**30), TokenDimMismatchError, "token_dim 1000"),
    (_with(token_dim=True), ConfigInvalidError, "positive integer, got True"),
    (_with(token_dim=48.0), ConfigInvalidError, "positive integer, got 48.0"),
    (b"[" * 30_000 + b"]" * 30_000, ConfigInvalidError, "not valid JSON"),
    (b'{"a": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", ConfigInvalidError, "not valid JSON"),
    (b"\xff\xfe\x00{", ConfigInvalidError, "not valid JSON"),
    (b"", ConfigInvalidError, "not valid JSON"),
    (b"null", ConfigInvalidError, "must hold a JSON object"),
])
def test_a_config_value_of_the_wrong_kind_is_refused_naming_the_file(config, error, reason,
                                                                     weights):
    with pytest.raises(error, match=reason) as err:
        _parse(config, weights)
    assert CONFIG in str(err.value)
    assert isinstance(err.value, InvalidAdapterError)


@pytest.mark.parametrize("field", ["peft_type", "task_type", "num_virtual_tokens"])
def test_a_long_value_is_shown_briefly(field, weights):
    with pytest.raises(InvalidAdapterError) as err:
        _parse(_with(**{field: "x" * 60_000}), weights)
    assert len(str(err.value)) < 400


def test_a_config_above_its_size_limit_is_413_before_it_is_parsed(weights):
    """The config is stored verbatim (and counted against the tenant's storage): PEFT writes
    about 1 KiB, so 64 KiB is the default bound."""
    with pytest.raises(FileTooLargeError, match="65536") as err:
        _parse(_with(peft_type="x" * 70_000), weights)
    assert CONFIG in str(err.value)


def test_a_4000_digit_integer_is_shown_briefly(weights):
    with pytest.raises(TooManyVirtualTokensError) as err:
        _parse(_with(num_virtual_tokens=10**4000), weights)
    assert len(str(err.value)) < 400
