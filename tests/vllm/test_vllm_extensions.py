"""vLLM's request extensions on the vllm engine, through HTTP: the same checks as the built-in
engine's (tests/e2e/vllm_extensions.py), so both engines answer them alike: ignore_eos (vLLM's
own: the end-of-sequence token is drawable), min_tokens and stop_token_ids (vLLM's own),
include_stop_str_in_output, skip_special_tokens, add_special_tokens,
stream_options.continuous_usage_stats, return_tokens_as_token_ids and chat logprobs' bytes."""

from __future__ import annotations

import httpx
import pytest

from server.engine.byte_tokenizer import BYTE_VOCAB_SIZE
from tests.e2e import vllm_extensions as checks
from tests.factories import make_adapter, with_chat_template
from tests.vllm.conftest import auth, upload, vllm_server

ADAPTER = "ext-pt"


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    return make_adapter(model_dir, tmp_path_factory.mktemp("ext-adapter") / "pt",
                        "prompt_tuning", num_virtual_tokens=4, seed=10)


@pytest.fixture(scope="module")
def second_eos(model_dir, adapter_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ext-model")
    chat = with_chat_template(model_dir, root / "chat")
    return checks.with_second_eos(chat, adapter_dir, root / "model")


@pytest.fixture(scope="module")
def ref(second_eos, adapter_dir) -> checks.Definition:
    return checks.Definition(second_eos[0], adapter_dir)


@pytest.fixture(scope="module")
def http(second_eos, adapter_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-ext")
    with vllm_server(second_eos[0], root) as proc, \
            httpx.Client(base_url=proc.url, timeout=120, headers=auth("tenant-a")) as client:
        assert upload(client, "tenant-a", ADAPTER, adapter_dir).status_code == 201
        yield client


def test_ignore_eos_is_the_plain_greedy_continuation(http, ref, second_eos):
    checks.check_ignore_eos_is_the_plain_greedy_continuation(http, ADAPTER, ref,
                                                             *second_eos[1:])


def test_min_tokens_masks_the_end_ids_until_then(http, ref, second_eos):
    checks.check_min_tokens_masks_the_end_ids_until_then(http, ADAPTER, ref, *second_eos[1:])


def test_stop_token_ids_and_include_stop_str_in_output(http, ref):
    checks.check_stop_token_ids_and_include_stop_str(http, ADAPTER, ref)


def test_stop_strings_wait_for_min_tokens(http, ref):
    checks.check_stop_strings_wait_for_min_tokens(http, ADAPTER, ref)


def test_skip_and_add_special_tokens(http, ref, second_eos):
    checks.check_special_tokens_options(http, ADAPTER, ref, *second_eos[1:])


def test_continuous_usage_stats(http):
    checks.check_continuous_usage(http, ADAPTER)


def test_logprobs_by_token_id_and_chat_bytes(http, ref):
    checks.check_logprobs_by_token_id_and_bytes(http, ADAPTER, ref.byte_of)


def test_bad_extension_values_are_400_naming_them(http):
    checks.check_bad_extensions_are_named(http, ADAPTER, BYTE_VOCAB_SIZE)
