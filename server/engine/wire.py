"""What crosses the pipe between the HTTP process and the engine process (--engine-process).

Messages are JSON objects, sent in batches (one JSON array per write), never pickles: the
engine process only ever decodes data it could have received from anyone. A batch is cut
into frames of about FRAME_BYTES, and logprobs travel as flat arrays of numbers: one
json.loads holds the reading process's GIL from start to end, and nested lists by the
hundred thousand would also wake its garbage collector for full passes, so a large answer
(n echoed choices with top logprobs) must arrive as many short decodes. Exceptions cross
as their class name and message and are rebuilt on the other side from a fixed table of the
engine's and the store's error classes, so the HTTP layer maps them to the same status codes
as in process.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Iterator
from typing import Any

import adapters_store.errors as store_errors
import server.engine.errors as engine_errors
from adapters_store.records import AdapterRecord
from server.engine.interface import (
    AdapterUpload,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
    TokenLogprob,
)
from server.engine.model_source import ModelLoadError
from server.engine.rows import RowDelta


def _error_classes() -> dict[str, type[Exception]]:
    found: dict[str, type[Exception]] = {"ModelLoadError": ModelLoadError}
    for module in (store_errors, engine_errors):
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, Exception):
                found[name] = value
    return found


ERRORS = _error_classes()


FRAME_BYTES = 1 << 18  # a frame's size, past which frames() starts another


def dumps(messages: list[dict[str, Any]]) -> bytes:
    """ASCII with escapes and NaN/Infinity allowed: whatever the engine accepts in process
    (a lone surrogate in a stop string, an infinite temperature) must cross too."""
    return json.dumps(messages, separators=(",", ":")).encode()


def frames(messages: list[dict[str, Any]], *, limit: int = FRAME_BYTES) -> Iterator[bytes]:
    """`messages` as consecutive writes (each a JSON array, as dumps makes), in order, each
    of about `limit` bytes at most: a message larger than that goes alone in its own."""
    batch: list[bytes] = []
    size = 1  # the frame's length: its brackets, and a comma before each message but one
    for message in messages:
        data = json.dumps(message, separators=(",", ":")).encode()
        if batch and size + len(data) + 1 > limit:
            yield b"[" + b",".join(batch) + b"]"
            batch, size = [], 1
        batch.append(data)
        size += len(data) + 1
    if batch:
        yield b"[" + b",".join(batch) + b"]"


def loads(data: bytes) -> list[dict[str, Any]]:
    messages = json.loads(data)
    if not isinstance(messages, list):
        raise ValueError("an engine pipe message must be a JSON array")
    return messages


def request_to_wire(request: GenerationRequest) -> dict[str, Any]:
    return {"request_id": request.request_id, "prompt_ids": list(request.prompt_ids),
            "adapter_id": request.adapter_id, "namespace": request.namespace,
            "params": dataclasses.asdict(request.params),  # tuples travel as JSON arrays
            "fit_context": request.fit_context}


def request_from_wire(data: dict[str, Any]) -> GenerationRequest:
    # SamplingParams' sequences are tuples (it is frozen and hashable).
    params = {name: tuple(value) if isinstance(value, list) else value
              for name, value in data["params"].items()}
    return GenerationRequest(request_id=data["request_id"],
                             prompt_ids=tuple(data["prompt_ids"]),
                             adapter_id=data["adapter_id"], namespace=data["namespace"],
                             params=SamplingParams(**params),
                             fit_context=bool(data.get("fit_context", False)))


def _logprobs_to_wire(values: tuple[TokenLogprob | None, ...] | None) -> dict | None:
    """Five flat arrays: each token's id, logprob and count of top entries (null for a token
    without a logprob, whose id and logprob are then 0), and all top entries' ids and
    logprobs end to end. Decoding them makes a few lists, not one per token and per entry."""
    if values is None:
        return None
    ids: list[int] = []
    logprobs: list[float] = []
    counts: list[int | None] = []
    top_ids: list[int] = []
    top_logprobs: list[float] = []
    for value in values:
        if value is None:
            ids.append(0)
            logprobs.append(0.0)
            counts.append(None)
            continue
        ids.append(value.token_id)
        logprobs.append(value.logprob)
        counts.append(len(value.top))
        for token_id, logprob in value.top:
            top_ids.append(token_id)
            top_logprobs.append(logprob)
    return {"ids": ids, "logprobs": logprobs, "counts": counts, "top_ids": top_ids,
            "top_logprobs": top_logprobs}


def _logprobs_from_wire(data: dict | None) -> tuple[TokenLogprob | None, ...] | None:
    """On the reader thread. No per-entry conversion: JSON keeps ints and floats apart (a
    float is written with a point or an exponent), so each value is the engine's own."""
    if data is None:
        return None
    top_ids, top_logprobs = data["top_ids"], data["top_logprobs"]
    values: list[TokenLogprob | None] = []
    start = 0
    for token_id, logprob, count in zip(data["ids"], data["logprobs"], data["counts"],
                                        strict=True):
        if count is None:
            values.append(None)
            continue
        end = start + count
        top = tuple(zip(top_ids[start:end], top_logprobs[start:end], strict=True))
        values.append(TokenLogprob(token_id, logprob, top))
        start = end
    return tuple(values)


