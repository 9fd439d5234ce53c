"""What every backend stores for one adapter version, in the same bytes: the collapsed table in
float32 safetensors, the original adapter_config.json and the record. Only where the bytes go
differs between backends (local.py, s3.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import UTC, datetime

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from adapters_store.errors import InvalidAdapterError, StoredAdapterCorruptError
from adapters_store.records import AdapterRecord, ParsedAdapter, StoredAdapter
from adapters_store.template import parse_template

EMBEDDINGS_FILE = "embeddings.safetensors"
CONFIG_FILE = "adapter_config.json"
RECORD_FILE = "record.json"
TENSOR_KEY = "prompt_embeddings"


def encode(namespace: str, adapter_id: str, adapter: ParsedAdapter) -> tuple[bytes, AdapterRecord]:
    """The embeddings file's bytes and the record describing them (sha256, size, time)."""
    table = adapter.embeddings  # [num_virtual_tokens * submodules, token_dim]
    expected = (adapter.num_virtual_tokens * adapter.num_transformer_submodules,
                adapter.token_dim)
    if adapter.template is not None:
        parse_template(adapter.template, adapter.num_virtual_tokens)
    if table.dtype != torch.float32 or tuple(table.shape) != expected:
        raise InvalidAdapterError(
            f"embeddings must be float32 of shape {list(expected)}, got {table.dtype} "
            f"{list(table.shape)}: pass the ParsedAdapter returned by the parse functions")
    data = save_safetensors({TENSOR_KEY: table.detach().cpu().contiguous()},
                            metadata={"format": "pt"})
    record = AdapterRecord(
        adapter_id=adapter_id, namespace=namespace, peft_type=adapter.peft_type,
        task_type=adapter.task_type, num_virtual_tokens=adapter.num_virtual_tokens,
        token_dim=adapter.token_dim, sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data), created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        template=adapter.template)
    return data, _with_stored_bytes(record, len(data) + len(adapter.config_bytes))


def _with_stored_bytes(record: AdapterRecord, files: int) -> AdapterRecord:
    """The record with stored_bytes = files + the record's own JSON, which holds that number
    (two rounds settle it: the count's digits change at most once)."""
    for _ in range(3):
        size = files + len(json.dumps(record.to_dict()).encode())
        if size == record.stored_bytes:
            break
        record = dataclasses.replace(record, stored_bytes=size)
    return record


def decode(record: AdapterRecord, data: bytes, *, verify: bool) -> StoredAdapter:
    """The stored adapter; verify=True also checks the sha256 (costs a hash)."""
    if verify and hashlib.sha256(data).hexdigest() != record.sha256:
        raise StoredAdapterCorruptError(f"stored adapter {record.adapter_id!r} in "
                                        f"{record.namespace!r} does not match its sha256")
    return StoredAdapter(record=record, embeddings=load_safetensors(data)[TENSOR_KEY])
