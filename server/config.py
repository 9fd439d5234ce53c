"""Settings: every option is a CLI flag of `softprompt-server serve` and a SOFTPROMPT_* variable."""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)")


def parse_kv_cache_memory(value: str) -> float | int | None:
    """None for auto, a float in (0, 1] for a fraction, an int for bytes; ValueError naming
    the flag otherwise."""
    text = value.strip().lower()
    if text == "auto":
        return None
    match = _SIZE.fullmatch(text)
    if match is None or match.group(2) not in _UNITS:
        raise ValueError(f"--kv-cache-memory {value!r}: give auto, a fraction such as 0.5, or "
                         "a byte size such as 8GiB")
    number, unit = float(match.group(1)), match.group(2)
    if "." in match.group(1) and not unit:
        if not 0 < number <= 1:
            raise ValueError(f"--kv-cache-memory {value!r}: a fraction must be in (0, 1]")
        return number
    if number < 1:
        raise ValueError(f"--kv-cache-memory {value!r}: a byte size must be positive")
    return int(number * _UNITS[unit])


class Device(StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class DType(StrEnum):
    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Batching(StrEnum):
    CORE = "core"
    STATIC = "static"


class EngineKind(StrEnum):
    AUTO = "auto"
    BUILTIN = "builtin"
    VLLM = "vllm"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class Settings(BaseSettings):
    """Built once by the CLI and passed down; nothing else reads the environment."""

    model_config = SettingsConfigDict(env_prefix="SOFTPROMPT_", extra="forbid")

    model: str = Field("builtin:tiny", description="Hugging Face model id or local path; "
                       "builtin:tiny is a small random model that needs no download (its text "
                       "is not meaningful).")
    served_model_name: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="The base model's name(s) in the OpenAI routes' "
        "`model` and /v1/models, instead of --model (repeatable, or comma-separated in the "
        "variable); a name shadows an adapter with the same id.")
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind.")
    store: str = Field("./adapters", description="Adapter store: a local directory, or "
                       "s3://bucket/prefix shared by replicas (endpoint and credentials from "
                       "the AWS_* variables).")
    device: Device = Field(Device.AUTO, description="auto picks cuda when available.")
    dtype: DType = Field(DType.AUTO, description="auto: bfloat16 on CUDA, float32 on CPU.")
    max_batch_size: int = Field(32, ge=1, description="Most requests in one batch.")
    max_wait_ms: float = Field(5.0, ge=0, description="Longest a request waits for batch mates "
                               "when the engine is idle.")
    batching: Batching = Field(Batching.CORE, description="core: the engine core: each step "
                               "is one forward over every running row's next token and "
                               "prefill chunks of joining rows, up to --max-batch-tokens; soft "
                               "prompts are token ids, each row has a fixed KV slot (models "
                               "whose attention goes through transformers' attention "
                               "interface: GPT-2, Llama, Qwen2, ...; seq2seq models and the "
                               "others, such as BLOOM, run static, and the log says so); "
                               "static: a batch runs until its longest request is done. "
                               "continuous is accepted as another name for core.")
    max_batch_tokens: int = Field(2048, ge=1, description="The most tokens one step of the "
                                  "engine core computes, decodes first (one per running "
                                  "row), then prefill chunks of joining rows: bounds how long "
                                  "joining prompts stall running streams.")
    kv_cache_memory: str = Field("auto", description="The engine core's KV cache budget: a "
                                 "fraction of the GPU memory free after the weights (0.5), or "
                                 "a byte size (8GiB; the only form on the CPU). It holds one "
                                 "slot of --max-model-len positions per --max-batch-size row; "
                                 "a smaller budget runs fewer rows at once (with "
                                 "--max-model-len unset, slots of a long context shrink "
                                 "first, to 2048 positions); what the slots "
                                 "leave holds the prefix cache. auto: every row and the whole "
                                 "prefix cache, within nine tenths of the free GPU memory.")
    cuda_graphs: bool = Field(True, description="On CUDA, capture the engine core's decode "
                              "steps as CUDA graphs at startup and replay them (a step is one "
                              "launch). --no-cuda-graphs runs every step eagerly: slower, for "
                              "telling a capture problem from another.")
    prefix_cache: bool = Field(True, description="Keep each adapter version's soft-prompt "
                               "keys and values once, in what the KV slots leave of "
                               "--kv-cache-memory, so a request of that adapter prefills only "
                               "its text (engine core only). Up to a prefix for every soft "
                               "prompt the prompt table holds (auto on the CPU: "
                               "--max-batch-size adapters of --max-virtual-tokens), evicted "
                               "least recently used.")
    max_model_len: int = Field(0, ge=0, description="The most tokens a request may use "
                               "(virtual, prompt and new); 0: the model's context, or less "
                               "where --kv-cache-memory cannot hold every row of it. With "
                               "the engine core each KV slot holds this many positions.")
    contended_tenant_rows: int = Field(0, ge=0, description="While another tenant has work "
                                       "(or had some within the last second), the most batch "
                                       "rows one tenant starts, times its weight; alone, a "
                                       "tenant may fill the batch. Keeps a flood from slowing "
                                       "other tenants' tokens where a step's cost grows with "
                                       "its rows (a GPU decode step mostly does not). 0 (the "
                                       "default) or --max-batch-size and more: no cap.")
    engine: EngineKind = Field(EngineKind.AUTO, description="Which engine runs the model: "
                               "builtin (exact, any device, T5 and BLOOM too), vllm (vLLM's "
                               "engine, for GPUs and models that need several; install the "
                               "vllm extra), or auto: vllm when it is installed, the device "
                               "is CUDA and vLLM serves the model, builtin otherwise. The "
                               "startup log says which and why.")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm engine: GPUs each layer is "
                                      "split across (tensor parallelism).")
    pipeline_parallel_size: int = Field(1, ge=1, description="vllm engine: stages the layers "
                                        "are split into (pipeline parallelism; across nodes "
                                        "with Ray).")
    data_parallel_size: int = Field(1, ge=1, description="vllm engine: replicas of the model "
                                    "behind this one server.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm engine: the "
                                          "share of each GPU's memory vLLM may use (weights, "
                                          "activations and KV cache).")
    enforce_eager: bool = Field(False, description="vllm engine: run eagerly, without CUDA "
                                "graphs or compilation (slower; starts sooner).")
    engine_process: bool = Field(False, description="Run the model and the scheduler in a "
                                 "child process of their own, so the HTTP server's Python "
                                 "work (parsing, tokenizing, writing responses) does not take "
                                 "turns with the decode loop on one interpreter lock. Costs a "
                                 "process start and a pipe hop per request and stream chunk; "
                                 "helps when HTTP traffic is heavy and spare cores exist.")
    engine_stall_timeout_s: float = Field(30.0, ge=0, description="How long the engine may "
                                          "show no progress (no step taken; with "
                                          "--engine-process, no word from the engine "
                                          "process) while requests are queued or running "
                                          "before /readyz answers 503, so a wedged replica "
                                          "leaves the service; it answers 200 again once the "
                                          "engine moves. An idle engine is never stalled. "
                                          "Keep it above the longest single step (a large "
                                          "prefill on a slow CPU). 0: off.")
    torch_threads: int = Field(0, ge=0, description="Threads torch computes with on the "
                               "CPU, in the process that runs the model. 0: automatic, the "
                               "cores this process may use (scheduler affinity, cgroup CPU "
                               "quota) less one for the HTTP process; OMP_NUM_THREADS when "
                               "set.")
    max_queue: int = Field(1024, ge=1, description="Queued requests before 429.")
    prompt_cache_bytes: int = Field(1 << 30, ge=0, description="Byte budget of resident prompts.")
    api_keys: Path | None = Field(None, description="JSON file of tenants and API keys.")
    model_cache: Path = Field(Path.home() / ".cache" / "softprompt-server",
                              description="Where builtin models are written.")
    max_new_tokens_limit: int = Field(4096, ge=1, description="Largest max_new_tokens accepted.")
    max_input_tokens: int = Field(8192, ge=1, description="Largest tokenized prompt accepted.")
    max_virtual_tokens: int = Field(512, ge=1, description="Largest num_virtual_tokens accepted.")
    max_upload_bytes: int = Field(64 << 20, ge=1, description="Largest upload file accepted.")
    max_encoder_params: int = Field(128 << 20, ge=1, description="Largest P-tuning encoder "
                                    "collapsed at upload: elements of its weights plus the "
                                    "activations of running it (413 beyond).")
    max_request_body_bytes: int = Field(8 << 20, ge=1024, description="Largest JSON body "
                                         "accepted by generate and the OpenAI routes (413 "
                                         "beyond; counted while it streams in).")
    request_body_timeout_s: float = Field(60.0, gt=0, description="Longest a request's body "
                                          "may take to arrive, from its first byte to its "
                                          "last (408 beyond): a client that trickles or "
                                          "stalls its body cannot hold a connection open.")
    max_concurrent_uploads: int = Field(2, ge=1, description="Uploads parsed and validated "
                                        "at once (each may hold an adapter's tensors in "
                                        "memory); more wait up to 30 s for a turn, then get "
                                        "429.")
    max_upload_parts: int = Field(8, ge=2, le=64,
                                  description="Most multipart parts in one adapter upload.")
    max_stop_strings: int = Field(16, ge=0, le=256,
                                  description="Most stop strings in one generate request.")
    tenant_max_adapters: int = Field(1000, ge=0, description="Default per-tenant quota: "
                                     "stored adapters.")
    tenant_max_stored_bytes: int = Field(1 << 30, ge=0, description="Default per-tenant "
                                         "quota: bytes of stored adapters.")
    tenant_max_concurrent_requests: int = Field(256, ge=1, description="Default per-tenant "
                                                "quota: generate calls and streams at once.")
    tenant_requests_per_second: float = Field(0.0, ge=0, description="Default per-tenant "
                                              "quota: request rate (token bucket, burst "
                                              "max(1, rate)); 0 means unlimited.")
    log_level: LogLevel = Field(LogLevel.INFO, description="Python logging level.")
    store_refresh_s: float = Field(2.0, ge=0, description="Bound on how long a replica takes "
                                   "to see uploads, overwrites and deletes made through "
                                   "another replica (0: check the store on every request).")
    drain_timeout_s: float = Field(30.0, ge=0, description="On SIGTERM, how long in-flight "
                                   "requests may run before they are aborted and the process "
                                   "exits.")
    docs: bool = Field(False, description="Serve the interactive API pages /docs and /redoc. "
                       "Their scripts come from a CDN, so they need a browser with internet "
                       "access; /openapi.json is always served.")
    keep_alive_s: int = Field(75, ge=1, description="How long an idle keep-alive HTTP "
                              "connection stays open. Keep it above the idle timeout of what "
                              "sits in front (load balancer, client connection pools): if the "
                              "server closes first, a request sent on the connection at that "
                              "moment fails with a connection error.")

    @field_validator("device", "dtype", "batching", "log_level", "engine", mode="before")
    @classmethod
    def _lowercase_choice(cls, value: object) -> object:
        """INFO, CPU and Float32 mean what their lowercase spelling means."""
        return value.lower() if isinstance(value, str) else value

    @field_validator("batching", mode="before")
    @classmethod
    def _former_loop(cls, value: object) -> object:
        """continuous, the name of the loop the engine core replaced, still selects it, so
        existing deployments keep starting."""
        return "core" if isinstance(value, str) and value.lower() == "continuous" else value

    @field_validator("served_model_name", mode="before")
    @classmethod
    def _names(cls, value: object) -> object:
        """`a,b` (the variable's form) is two names; each must be non-empty and unique."""
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            return value
        names = [n.strip() for item in value for n in str(item).split(",")]
        if any(not n or len(n) > 256 for n in names):
            raise ValueError("--served-model-name: each name must be 1 to 256 characters")
        if len(set(names)) != len(names):
            raise ValueError("--served-model-name: a name is given twice")
        return names

    @field_validator("kv_cache_memory")
    @classmethod
    def _kv_cache_memory(cls, value: str) -> str:
        parse_kv_cache_memory(value)
        return value

    @field_validator("engine_stall_timeout_s")
    @classmethod
    def _stall_timeout(cls, value: float) -> float:
        """Below a second, the engine process's reports (four a second) could look late."""
        if 0 < value < 1:
            raise ValueError("must be 0 (off) or at least 1 second")
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_input_tokens < 1:
            raise ValueError("--max-input-tokens must be at least 1")
        if self.api_keys is not None and not self.api_keys.is_file():
            raise ValueError(f"--api-keys {self.api_keys}: no such file")
        parallel = [f"--{name.replace('_', '-')} {getattr(self, name)}"
                    for name in ("tensor_parallel_size", "pipeline_parallel_size",
                                 "data_parallel_size") if getattr(self, name) > 1]
        if parallel and self.engine is EngineKind.BUILTIN:
            raise ValueError(f"{', '.join(parallel)} needs --engine vllm: the builtin engine "
                             "runs on one device")
        if self.engine is EngineKind.VLLM and self.engine_process:
            raise ValueError("--engine-process is for the builtin engine: --engine vllm runs "
                             "its engine core in a process of its own already")
        return self

    @property
    def max_upload_body_bytes(self) -> int:
        """Whole multipart body: two files at the per-file limit plus headers and small fields."""
        return 2 * self.max_upload_bytes + (1 << 20)
