"""`builtin:tiny`: a small random Llama-shaped model so the server runs offline with no download.

THE TEXT IT GENERATES IS NOT MEANINGFUL: the weights are random numbers drawn from a fixed seed.
It exists so the quickstart, the tests and the CI run everything (adapters, batching, streaming)
without network access. The model is written once to `<model_cache>/builtin-tiny-v1` (atomically:
a temp directory renamed into place) and then loaded through the ordinary `from_pretrained`
path, so it exercises exactly the code a real model does.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from server.engine.builtin_names import BUILTIN_PREFIX, BUILTIN_VERSIONS, builtin_names
from server.engine.byte_tokenizer import (
    BOS_ID,
    BYTE_VOCAB_SIZE,
    EOS_ID,
    PAD_ID,
    make_byte_tokenizer,
)

log = logging.getLogger(__name__)

_SEED = 20240501
_INIT_STD = 0.2  # wider than HF's 0.02 so greedy decoding is not decided by argmax ties

# A minimal chat format so chat endpoints have a template to apply; the model was never
# trained on it (or on anything).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=128, intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, tie_word_embeddings=False,
    )


def build_tiny(out_dir: Path) -> None:
    """Write the model and its byte tokenizer; the same bytes of weights on every machine."""
    generator = torch.Generator().manual_seed(_SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = AutoModelForCausalLM.from_config(tiny_config())
    with torch.no_grad():
        # Re-draw every matrix from our own generator, in name order: independent of the
        # init code of the installed transformers version. Norm weights stay at one.
        for _, param in sorted(model.named_parameters()):
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * _INIT_STD)
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer = make_byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)


def ensure_builtin(name: str, cache_dir: Path) -> Path:
    """The directory of builtin model `name` (e.g. "builtin:tiny"), building it on first use.

    Raises ValueError for an unknown built-in name.
    """
    kind = name.removeprefix(BUILTIN_PREFIX)
    if kind not in BUILTIN_VERSIONS:
        raise ValueError(
            f"--model {name!r} is not a built-in model; built-in models: "
            + ", ".join(builtin_names())
        )
    log.warning("--model %s: a random model from a fixed seed; its output text is NOT "
                "meaningful (it exists so the server runs offline)", name)
    target = cache_dir / BUILTIN_VERSIONS[kind]
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{BUILTIN_VERSIONS[kind]}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        build_tiny(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent builder's win
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built %s into %s", name, target)
    return target
