"""Loading the one frozen base model: a Hugging Face id, a local path, or a `builtin:` model.

Every model, the built-in one included, goes through the same `from_pretrained` path, so what
the tests exercise on the tiny built-in model is what production runs on a real one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from adapters_store.records import TaskType
from server.config import Device, DType, Settings
from server.engine.cpu_threads import apply_torch_threads
from server.engine.interface import ModelInfo
from server.engine.model_source import ModelLoadError, load_error, load_tokenizer, model_source

log = logging.getLogger(__name__)

# Relative-position models (T5, BLOOM's ALiBi) have no fixed window in their config; this is the
# limit we enforce for them. Tokenizers without a limit report a huge model_max_length.
DEFAULT_MAX_CONTEXT = 2048
_UNBOUNDED = 1_000_000

_DTYPES = {
    DType.FLOAT32: torch.float32,
    DType.BFLOAT16: torch.bfloat16,
    DType.FLOAT16: torch.float16,
}


@dataclass(frozen=True)
class LoadedModel:
    """The frozen model, its tokenizer and what the rest of the engine needs to know of it."""

    model: Any  # a PreTrainedModel in eval mode, requires_grad False
    tokenizer: Any  # a PreTrainedTokenizerBase with a pad token
    info: ModelInfo
    task_type: TaskType  # what adapters must be trained for
    device: torch.device
    dtype: torch.dtype
    vocab_size: int  # ids at or above this cannot be embedded


def resolve_device(device: Device) -> torch.device:
    """auto picks CUDA when present; asking for CUDA without one fails at startup, not later."""
    if device == Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == Device.CUDA and not torch.cuda.is_available():
        raise ModelLoadError(
            "--device cuda was requested but CUDA is not available (no GPU visible to torch "
            f"{torch.__version__}); use --device cpu or --device auto"
        )
    return torch.device(str(device))


def resolve_dtype(dtype: DType, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA (half the memory, tensor cores), float32 on CPU (exact, fast)."""
    if dtype == DType.AUTO:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def max_context_of(config: Any, tokenizer: Any) -> int:
    """How many tokens (prompt + virtual + new) the model can attend to."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < _UNBOUNDED:
        return value
    return DEFAULT_MAX_CONTEXT


def load_model(settings: Settings) -> LoadedModel:
    """Load --model on --device in --dtype, with torch's CPU threads sized first
    (server.engine.cpu_threads)."""
    apply_torch_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    return load_pretrained(model_source(settings), name=settings.model, device=device,
                           dtype=dtype, max_model_len=settings.max_model_len)


def _feed_lm_head_contiguous(model: Any) -> None:
    """Give the output projection a contiguous input.

    A prefill asks for the last position's logits only (logits_to_keep), so the LM head sees
    the strided slice hidden[:, -1:, :]. With frozen weights, torch's matmul does not fold such
    an input into one matrix product: it expands the [vocab, hidden] weight once per row and
    copies it (12x slower prefill for a 1B-shaped model in bf16 on the CPU). Copying the small
    slice instead keeps it one matrix product.
    """
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))


def load_pretrained(source: str | Path, *, name: str, device: torch.device,
                    dtype: torch.dtype, max_model_len: int = 0) -> LoadedModel:
    """AutoConfig decides causal vs seq2seq; the weights are frozen for serving.
    `max_model_len` (0: none) caps the context requests may use."""
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise load_error(name, e) from e
    tokenizer = load_tokenizer(source, name=name)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"--model {name!r}: the weights could not be loaded as {auto.__name__}: "
            f"{type(e).__name__}: {e}"
        ) from e
    try:
        model.to(device)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        raise ModelLoadError(f"--model {name!r} does not fit on --device {device}: {e}") from e
    model.eval()
    model.requires_grad_(False)
    _feed_lm_head_contiguous(model)
    hidden = int(model.get_input_embeddings().weight.shape[1])
    info = ModelInfo(
        name=name,
        architecture=(getattr(config, "architectures", None) or [type(model).__name__])[0],
        is_seq2seq=seq2seq,
        hidden_size=hidden,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        max_context=min(max_context_of(config, tokenizer),
                        max_model_len or _UNBOUNDED),
        vocab_size=int(model.get_input_embeddings().weight.shape[0]),
    )
    log.info("loaded model %s (%s) on %s in %s: hidden %s, max context %s",
             name, info.architecture, info.device, info.dtype, hidden, info.max_context)
    return LoadedModel(
        model=model, tokenizer=tokenizer, info=info,
        task_type=TaskType.SEQ_2_SEQ_LM if seq2seq else TaskType.CAUSAL_LM,
        device=device, dtype=dtype, vocab_size=info.vocab_size,
    )
