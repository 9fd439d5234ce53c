"""Engine: the EngineClient the HTTP layer talks to — model, prompt table, scheduler, adapters.

`start()` returns at once and loads the model on a background thread, so the HTTP server can
answer /healthz (and 503 on /readyz) while a large model loads; what runs it is wired in
server.engine.runtime. Requests are validated here, once, before they are queued, so a bad
request never fails a batch it would have shared.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any

from adapters_store import parse_archive, parse_paths
from adapters_store.errors import (
    AdapterExistsError,
    AdapterStoreError,
    TaskTypeMismatchError,
    TokenDimMismatchError,
)
from adapters_store.records import AdapterRecord, Limits, ModelSpec, validate_adapter_id
from adapters_store.store import AdapterStore
from server.config import Settings
from server.engine.core_client import IDLE_STATS, CoreClient, Submission
from server.engine.errors import (
    EngineNotReadyError,
    InvalidRequestError,
    InvalidTemplateError,
    MaxNewTokensTooLongError,
    RequestTooLongError,
)
from server.engine.fairness import BatchPolicy, RoundRobinPolicy, contended_rows
from server.engine.frontend import Frontend
from server.engine.interface import (
    AdapterUpload,
    EngineProgress,
    GenerationRequest,
    ModelInfo,
)
from server.engine.model_loader import LoadedModel
from server.engine.observer import EngineObserver, GuardedObserver, NullObserver
from server.engine.prompt_layout import anchor_tokens, compiled_pieces
from server.engine.prompt_table import version_of
from server.engine.runtime import Runtime, build_runtime
from server.engine.sampling_limits import validate_params
from server.engine.store_refresh import StoreRefresher, count_stored
from server.engine.upload_slots import UploadSlots

log = logging.getLogger(__name__)


class Engine(Frontend):
    """One frozen base model serving many tenants' soft prompts; implements EngineClient."""

    def __init__(self, settings: Settings, store: AdapterStore, *,
                 observer: EngineObserver | None = None,
                 policy: BatchPolicy | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.store = store
        self._observer = GuardedObserver(observer or NullObserver())
        self._policy = policy  # None: the fair default, built once the device is known
        self._runtime: Runtime | None = None  # once the model is loaded
        self._loader: threading.Thread | None = None
        self._closing = False
        self._refresher: StoreRefresher | None = None
        self._stored_count = 0
        self._count_lock = threading.Lock()
        self._upload_slots = UploadSlots(settings.max_concurrent_uploads)

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Begin loading the model in the background; returns immediately."""
        if self._loader is not None:
            return
        self._loader = threading.Thread(target=self._load, name="model-loader", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            self._policy = self._policy or self._fair_policy()
            runtime = build_runtime(self.settings, self.store, observer=self._observer,
                                    policy=self._policy)
            core = runtime.core
            self._count_stored()
            core.start()
            self._refresher = StoreRefresher(self.store, core,
                                             period_s=self.settings.store_refresh_s,
                                             on_count=self._set_count)
            self._refresher.start()
            self._runtime = runtime
            if self._closing:  # shutdown() was called while the model was loading
                core.stop(0)
        except BaseException as e:  # noqa: BLE001 - reported through wait_until_ready/is_ready
            self._load_error = e
            log.error("engine failed to start: %s: %s", type(e).__name__, e, exc_info=True)
        finally:
            self._loaded_event.set()

    def _fair_policy(self) -> RoundRobinPolicy:
        """The default policy: max-min fair shares, weighted by the keys file."""
        rows = contended_rows(self.settings.contended_tenant_rows, self.settings.max_batch_size)
        if rows is None:
            log.info("fair scheduling: max-min fair shares, no contended cap")
        else:
            log.info("fair scheduling: max-min fair shares; while several tenants have work, "
                     "one starts at most %d row(s) (--contended-tenant-rows)", rows)
        return RoundRobinPolicy(weight_of=lambda t: self._weight_of(t), contended_rows=rows)

    @property
    def batching(self) -> str | None:
        """What runs the requests: the built-in engine's "core" or "static" loop, or "vllm"
        (None until the model is loaded)."""
        return None if self._runtime is None else self._runtime.batching

    def _count_stored(self) -> None:
        """Best effort: a store that is down at startup must not keep the model from serving."""
        try:
            count = count_stored(self.store)
        except AdapterStoreError as e:
            log.warning("could not count stored adapters: %s: %s", type(e).__name__, e)
            return
        self._set_count(count)

    def _set_count(self, count: int) -> None:
        with self._count_lock:
            self._stored_count = count

    def is_ready(self) -> bool:
        """Model loaded, store reachable, engine thread alive and not stalled (requests
        waiting on it longer than --engine-stall-timeout-s without a step), not shutting
        down."""
        core = self._core
        if self._closing or core is None or not core.alive:
            return False
        if core.stalled(self.settings.engine_stall_timeout_s):
            return False
        try:
            self.store.ping()
        except AdapterStoreError:
            return False
        return True

    def progress(self) -> EngineProgress:
        """Requests waiting on the engine thread and how long it has shown no progress, for
        /readyz's reason and the stall gauge."""
        core = self._core
        return EngineProgress(waiting=0, stalled_s=0.0) if core is None else core.progress()

    def begin_drain(self) -> None:
        """The server stopped taking requests (a drain began): queued work starts now."""
        if self._core is not None:
            self._core.begin_drain()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Refuse new requests (EngineNotReadyError), finish in-flight ones, stop the threads."""
        self._closing = True
        if self._loader is not None:
            self._loader.join(timeout)
        if self._refresher is not None:
            self._refresher.stop()
        if self._core is not None:
            self._core.stop(timeout)

    # ---- model ---------------------------------------------------------------------------------

    @property
    def _core(self) -> CoreClient | None:
        return None if self._runtime is None else self._runtime.core

    def _model(self) -> LoadedModel:
        """The loaded model; still usable (tokenize, info) while draining."""
        if self._runtime is None:
            raise EngineNotReadyError("the model is still loading" if self._load_error is None
                                      else f"the model failed to load: {self._load_error}")
        return self._runtime.loaded

    def _require(self) -> Runtime:
        """For new work: refused while loading and once shutdown has begun."""
        self._model()
        if self._closing or self._runtime is None:
            raise EngineNotReadyError("the engine is shutting down")
        return self._runtime

    @property
    def model_info(self) -> ModelInfo:
        return self._model().info

    def _loaded_tokenizer(self) -> Any:
        return self._model().tokenizer

    def _chat_model_name(self) -> str:
        return self._model().info.name

    # ---- generation ----------------------------------------------------------------------------

    async def open_deltas(self, request: GenerationRequest, *, stream: bool) -> Submission:
        """In process; also what the engine process serves its pipe with. The adapter's
        record is looked up off the event loop when the store would block (S3)."""
        return await self._submit(request, stream=stream)

    async def abort(self, request_id: str) -> None:
        if self._core is not None:
            self._core.abort(request_id)

    async def _submit(self, request: GenerationRequest, *, stream: bool) -> Submission:
        self._require()  # not ready: 503 before any store traffic
        record = None
        if request.adapter_id is not None:  # fast 404, and the version to serve
            record = self.store.peek_record(request.namespace, request.adapter_id)
            if record is None:  # a GET (S3): never on the event loop
                record = await asyncio.to_thread(self.store.get_record, request.namespace,
                                                 request.adapter_id)
        return self._enqueue(request, record, stream=stream)

    def _enqueue(self, request: GenerationRequest, record: AdapterRecord | None, *,
                 stream: bool) -> Submission:
        runtime = self._require()
        loaded, core = runtime.loaded, runtime.core
        version, virtual, layout = None, 0, None
        if record is not None:
            self._check_compatible(record, loaded)
            version, virtual = version_of(record), record.num_virtual_tokens
            if virtual > core.prompt_capacity:  # stored under a larger --max-virtual-tokens
                raise InvalidRequestError(
                    f"adapter {record.adapter_id!r} has {virtual} virtual tokens; this server "
                    f"holds at most {core.prompt_capacity} (--prompt-cache-bytes, "
                    "--max-virtual-tokens)")
            if record.template is not None:
                layout = runtime.layouts.get(record.template, virtual)
        anchors = 0 if layout is None else anchor_tokens(layout)
        if request.fit_context:
            request = self._fit(request, loaded, virtual + anchors)
        self._validate(request, loaded, virtual, anchors)
        runtime.bounds.check_all(compiled_pieces(request.prompt_ids, layout))
        return core.submit(request, version=version, virtual_tokens=virtual, stream=stream,
                           layout=layout)

    @staticmethod
    def _check_compatible(record: AdapterRecord, loaded: LoadedModel) -> None:
        """A store shared with another model may hold adapters this one cannot use."""
        if record.token_dim != loaded.info.hidden_size:
            raise TokenDimMismatchError(
                f"adapter {record.adapter_id!r} has token_dim {record.token_dim}, the served "
                f"model's hidden size is {loaded.info.hidden_size}")
        if record.task_type != loaded.task_type:
            raise TaskTypeMismatchError(
                f"adapter {record.adapter_id!r} is a {record.task_type} adapter; the served "
                f"model needs {loaded.task_type}")

    @staticmethod
    def _fit(request: GenerationRequest, loaded: LoadedModel, extra: int) -> GenerationRequest:
        """max_new_tokens lowered to what the context leaves (at least one token)."""
        left = loaded.info.max_context - len(request.prompt_ids) - extra
        if left < 1:
            raise RequestTooLongError(
                f"prompt {len(request.prompt_ids)} + virtual and anchor tokens {extra} leave "
                f"no room for a new token in the model's context of "
                f"{loaded.info.max_context}")
        new = min(request.params.max_new_tokens, left)
        return dataclasses.replace(request, params=dataclasses.replace(
            request.params, max_new_tokens=new), fit_context=False)

    @staticmethod
    def _validate(request: GenerationRequest, loaded: LoadedModel, virtual: int,
                  anchors: int) -> None:
        ids = request.prompt_ids
        if not ids and virtual == 0:
            raise InvalidRequestError("the prompt is empty and there is no adapter")
        try:
            validate_params(request.params, vocab_size=loaded.vocab_size)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from e
        if request.params.prompt_logprobs is not None and loaded.info.is_seq2seq:
            raise InvalidRequestError("prompt logprobs need a decoder-only model: this "
                                      "model's prompt is its encoder's input")
        total = len(ids) + anchors + virtual + request.params.max_new_tokens
        if total > loaded.info.max_context:
            anchored = f" + template anchors {anchors}" if anchors else ""
            prompt_fits = total - request.params.max_new_tokens < loaded.info.max_context
            raise (MaxNewTokensTooLongError if prompt_fits else RequestTooLongError)(
                f"prompt {len(ids)}{anchored} + virtual {virtual} + max_new_tokens "
                f"{request.params.max_new_tokens} = {total} tokens exceeds the model's context "
                f"of {loaded.info.max_context}")

    # ---- adapters ------------------------------------------------------------------------------

    async def add_adapter(self, namespace: str, adapter_id: str, upload: AdapterUpload, *,
                          overwrite: bool = False) -> AdapterRecord:
        """Parse and validate off the event loop, store atomically; servable at once."""
        runtime = self._require()
        validate_adapter_id(namespace, what="namespace")
        validate_adapter_id(adapter_id)
        existed = await asyncio.to_thread(self.store.exists, namespace, adapter_id)
        if existed and not overwrite:  # before parsing: 409 should not cost a parse
            raise AdapterExistsError(f"adapter {adapter_id!r} exists in namespace "
                                     f"{namespace!r}; pass overwrite to replace it")
        async with self._upload_slots.turn():
            parsed = await asyncio.to_thread(self._parse, upload, runtime.loaded)
        if parsed.template is not None:
            self._check_anchors(runtime, parsed.template, parsed.num_virtual_tokens)
        record = await asyncio.to_thread(self.store.put, namespace, adapter_id, parsed,
                                         overwrite=overwrite)
        runtime.core.invalidate(namespace, adapter_id)
        if not existed:
            with self._count_lock:
                self._stored_count += 1
        log.info("stored adapter %s/%s (%s, %s virtual tokens)", namespace, adapter_id,
                 record.peft_type, record.num_virtual_tokens)
        return record

    def _parse(self, upload: AdapterUpload, loaded: LoadedModel):
        spec = ModelSpec(token_dim=loaded.info.hidden_size, task_type=loaded.task_type)
        limits = Limits(max_virtual_tokens=self.settings.max_virtual_tokens,
                        max_file_bytes=self.settings.max_upload_bytes,
                        max_encoder_params=self.settings.max_encoder_params)
        if upload.archive_path is not None:
            parsed = parse_archive(Path(upload.archive_path),
                                   archive_name=upload.archive_name or upload.archive_path,
                                   spec=spec, limits=limits)
        else:
            parsed = parse_paths(upload.config_path, upload.weights_path,
                                 weights_name=upload.weights_name, spec=spec, limits=limits)
        # The store checks the template against the rows before it writes anything.
        return dataclasses.replace(parsed, template=upload.template)

    @staticmethod
    def _check_anchors(runtime: Runtime, template: str, rows: int) -> None:
        """A template whose anchor text tokenizes to an id the embedding lacks would make its
        requests read another adapter's rows; it is refused at upload, naming the token, by
        the layout and the check its requests go through (on the event loop, as theirs)."""
        layout = runtime.layouts.get(template, rows)
        try:
            runtime.bounds.check_all(compiled_pieces((), layout))
        except InvalidRequestError as e:
            raise InvalidTemplateError(str(e)) from e

    async def get_adapter(self, namespace: str, adapter_id: str) -> AdapterRecord:
        return await asyncio.to_thread(self.store.get_record, namespace, adapter_id)

    async def list_adapters(self, namespace: str | None) -> list[AdapterRecord]:
        return await asyncio.to_thread(self.store.list, namespace)

    async def delete_adapter(self, namespace: str, adapter_id: str) -> None:
        await asyncio.to_thread(self.store.delete, namespace, adapter_id)
        if self._runtime is not None:
            self._runtime.core.invalidate(namespace, adapter_id)
        with self._count_lock:
            self._stored_count = max(0, self._stored_count - 1)

    # ---- gauges --------------------------------------------------------------------------------

    def tenant_stats(self) -> dict[str, dict[str, int]]:
        core = self._core
        return core.tenant_counts() if core is not None else {}

    def stats(self) -> dict[str, float]:
        core = self._core
        return {
            "queue_capacity": float(self.settings.max_queue),
            "cache_capacity_bytes": float(self.settings.prompt_cache_bytes),
            "stored_adapters": float(self._stored_count),
            **(IDLE_STATS if core is None else core.stats()),
        }
