"""Plain records that cross the package boundary: parsed adapters, stored records, limits."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from adapters_store.errors import InvalidAdapterIdError

if TYPE_CHECKING:  # records carry tensors, but reading one needs no torch
    import torch

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
    # fullmatch: with match, `$` also matches before a final newline ("id\n" would pass).
    if not isinstance(value, str) or not _ADAPTER_ID_RE.fullmatch(value):
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
    # adapter_config.json is stored verbatim and counts against the tenant's storage: PEFT
    # writes about 1 KiB.
    max_config_bytes: int = 64 * 1024
    # A saved adapter holds one tensor and a P-tuning encoder checkpoint about ten; the cap is
    # checked against the file's own index before the file is parsed.
    max_tensors: int = 64
    # Elements of a P-tuning encoder's weights plus the activations of collapsing it, checked
    # before anything is allocated. An MLP encoder for a 4096-wide model with
    # encoder_hidden_size 4096 has about 50M; 128M admits it with room to spare.
    max_encoder_params: int = 128 * 1024 * 1024


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
    template: str | None = None  # where the rows go around the text (adapters_store.template)


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
    # Everything written for this version: the embeddings file, the uploaded config verbatim
    # and this record; what the tenant's storage quota counts. 0: not known yet.
    stored_bytes: int = 0
    template: str | None = None  # P-tuning template (adapters_store.template); None: prefix

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
            "stored_bytes": self.stored_bytes,
            "template": self.template,
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
            # Records written before stored_bytes existed: their embeddings file at least.
            stored_bytes=int(data.get("stored_bytes", data["size_bytes"])),
            template=data.get("template"),
        )


@dataclass(frozen=True)
class StoredAdapter:
    """A record with its embeddings, as loaded back from a store."""

    record: AdapterRecord
    embeddings: torch.Tensor = field(repr=False)  # [num_virtual_tokens * submodules, token_dim] f32
