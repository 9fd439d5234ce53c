"""Entry points: a PEFT adapter as a directory, as in-memory files, as paths, or as an archive.

All four end in the same checks, cheapest first: file sizes, then adapter_config.json (type,
task, num_virtual_tokens against the limit, declared token_dim) before any tensor is read, then
the weights (safetensors, or `.bin` through torch's weights-only loader), then the format's
table (P-tuning encoders collapsed here, once), its shape and its finiteness. Nothing is
written anywhere; the result is a ParsedAdapter ready for an AdapterStore.

``parse_paths(config_path, weights_path, ...)`` is for uploads spooled to temporary files:
it checks each file's size before reading it.

Every failure is an InvalidAdapterError whose message starts with the file it is about. The
checks below are meant to catch everything a user can send; should one slip past them, the
low-level exception (RuntimeError from torch, ValueError, MemoryError, ...) is still turned
into a 400 naming the file, with the original chained for the log, never a 500.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapters_store.archive import read_archive
from adapters_store.config import CONFIG_NAME, AdapterConfig, parse_config
from adapters_store.errors import (
    ConfigInvalidError,
    ConfigMissingError,
    FileTooLargeError,
    InvalidAdapterError,
    TensorMissingError,
    UnsafeArchiveError,
    WeightsFormatError,
)
from adapters_store.formats import EXTRACTORS
from adapters_store.records import Limits, ModelSpec, ParsedAdapter
from adapters_store.validate import finalize
from adapters_store.weights import WEIGHTS_NAMES, check_size, read_weights, size_limit

_DEFAULT_LIMITS = Limits()
# What reading or collapsing bad input can raise from below this package. Not a bare
# Exception: a bug in this package should still surface as one.
_LOW_LEVEL = (ArithmeticError, LookupError, MemoryError, RuntimeError, TypeError, ValueError,
              EOFError, struct.error, zipfile.BadZipFile, pickle.UnpicklingError)


@contextmanager
def _about(name: str, unexpected: type[InvalidAdapterError]) -> Iterator[None]:
    """Name the file in every failure; turn a low-level exception into `unexpected`."""
    try:
        yield
    except InvalidAdapterError as e:
        if name in str(e):
            raise
        raise type(e)(f"{name}: {e}") from e
    except MemoryError as e:
        raise FileTooLargeError(
            f"{name}: reading it needs more memory than this server has free"
        ) from e
    except _LOW_LEVEL as e:
        raise unexpected(
            f"{name} could not be read as an adapter ({type(e).__name__}: {str(e)[:300]})"
        ) from e


def _missing_weights() -> TensorMissingError:
    return TensorMissingError(
        f"the weights file is missing: upload {' or '.join(WEIGHTS_NAMES)} next to "
        f"{CONFIG_NAME}, as written by PEFT's save_pretrained"
    )


def _config(config: bytes | None, spec: ModelSpec, limits: Limits) -> AdapterConfig:
    if config is None:
        return parse_config(None, spec=spec, limits=limits)  # the "missing" error, unprefixed
    with _about(CONFIG_NAME, ConfigInvalidError):
        check_size(CONFIG_NAME, len(config), limits)
        return parse_config(config, spec=spec, limits=limits)


def _parse(config: bytes | None, weights: bytes | None, weights_name: str | None,
           spec: ModelSpec, limits: Limits) -> ParsedAdapter:
    cfg = _config(config, spec, limits)
    if weights is None or weights_name is None:
        raise _missing_weights()
    with _about(weights_name, WeightsFormatError):
        tensors = read_weights(weights, weights_name=weights_name, limits=limits)
        table = finalize(EXTRACTORS[cfg.peft_type](tensors, cfg, spec.token_dim, limits=limits))
    assert config is not None
    return ParsedAdapter(
        peft_type=cfg.peft_type,
        task_type=cfg.task_type,
        num_virtual_tokens=cfg.num_virtual_tokens,
        num_transformer_submodules=cfg.num_transformer_submodules,
        token_dim=int(table.shape[1]),
        config=cfg.raw,
        config_bytes=bytes(config),
        embeddings=table,
    )


def parse_files(*, config: bytes | None, weights: bytes | None, weights_name: str,
                spec: ModelSpec, limits: Limits = _DEFAULT_LIMITS) -> ParsedAdapter:
    """Parse uploaded file contents; weights_name's extension (.safetensors/.bin) picks the reader.

    None for config or weights raises the matching "missing" error, so callers need not check.
    """
    return _parse(config, weights, weights_name, spec, limits)


def _read_limited(path: Path, name: str, limits: Limits) -> bytes:
    check_size(name, path.stat().st_size, limits)
    with open(path, "rb") as f:
        data = f.read(size_limit(name, limits) + 1)  # the file may have grown since stat
    check_size(name, len(data), limits)
    return data


def parse_paths(config_path: str | Path | None, weights_path: str | Path | None, *,
                weights_name: str | None = None, spec: ModelSpec,
                limits: Limits = _DEFAULT_LIMITS) -> ParsedAdapter:
    """Parse files on disk (e.g. spooled uploads); sizes are checked before anything is read.

    weights_name defaults to weights_path's file name; pass the uploaded name when the spool
    file has a random one.
    """
    config = None if config_path is None else _read_limited(Path(config_path), CONFIG_NAME,
                                                             limits)
    if weights_path is None:
        return _parse(config, None, None, spec, limits)
    weights_name = weights_name or Path(weights_path).name
    # Config first: a bad config is rejected before a large weights file is read.
    _config(config, spec, limits)
    weights = _read_limited(Path(weights_path), weights_name, limits)
    return _parse(config, weights, weights_name, spec, limits)


def parse_directory(path: str | Path, *, spec: ModelSpec,
                    limits: Limits = _DEFAULT_LIMITS) -> ParsedAdapter:
    """Parse a directory written by PEFT's save_pretrained (safetensors preferred over .bin)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigMissingError(
            f"{path} is not a directory: give the directory written by PEFT's save_pretrained"
        )
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise ConfigMissingError(
            f"{CONFIG_NAME} is missing in {path}: give the directory written by PEFT's "
            "save_pretrained"
        )
    weights_path = next((path / n for n in WEIGHTS_NAMES if (path / n).is_file()), None)
    return parse_paths(config_path, weights_path, spec=spec, limits=limits)


def parse_archive(source: bytes | str | Path, *, archive_name: str, spec: ModelSpec,
                  limits: Limits = _DEFAULT_LIMITS) -> ParsedAdapter:
    """Parse a .tar.gz/.tgz/.tar/.zip of an adapter directory (top level or one folder deep)."""
    with _about(archive_name, UnsafeArchiveError):
        files = read_archive(source, archive_name=archive_name, limits=limits)
    if files.config is None:
        raise ConfigMissingError(
            f"{CONFIG_NAME} is missing from the archive: put it at the archive's top level "
            "(or in one top-level folder) next to the adapter_model file written by PEFT's "
            "save_pretrained"
        )
    return _parse(files.config, files.weights, files.weights_name, spec, limits)
