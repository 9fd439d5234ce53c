"""Exceptions raised by adapters_store.

Every failure a user can cause has its own type so the HTTP edge maps it to a status code
without looking at message text. Messages say what was wrong and what to do about it.
"""


class AdapterStoreError(Exception):
    """Base of every error raised by this package."""


class InvalidAdapterError(AdapterStoreError):
    """The upload is not a usable adapter (HTTP 400)."""


class ConfigMissingError(InvalidAdapterError):
    """No adapter_config.json was given."""


class ConfigInvalidError(InvalidAdapterError):
    """adapter_config.json is not valid JSON or lacks a required field."""


class UnsupportedAdapterTypeError(InvalidAdapterError):
    """peft_type (or task_type) is not one this server serves."""


class TensorMissingError(InvalidAdapterError):
    """The weights file holds no prompt embeddings nor a P-tuning encoder."""


class WeightsFormatError(InvalidAdapterError):
    """The weights file cannot be read safely (corrupt, or a pickle that is not plain tensors)."""


class TooManyTensorsError(WeightsFormatError):
    """The weights file holds more tensors than limits.max_tensors; refused before parsing."""


class ShapeMismatchError(InvalidAdapterError):
    """The tensor's shape does not match what the config declares."""


class NonFiniteValuesError(InvalidAdapterError):
    """The embeddings contain NaN or Inf."""


class TokenDimMismatchError(InvalidAdapterError):
    """The adapter was trained for a model with a different hidden size than the one served."""


class TaskTypeMismatchError(InvalidAdapterError):
    """A causal-LM adapter on a seq2seq model, or the other way round."""


class InvalidTemplateError(InvalidAdapterError):
    """A P-tuning template that does not parse, or does not use the adapter's rows exactly once."""


class UnsafeArchiveError(InvalidAdapterError):
    """An archive member has an absolute or `..` path, is a link, or the archive is malformed."""


class LimitExceededError(InvalidAdapterError):
    """A configured size limit was exceeded (HTTP 413)."""


class TooManyVirtualTokensError(LimitExceededError):
    """num_virtual_tokens is above the configured maximum."""


class FileTooLargeError(LimitExceededError):
    """A file, an archive, or its decompressed contents are above the configured maximum."""


class EncoderTooLargeError(LimitExceededError):
    """A P-tuning encoder would need more than limits.max_encoder_params elements to collapse."""


class InvalidAdapterIdError(AdapterStoreError):
    """Adapter id or namespace does not match ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$ (HTTP 422)."""


class AdapterNotFoundError(AdapterStoreError):
    """No adapter with that id in that namespace (HTTP 404)."""


class AdapterExistsError(AdapterStoreError):
    """An adapter with that id exists and overwrite was not asked for (HTTP 409)."""


class StoreUnavailableError(AdapterStoreError):
    """The backing storage cannot be reached or written (HTTP 503)."""


class TooManyArchiveMembersError(UnsafeArchiveError):
    """The archive has more members than limits.max_archive_members."""


class StoredAdapterCorruptError(StoreUnavailableError):
    """A stored adapter's files do not match its record (checked only when asked to verify)."""
