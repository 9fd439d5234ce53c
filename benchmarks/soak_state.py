"""What the soak benchmark's clients share: the kinds of request, one request's outcome, the
adapters' bytes, each tenant's view of its adapters, and the run's settings and results."""

from __future__ import annotations

import io
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


class Kind(StrEnum):
    """What a request was; the report counts outcomes per kind."""

    GENERATE = "generate"
    STREAM = "stream"
    DISCONNECT = "disconnect"
    COMPLETIONS = "completions"
    COMPLETIONS_STREAM = "completions-stream"
    CHAT = "chat"
    CHAT_STREAM = "chat-stream"
    CROSS_TENANT = "cross-tenant"
    UPLOAD = "upload"
    OVERWRITE = "overwrite"
    CONFLICT = "conflict"
    DELETE = "delete"
    LIST = "list"
    HOSTILE = "hostile"


ENDPOINTS = {Kind.GENERATE: "POST /v1/generate", Kind.STREAM: "POST /v1/generate (SSE)",
             Kind.DISCONNECT: "POST /v1/generate (SSE, client leaves)",
             Kind.COMPLETIONS: "POST /v1/completions",
             Kind.COMPLETIONS_STREAM: "POST /v1/completions (SSE)",
             Kind.CHAT: "POST /v1/chat/completions",
             Kind.CHAT_STREAM: "POST /v1/chat/completions (SSE)",
             Kind.CROSS_TENANT: "POST /v1/generate (other tenant's adapter)",
             Kind.UPLOAD: "POST /v1/adapters", Kind.OVERWRITE: "POST /v1/adapters?overwrite=true",
             Kind.CONFLICT: "POST /v1/adapters (id exists)",
             Kind.DELETE: "DELETE /v1/adapters/{id}", Kind.LIST: "GET /v1/adapters",
             Kind.HOSTILE: "the hostile mix (benchmarks.soak_hostile)"}
INFERENCE = frozenset({Kind.GENERATE, Kind.STREAM, Kind.COMPLETIONS, Kind.COMPLETIONS_STREAM,
                       Kind.CHAT, Kind.CHAT_STREAM})
# In-stream error types that stand for an expected refusal (the 404/409/429 of a stream).



@dataclass(slots=True)
class Outcome:
    """One request as the client saw it. `status` is the HTTP status, or `conn-error`,
    `timeout`, `left-early`, or `200+<type>` for an error event inside a 200 stream."""

    kind: Kind
    tenant: str
    status: str
    started: float  # seconds since the soak began
    latency: float  # seconds
    expected: bool
    detail: str | None = None  # unexpected outcomes: what was sent, what came back


@dataclass(frozen=True)
class AdapterFiles:
    """One PEFT adapter directory's bytes, ready to upload either way the API takes."""

    num_virtual_tokens: int
    config: bytes
    weights: bytes
    archive: bytes  # the two files as one .tar.gz

    @classmethod
    def read(cls, directory: Path, num_virtual_tokens: int) -> AdapterFiles:
        config = (directory / "adapter_config.json").read_bytes()
        weights = (directory / "adapter_model.safetensors").read_bytes()
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, data in (("adapter_config.json", config),
                               ("adapter_model.safetensors", weights)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return cls(num_virtual_tokens, config, weights, buf.getvalue())


@dataclass
class Tenant:
    """One tenant's view: its key, its adapters, which churned ones exist, which are in use."""

    name: str
    key: str
    stable: dict[str, int]  # adapter id -> num_virtual_tokens; never deleted or replaced
    churn: dict[str, bool]  # adapter id -> exists (as far as this tenant's uploader knows)
    in_use: Counter[str] = field(default_factory=Counter)  # adapter id -> requests in flight
    ops_on_busy: Counter[str] = field(default_factory=Counter)  # "delete"/"overwrite" -> count


@dataclass
class Traffic:
    """Shared by every client of one soak run."""

    base_url: str
    model: str  # what --model said: the base model's name on the OpenAI routes
    tenants: list[Tenant]
    variants: list[AdapterFiles]
    deadline: float  # time.monotonic() after which no new request starts
    t0: float  # time.monotonic() when the soak began
    max_new_tokens: int = 48
    request_timeout_s: float = 30.0
    upload_pause_s: tuple[float, float] = (0.1, 0.4)
    outcomes: list[Outcome] = field(default_factory=list)

    def record(self, kind: Kind, tenant: Tenant, status: str, started: float, *,
               expected: bool, detail: str | None = None) -> None:
        self.outcomes.append(Outcome(kind, tenant.name, status, started - self.t0,
                                     time.monotonic() - started, expected,
                                     None if expected else detail))