def delta_to_wire(delta: RowDelta) -> dict[str, Any]:
    """A row's new token ids (and logprobs), and its finish reason on its last delta."""
    return {"token_ids": list(delta.token_ids), "logprobs": _logprobs_to_wire(delta.logprobs),
            "prompt_logprobs": _logprobs_to_wire(delta.prompt_logprobs),
            "finish_reason": None if delta.finish_reason is None else str(delta.finish_reason),
            "cached_tokens": delta.cached_tokens}


def delta_from_wire(data: dict[str, Any]) -> RowDelta:
    reason = data.get("finish_reason")
    return RowDelta(token_ids=tuple(int(t) for t in data["token_ids"]),
                    logprobs=_logprobs_from_wire(data.get("logprobs")),  # type: ignore[arg-type]
                    prompt_logprobs=_logprobs_from_wire(data.get("prompt_logprobs")),
                    finish_reason=None if reason is None else FinishReason(reason),
                    cached_tokens=_optional_int(data.get("cached_tokens")))


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def info_to_wire(info: ModelInfo) -> dict[str, Any]:
    return dataclasses.asdict(info)


def info_from_wire(data: dict[str, Any]) -> ModelInfo:
    return ModelInfo(**data)


def upload_to_wire(upload: AdapterUpload) -> dict[str, Any]:
    return dataclasses.asdict(upload)


def upload_from_wire(data: dict[str, Any]) -> AdapterUpload:
    return AdapterUpload(**data)


def record_from_wire(data: dict[str, Any]) -> AdapterRecord:
    return AdapterRecord.from_dict(data)


def error_to_wire(error: BaseException) -> dict[str, Any]:
    """The nearest class in ERRORS (an unknown failure travels as a GenerationError)."""
    name = next((c.__name__ for c in type(error).__mro__ if ERRORS.get(c.__name__) is c),
                "GenerationError")
    message = str(error) if name != "GenerationError" or isinstance(
        error, engine_errors.GenerationError) else f"{type(error).__name__}: {error}"
    wire: dict[str, Any] = {"type": name, "message": message}
    retry_after = getattr(error, "retry_after_s", None)
    if isinstance(retry_after, int | float):
        wire["retry_after_s"] = float(retry_after)
    return wire


def error_from_wire(data: dict[str, Any]) -> Exception:
    cls = ERRORS.get(data.get("type", ""), engine_errors.GenerationError)
    if cls is engine_errors.QueueFullError:
        return cls(data["message"], retry_after_s=data.get("retry_after_s", 1.0))
    return cls(data["message"])
