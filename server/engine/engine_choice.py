"""Which engine runs the model (--engine), decided once at load, with the reason logged.

auto takes vLLM where it is the better engine: it is installed, the device is CUDA, and the
model is a decoder-only model vLLM serves. Everything else (a CPU, T5 and other seq2seq
models, vLLM not installed) runs the built-in engine, which serves every model exactly.
`--engine vllm` asked for where vLLM cannot serve fails at startup naming `--engine builtin`.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from server.config import Device, EngineKind, Settings
from server.engine.model_loader import resolve_device
from server.engine.model_source import ModelLoadError, model_source

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'softprompt-server[vllm]'"


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_engine(settings: Settings) -> EngineKind:
    """BUILTIN or VLLM; raises ModelLoadError for `--engine vllm` where vLLM cannot serve."""
    if settings.engine is EngineKind.BUILTIN:
        log.info("engine: builtin (--engine builtin)")
        return EngineKind.BUILTIN
    asked = settings.engine is EngineKind.VLLM
    reason = _why_not_vllm(settings, asked=asked)
    if reason is None:
        log.info("engine: vllm (%s)", "--engine vllm" if asked else
                 "--engine auto: vLLM is installed, the device is CUDA and it serves the model")
        return EngineKind.VLLM
    if asked:
        raise ModelLoadError(f"--engine vllm: {reason}; use --engine builtin")
    log.info("engine: builtin (--engine auto: %s)", reason)
    return EngineKind.BUILTIN


def _why_not_vllm(settings: Settings, *, asked: bool) -> str | None:
    if not vllm_installed():
        return f"vLLM is not installed ({INSTALL_HINT})"
    if not asked:
        device = settings.device
        if device is Device.CPU or resolve_device(device).type != "cuda":
            return "the device is not CUDA"
    config = _config(settings)
    if getattr(config, "is_encoder_decoder", False):
        return (f"{type(config).__name__} is an encoder-decoder model; vLLM takes prompt "
                "embeddings for decoder-only models only")
    return None


def _config(settings: Settings) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_source(settings))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"--model {settings.model!r} could not be loaded: "
                             f"{type(e).__name__}: {e}") from e
