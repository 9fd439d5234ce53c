"""An adapter at rest: PEFT soft-prompt formats, validation, P-tuning collapse, and storage.

Imports torch, safetensors and the standard library only.
"""

from adapters_store.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterStoreError,
    ConfigInvalidError,
    ConfigMissingError,
    FileTooLargeError,
    InvalidAdapterError,
    InvalidAdapterIdError,
    LimitExceededError,
    NonFiniteValuesError,
    ShapeMismatchError,
    StoreUnavailableError,
    TaskTypeMismatchError,
    TensorMissingError,
    TokenDimMismatchError,
    TooManyArchiveMembersError,
    TooManyVirtualTokensError,
    UnsafeArchiveError,
    UnsupportedAdapterTypeError,
    WeightsFormatError,
)
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

__all__ = [
    "ADAPTER_ID_PATTERN",
    "AdapterExistsError",
    "AdapterNotFoundError",
    "AdapterRecord",
    "AdapterStore",
    "AdapterStoreError",
    "ConfigInvalidError",
    "ConfigMissingError",
    "FileTooLargeError",
    "InvalidAdapterError",
    "InvalidAdapterIdError",
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
    "TooManyVirtualTokensError",
    "UnsafeArchiveError",
    "UnsupportedAdapterTypeError",
    "WeightsFormatError",
    "parse_archive",
    "parse_directory",
    "parse_files",
    "parse_paths",
    "validate_adapter_id",
]
