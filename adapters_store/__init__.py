"""An adapter at rest: PEFT soft-prompt formats, validation, P-tuning collapse, and storage.

Imports torch, safetensors and the standard library only.
"""

import importlib
from typing import TYPE_CHECKING, Any

from adapters_store.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterStoreError,
    ConfigInvalidError,
    ConfigMissingError,
    EncoderTooLargeError,
    FileTooLargeError,
    InvalidAdapterError,
    InvalidAdapterIdError,
    InvalidTemplateError,
    LimitExceededError,
    NonFiniteValuesError,
    ShapeMismatchError,
    StoreUnavailableError,
    TaskTypeMismatchError,
    TensorMissingError,
    TokenDimMismatchError,
    TooManyArchiveMembersError,
    TooManyTensorsError,
    TooManyVirtualTokensError,
    UnsafeArchiveError,
    UnsupportedAdapterTypeError,
    WeightsFormatError,
)

# The rest loads on first use (PEP 562), so importing the errors alone (as an HTTP layer does
# to map them to status codes) does not load torch.
_LAZY = {
    "LocalAdapterStore": "adapters_store.local",
    "parse_archive": "adapters_store.parse",
    "parse_directory": "adapters_store.parse",
    "parse_files": "adapters_store.parse",
    "parse_paths": "adapters_store.parse",
    "ADAPTER_ID_PATTERN": "adapters_store.records",
    "AdapterRecord": "adapters_store.records",
    "Limits": "adapters_store.records",
    "ModelSpec": "adapters_store.records",
    "ParsedAdapter": "adapters_store.records",
    "PeftType": "adapters_store.records",
    "StoredAdapter": "adapters_store.records",
    "TaskType": "adapters_store.records",
    "validate_adapter_id": "adapters_store.records",
    "AdapterStore": "adapters_store.store",
    "Anchor": "adapters_store.template",
    "Soft": "adapters_store.template",
    "Text": "adapters_store.template",
    "parse_template": "adapters_store.template",
}

if TYPE_CHECKING:
    from adapters_store.local import LocalAdapterStore
    from adapters_store.parse import parse_archive, parse_directory, parse_files, parse_paths
    from adapters_store.records import (
        ADAPTER_ID_PATTERN,
        AdapterRecord,
        Limits,
        ModelSpec,
        ParsedAdapter,
        PeftType,
        StoredAdapter,
        TaskType,
        validate_adapter_id,
    )
    from adapters_store.store import AdapterStore
    from adapters_store.template import Anchor, Soft, Text, parse_template


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'adapters_store' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "ADAPTER_ID_PATTERN",
    "Anchor",
    "AdapterExistsError",
    "AdapterNotFoundError",
    "AdapterRecord",
    "AdapterStore",
    "AdapterStoreError",
    "ConfigInvalidError",
    "ConfigMissingError",
    "EncoderTooLargeError",
    "FileTooLargeError",
    "InvalidAdapterError",
    "InvalidAdapterIdError",
    "InvalidTemplateError",
    "LimitExceededError",
    "LocalAdapterStore",
    "Limits",
    "ModelSpec",
    "NonFiniteValuesError",
    "ParsedAdapter",
    "PeftType",
    "ShapeMismatchError",
    "StoreUnavailableError",
    "StoredAdapter",
    "TaskType",
    "TaskTypeMismatchError",
    "TensorMissingError",
    "TokenDimMismatchError",
    "TooManyArchiveMembersError",
    "TooManyTensorsError",
    "TooManyVirtualTokensError",
    "UnsafeArchiveError",
    "UnsupportedAdapterTypeError",
    "WeightsFormatError",
    "Soft",
    "Text",
    "parse_archive",
    "parse_directory",
    "parse_files",
    "parse_template",
    "parse_paths",
    "validate_adapter_id",
]
