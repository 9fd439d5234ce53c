"""Entry points: a PEFT adapter as a directory, as in-memory files, as paths, or as an archive.

All four end in the same checks, cheapest first: file sizes, then adapter_config.json (type,
task, num_virtual_tokens against the limit, declared token_dim) before any tensor is read, then
the weights (safetensors, or `.bin` through torch's weights-only loader), then the format's
table (P-tuning encoders collapsed here, once), its shape and its finiteness. Nothing is
written anywhere; the result is a ParsedAdapter ready for an AdapterStore.

``parse_paths(config_path, weights_path, ...)`` is for uploads spooled to temporary files:
it checks each file's size before reading it.
"""

from __future__ import annotations

from pathlib import Path

from adapters_store.archive import read_archive
from adapters_store.config import CONFIG_NAME, parse_config
from adapters_store.errors import ConfigMissingError, TensorMissingError
from adapters_store.formats import EXTRACTORS
from adapters_store.records import Limits, ModelSpec, ParsedAdapter
from adapters_store.validate import finalize
from adapters_store.weights import WEIGHTS_NAMES, check_size, read_weights

_DEFAULT_LIMITS = Limits()


def _missing_weights() -> TensorMissingError:
    return TensorMissingError(
        f"the weights file is missing: upload {' or '.join(WEIGHTS_NAMES)} next to "
        f"{CONFIG_NAME}, as written by PEFT's save_pretrained"
    )


def _parse(config: bytes | None, weights: bytes | None, weights_name: str | None,
           spec: ModelSpec, limits: Limits) -> ParsedAdapter:
    if config is not None:
        check_size(CONFIG_NAME, len(config), limits)
    if weights is not None:
        check_size(weights_name or "weights", len(weights), limits)
    cfg = parse_config(config, spec=spec, limits=limits)
    if weights is None or weights_name is None:
        raise _missing_weights()
    tensors = read_weights(weights, weights_name=weights_name, limits=limits)
    table = finalize(EXTRACTORS[cfg.peft_type](tensors, cfg, spec.token_dim))
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
        data = f.read(limits.max_file_bytes + 1)  # the file may have grown since stat
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
    parse_config(config, spec=spec, limits=limits)
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
    files = read_archive(source, archive_name=archive_name, limits=limits)
    if files.config is None:
        raise ConfigMissingError(
            f"{CONFIG_NAME} is missing from the archive: put it at the archive's top level "
            "(or in one top-level folder) next to the adapter_model file written by PEFT's "
            "save_pretrained"
        )
    return _parse(files.config, files.weights, files.weights_name, spec, limits)
