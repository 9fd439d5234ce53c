"""Plain records that cross the package boundary: parsed adapters, stored records, limits."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from adapters_store.errors import InvalidAdapterIdError

ADAPTER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_ADAPTER_ID_RE = re.compile(ADAPTER_ID_PATTERN)


class PeftType(StrEnum):
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"


class TaskType(StrEnum):
    CAUSAL_LM = "CAUSAL_LM"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"


def validate_adapter_id(value: str, *, what: str = "adapter id") -> str:
    """Reject ids that could escape a directory or a URL path; used for namespaces too."""
    if not isinstance(value, str) or not _ADAPTER_ID_RE.match(value):
        raise InvalidAdapterIdError(
            f"invalid {what} {value!r}: must match {ADAPTER_ID_PATTERN} "
            "(1-128 characters: letters, digits, '.', '_', '-'; starting with a letter or digit)"
        )
    return value


@dataclass(frozen=True)
class ModelSpec:
    """What the serving model requires of an adapter; passed in by the caller."""

    token_dim: int
    task_type: TaskType | None = None  # None: accept both


@dataclass(frozen=True)
class Limits:
    """Upload limits. Defaults are the documented server defaults."""

    max_virtual_tokens: int = 512
    max_file_bytes: int = 64 * 1024 * 1024
    max_archive_members: int = 16
    max_decompressed_bytes: int = 128 * 1024 * 1024


@dataclass(frozen=True)
class ParsedAdapter:
    """A validated adapter, normalized: P-tuning collapsed, float32, on the CPU."""

    peft_type: PeftType
    task_type: TaskType
    num_virtual_tokens: int
    num_transformer_submodules: int
    token_dim: int
    config: dict  # the original adapter_config.json, parsed
    config_bytes: bytes  # the original adapter_config.json, verbatim
    embeddings: torch.Tensor = field(repr=False)  # [num_virtual_tokens * submodules, token_dim] f32


@dataclass(frozen=True)
class AdapterRecord:
    """Metadata of a stored adapter; what GET /v1/adapters/{id} returns (plus namespace)."""

    adapter_id: str
    namespace: str
    peft_type: PeftType
    task_type: TaskType
    num_virtual_tokens: int
    token_dim: int
    sha256: str  # of the stored safetensors file's bytes
    size_bytes: int  # of the stored safetensors file
    created_at: str  # ISO 8601 UTC, e.g. 2026-11-23T10:00:00.123456Z

    def to_dict(self) -> dict:
        return {
            "adapter_id": self.adapter_id,
            "namespace": self.namespace,
            "peft_type": str(self.peft_type),
            "task_type": str(self.task_type),
            "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": self.token_dim,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: dict) -> AdapterRecord:
        return cls(
            adapter_id=data["adapter_id"],
            namespace=data["namespace"],
            peft_type=PeftType(data["peft_type"]),
            task_type=TaskType(data["task_type"]),
            num_virtual_tokens=int(data["num_virtual_tokens"]),
            token_dim=int(data["token_dim"]),
            sha256=data["sha256"],
            size_bytes=int(data["size_bytes"]),
            created_at=data["created_at"],
        )


@dataclass(frozen=True)
class StoredAdapter:
    """A record with its embeddings, as loaded back from a store."""

    record: AdapterRecord
    embeddings: torch.Tensor = field(repr=False)  # [num_virtual_tokens * submodules, token_dim] f32
