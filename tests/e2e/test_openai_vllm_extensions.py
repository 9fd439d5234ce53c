"""vLLM's request extensions on every engine, through HTTP: the built-in one in process and
with --engine-process (the parameters cross the pipe), and vLLM where installed: ignore_eos,
min_tokens, stop_token_ids, include_stop_str_in_output, skip_special_tokens,
add_special_tokens, stream_options.continuous_usage_stats, return_tokens_as_token_ids and
chat logprobs' bytes; and usage's cached_tokens.
The checks are tests/e2e/vllm_extensions.py's."""

from __future__ import annotations

import httpx
import pytest

from server.engine.byte_tokenizer import BYTE_VOCAB_SIZE
from tests.e2e import vllm_extensions as checks
from tests.e2e.conftest import ENGINE_MODES, upload
from tests.e2e.server_process import ServerProcess

ADAPTER = "ext-pt"


@pytest.fixture(scope="module")
def second_eos(chat_model_dir, adapter_dirs, tmp_path_factory):
    return checks.with_second_eos(chat_model_dir, adapter_dirs["prompt_tuning"][0],
                                  tmp_path_factory.mktemp("eos-model") / "model")


@pytest.fixture(scope="module")
def ref(second_eos, adapter_dirs) -> checks.Definition:
    return checks.Definition(second_eos[0], adapter_dirs["prompt_tuning"][0])


@pytest.fixture(scope="module", **ENGINE_MODES)
def http(request, second_eos, adapter_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("oai-ext")
    with ServerProcess(second_eos[0], root / "store", root / "server.log",
                       *request.param) as proc, \
            httpx.Client(base_url=proc.url, timeout=60) as client:
        assert upload(client, ADAPTER, adapter_dirs["prompt_tuning"][0]).status_code == 201
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


def test_prefix_cache_hits_in_usage(http):
    checks.check_cached_tokens(http, ADAPTER)


def test_logprobs_by_token_id_and_chat_bytes(http, ref):
    checks.check_logprobs_by_token_id_and_bytes(http, ADAPTER, ref.byte_of)


def test_bad_extension_values_are_400_naming_them(http):
    checks.check_bad_extensions_are_named(http, ADAPTER, BYTE_VOCAB_SIZE)
