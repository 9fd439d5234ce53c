"""Where the model's files come from, and its tokenizer: all an HTTP process needs of the
model when the engine runs in a process of its own (--engine-process). Apart from the model
loader (server.engine.model_loader), so that process does not import the model classes and
their code (about 2 s of a server's start on a small machine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from server.config import Settings
from server.engine.builtin_names import BUILTIN_PREFIX
from server.engine.errors import EngineError


class ModelLoadError(EngineError):
    """The model named by --model (or the --device/--dtype asked for) cannot be loaded."""


def model_source(settings: Settings) -> str | Path:
    """What from_pretrained reads for --model; a `builtin:` name is materialized first."""
    if not settings.model.startswith(BUILTIN_PREFIX):
        return settings.model
    from server.engine.builtin import ensure_builtin  # torch: only where one is built

    try:
        return ensure_builtin(settings.model, Path(settings.model_cache))
    except ValueError as e:
        raise ModelLoadError(str(e)) from e
    except OSError as e:
        raise ModelLoadError(
            f"--model {settings.model}: could not write it to --model-cache "
            f"{settings.model_cache}: {e}"
        ) from e


def load_error(name: str, e: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"--model {name!r} could not be loaded: {type(e).__name__}: {e}. Give a local "
        "directory written by save_pretrained, a Hugging Face id that is downloadable (or "
        "already in the Hugging Face cache when offline), or builtin:tiny"
    )


def load_tokenizer(source: str | Path, *, name: str) -> Any:
    """The model's tokenizer with a pad token: generate needs a pad id for finished rows, and
    eos is what HF pipelines use too. Also what an HTTP process without the model (the engine
    in its own process) tokenizes with."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise load_error(name, e) from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
