"""Building the vLLM core from the server's settings: the tokenizer and model facts the
frontend needs (no model weights are loaded in this process), vLLM's engine arguments, and
the engine itself.

What maps where: --max-batch-size is vLLM's max_num_seqs and the admission bound,
--max-batch-tokens its max_num_batched_tokens, --max-model-len its max_model_len,
--prefix-cache its prefix caching, --kv-cache-memory a byte size its kv_cache_memory_bytes
(on a GPU, auto leaves the KV cache to --gpu-memory-utilization; on a CPU, auto is 2 GiB),
and the parallel sizes, --gpu-memory-utilization and --enforce-eager pass through.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from adapters_store.records import TaskType
from adapters_store.store import AdapterStore
from server.config import Device, Settings, parse_kv_cache_memory
from server.engine.fairness import contended_rows
from server.engine.interface import ModelInfo
from server.engine.model_loader import LoadedModel, max_context_of, resolve_dtype
from server.engine.model_source import ModelLoadError, load_tokenizer, model_source
from server.engine.observer import EngineObserver
from server.engine.vllm.admission import Admission
from server.engine.vllm.core import VllmCore
from server.engine.vllm.soft_prompts import SoftPrompts

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 2 << 30  # auto on a CPU: vLLM's own default would take most of the RAM


def build_vllm_core(settings: Settings, store: AdapterStore, *, observer: EngineObserver,
                    weight_of: Any) -> tuple[LoadedModel, VllmCore]:
    from transformers import AutoConfig

    source = model_source(settings)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"--model {settings.model!r} could not be loaded: "
                             f"{type(e).__name__}: {e}") from e
    tokenizer = load_tokenizer(source, name=settings.model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cuda = settings.device is not Device.CPU and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = resolve_dtype(settings.dtype, device)
    # vLLM reports usage to its authors unless told not to; a server does not phone home
    # unless its operator says so (set VLLM_NO_USAGE_STATS=0 to allow it).
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    if not cuda:
        # One NUMA node and few cores (a laptop, a CI machine): vLLM's default binding would
        # reserve a core; let its threads run where the OS puts them unless told otherwise.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    model_context = max_context_of(text, tokenizer)
    started = time.monotonic()
    llm = _start(settings, str(source), dtype=dtype, cuda=cuda,
                 context=settings.max_model_len or model_context)
    if not cuda:
        # This process only builds prompts (a copy of the adapter's rows into one tensor);
        # a pool of one thread per core here fights vLLM's workers for the same cores, and
        # a build then waits for a descheduled thread: 6 ms on average instead of 0.6, and
        # warm TTFT 1.6x the bare model's instead of 1.1x on 2 cores. vLLM's processes are
        # started by now and keep their own thread counts.
        torch.set_num_threads(1)
        log.info("vllm engine on the CPU: this process builds prompts on 1 torch thread; "
                 "vLLM's workers keep their own")
    vocab = int(text.vocab_size)
    max_len = int(getattr(getattr(llm, "model_config", None), "max_model_len", 0) or
                  min(model_context, settings.max_model_len or 1 << 30))
    info = ModelInfo(
        name=settings.model,
        architecture=(getattr(config, "architectures", None) or ["?"])[0],
        is_seq2seq=False, hidden_size=int(text.hidden_size), device=str(device),
        dtype=str(dtype).removeprefix("torch."), max_context=max_len, vocab_size=vocab)
    log.info("vllm engine started in %.1f s: %s (%s) in %s, max context %s, tensor %s x "
             "pipeline %s x data %s", time.monotonic() - started, settings.model,
             info.architecture, info.dtype, max_len, settings.tensor_parallel_size,
             settings.pipeline_parallel_size, settings.data_parallel_size)
    cap = contended_rows(settings.contended_tenant_rows, settings.max_batch_size)
    if cap is not None:
        log.info("admission: while another tenant has work, one has at most %d request(s) "
                 "inside vLLM (--contended-tenant-rows)", cap)
    loaded = LoadedModel(model=None, tokenizer=tokenizer, info=info,
                         task_type=TaskType.CAUSAL_LM, device=device, dtype=dtype,
                         vocab_size=vocab)
    core = VllmCore(
        llm, prompts=SoftPrompts(store, capacity_bytes=settings.prompt_cache_bytes,
                                 observer=observer),
        admission=Admission(max_in_flight=settings.max_batch_size,
                            max_queue=settings.max_queue, weight_of=weight_of,
                            contended_rows=cap),
        observer=observer, vocab_size=vocab, prompt_capacity=settings.max_virtual_tokens)
    return loaded, core


def _start(settings: Settings, source: str, *, dtype: torch.dtype, cuda: bool,
           context: int) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    world = settings.tensor_parallel_size * settings.pipeline_parallel_size
    # More workers than this node has GPUs: the rest are on other nodes, which vLLM reaches
    # through a Ray cluster only (docs/scaling.md).
    backend = "ray" if cuda and world > torch.cuda.device_count() else None
    kv = parse_kv_cache_memory(settings.kv_cache_memory)
    kv_bytes = kv if isinstance(kv, int) else (None if cuda else CPU_KV_CACHE_BYTES)
    # On a CPU, whole prefills only. A prompt prefilled in chunks draws a token at each chunk
    # that is thrown away, and vLLM then winds a seeded request's generator back, which a CPU
    # generator cannot do: the engine core dies, failing every tenant's request. Without
    # chunking the step budget must hold the longest prompt.
    budget = max(settings.max_batch_tokens, (settings.max_model_len or 0) if cuda else context)
    args = AsyncEngineArgs(
        model=source, tokenizer=source, served_model_name=settings.model,
        dtype=str(dtype).removeprefix("torch."), enable_prompt_embeds=True,
        enable_prefix_caching=settings.prefix_cache,
        max_model_len=settings.max_model_len or None, max_num_seqs=settings.max_batch_size,
        max_num_batched_tokens=budget, enable_chunked_prefill=cuda,
        tensor_parallel_size=settings.tensor_parallel_size,
        pipeline_parallel_size=settings.pipeline_parallel_size,
        data_parallel_size=settings.data_parallel_size,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        kv_cache_memory_bytes=kv_bytes, enforce_eager=settings.enforce_eager,
        distributed_executor_backend=backend,
        seed=0, disable_log_stats=False)
    try:
        return AsyncLLM.from_engine_args(args)
    except Exception as e:  # noqa: BLE001 - any failure to start names the way out
        raise ModelLoadError(f"--engine vllm could not start --model {settings.model!r}: "
                             f"{type(e).__name__}: {e}; --engine builtin serves every model "
                             "this server loads") from e
