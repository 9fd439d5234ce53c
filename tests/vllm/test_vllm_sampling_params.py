"""Every sampling parameter of ours reaches vLLM: the fields vLLM takes under the same name go
through without being listed one by one, so a new field must either exist in vLLM or be
translated, and this test says which."""

from __future__ import annotations

from dataclasses import fields, replace

from server.engine.interface import SamplingParams
from server.engine.vllm.prompts import _TRANSLATED, sampling_params

# A value of each field that is not its default, so a dropped field shows.
CHANGED = {
    "max_new_tokens": 7, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 11,
    "stop": ("x",), "ignore_eos": True, "presence_penalty": 0.5, "frequency_penalty": 0.25,
    "repetition_penalty": 1.2, "logprobs": 3, "prompt_logprobs": 2, "min_tokens": 2,
    "stop_token_ids": (4, 9), "include_stop_str_in_output": True,
    "skip_special_tokens": False,
}


def test_every_field_has_a_changed_value_here() -> None:
    assert {f.name for f in fields(SamplingParams)} == set(CHANGED)


def test_fields_reach_vllm_with_their_values() -> None:
    ours = replace(SamplingParams(), **CHANGED)
    theirs = sampling_params(ours, seed=ours.seed)
    for f in fields(ours):
        if f.name not in _TRANSLATED:
            assert getattr(theirs, f.name) == getattr(ours, f.name), f.name
    assert theirs.max_tokens == 7
    assert theirs.seed == 11
    assert list(theirs.stop_token_ids) == [4, 9]
    # Text is the frontend's: vLLM returns ids and neither stops on strings nor detokenizes.
    assert not theirs.stop
    assert theirs.detokenize is False
