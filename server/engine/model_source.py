"""Where --model's files come from: the check before the server binds, the directory
from_pretrained reads, and the tokenizer.

The model itself loads in the background once the server is up (so /healthz answers during a
long load). A name that cannot be loaded at all, a path that does not exist or a hub id that
cannot be fetched from here, is known in a moment, so the process ends at once with one line
naming the flag and exit status 2, instead of binding and then failing. That check imports
neither torch nor transformers. The HTTP process of --engine-process needs only this module of
the model (the tokenizer), not the model loader (server.engine.model_loader) and the model
classes it imports.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.config import Settings
from server.engine.builtin_names import BUILTIN_PREFIX, builtin_names
from server.engine.errors import EngineError

# What the Hugging Face Hub accepts as a repo id: "name" or "owner/name".
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?")
# The whole hub check, wall clock: httpx's timeouts bound each connect and read, not a name
# lookup without DNS nor a hub (or proxy) that trickles bytes, which could hold startup minutes.
# The hub library's own metadata timeout variable sets it, as it does for its downloads.
_HUB_TIMEOUT_ENV = "HF_HUB_ETAG_TIMEOUT"
_HUB_TIMEOUT_S = 10.0


def _hub_timeout_s() -> float:
    try:
        value = float(os.environ.get(_HUB_TIMEOUT_ENV, _HUB_TIMEOUT_S))
    except ValueError:
        return _HUB_TIMEOUT_S
    return value if value > 0 else _HUB_TIMEOUT_S


class ModelSourceError(ValueError):
    """--model names nothing loadable; the message is one line naming the flag."""


def check_model_source(model: str) -> None:
    """Raise ModelSourceError unless --model is a built-in name, a directory with a
    config.json, or a hub id in the local Hugging Face cache or reachable on the hub."""
    if model.startswith(BUILTIN_PREFIX):
        if model not in builtin_names():
            raise ModelSourceError(f"--model {model!r} is not a built-in model; built-in "
                                   f"models: {', '.join(builtin_names())}")
        return
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"--model {model}: no config.json there; give a directory "
                                   "written by save_pretrained")
        return
    if not _HUB_ID.fullmatch(model) or model.startswith((".", "~")):
        raise ModelSourceError(f"--model {model}: no such directory")
    _check_hub_id(model)


def _check_hub_id(model: str) -> None:
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return  # downloaded before: loads offline
    hint = (f"download it first where the hub is reachable (hf download {model}), copy the "
            "Hugging Face cache here (HF_HUB_CACHE) and set HF_HUB_OFFLINE=1 so that nothing "
            "waits on the network; or give a local directory written by save_pretrained")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ModelSourceError(f"--model {model}: not a local directory and not in the Hugging "
                               f"Face cache, and HF_HUB_OFFLINE is set; {hint}")
    try:
        timeout = _hub_timeout_s()
        _within_deadline(lambda: HfApi().model_info(model, timeout=timeout), timeout)
    except RepositoryNotFoundError as e:
        raise ModelSourceError(f"--model {model}: no such local directory or Hugging Face "
                               "model (a private one needs HF_TOKEN)") from e
    except GatedRepoError as e:
        raise ModelSourceError(f"--model {model}: a gated model; accept its terms on the "
                               "Hugging Face Hub and set HF_TOKEN") from e
    except Exception as e:  # noqa: BLE001 - no network, DNS, proxy, TLS: all one answer
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelSourceError(f"--model {model}: not a local directory, not in the Hugging "
                               f"Face cache, and the hub cannot be reached ({reason}); "
                               f"{hint}") from e


def _within_deadline(call: Callable[[], object], timeout: float) -> None:
    """Run `call` in a daemon thread and give up after `timeout` s: raises what it raised, or
    TimeoutError. A call still stalled is left behind; the process is about to exit."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            outcome.append(e)

    thread = threading.Thread(target=run, name="hub-check", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise TimeoutError(f"no answer within {timeout:g} s")
    if outcome[0] is not None:
        raise outcome[0]


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
    from transformers import AutoTokenizer  # seconds: not for checking --model

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise load_error(name, e) from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
