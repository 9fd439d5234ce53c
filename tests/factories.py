"""Tiny models built from config and real adapters made by PEFT. No network, no hub.

Each architecture gets its own hidden size so a token_dim mix-up cannot pass by accident.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BloomConfig,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
    T5Config,
)

from server.engine.byte_tokenizer import (
    BOS_ID,
    BYTE_VOCAB_SIZE,
    EOS_ID,
    PAD_ID,
    make_byte_tokenizer,
)

ARCHS = ("gpt2", "llama", "qwen2", "bloom", "t5")
ADAPTER_KINDS = ("prompt_tuning", "p_tuning_mlp", "p_tuning_lstm")
_IDS = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}


def tiny_config(arch: str):
    v = BYTE_VOCAB_SIZE
    if arch == "gpt2":
        return GPT2Config(vocab_size=v, n_embd=48, n_layer=2, n_head=4, n_positions=512, **_IDS)
    if arch == "llama":
        return LlamaConfig(vocab_size=v, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=512, **_IDS)
    if arch == "llama-hd32":  # vLLM's CPU attention takes heads of 32 dimensions and up
        return LlamaConfig(vocab_size=v, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=32, max_position_embeddings=512, **_IDS)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=v, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=512, **_IDS)
    if arch == "bloom":
        # Untied: with tied embeddings a random BLOOM's greedy output repeats one token.
        return BloomConfig(vocab_size=v, hidden_size=40, n_layer=2, n_head=4,
                           tie_word_embeddings=False, **_IDS)
    if arch == "t5":
        return T5Config(vocab_size=v, d_model=56, d_kv=14, d_ff=112, num_layers=2,
                        num_decoder_layers=2, num_heads=4, decoder_start_token_id=PAD_ID,
                        # T5 v1.1 / Flan-T5 layout. The v1.0 ReLU feed-forward's positive mean
                        # swamps a random decoder, whose greedy output then repeats one token.
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False, **_IDS)
    raise ValueError(arch)


def is_seq2seq(arch: str) -> bool:
    return arch == "t5"


def build_tiny_model(arch: str, out_dir: Path, *, seed: int = 0) -> Path:
    """Random tiny model + byte tokenizer saved with save_pretrained into out_dir."""
    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    auto = AutoModelForSeq2SeqLM if is_seq2seq(arch) else AutoModelForCausalLM
    model = auto.from_config(cfg)
    # Random init at std 0.02 gives near-flat logits and argmax ties; widen the output spread
    # so greedy decoding is decided by a margin, not by rounding.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    make_byte_tokenizer(seq2seq=is_seq2seq(arch)).save_pretrained(out_dir)
    return out_dir


def load_base(model_dir: Path):
    cfg = json.loads((model_dir / "config.json").read_text())
    auto = AutoModelForSeq2SeqLM if cfg.get("is_encoder_decoder") else AutoModelForCausalLM
    return auto.from_pretrained(model_dir, dtype=torch.float32).eval()


def _peft_config(kind: str, task_type: str, num_virtual_tokens: int, **kw):
    from peft import PromptEncoderConfig, PromptTuningConfig

    if kind == "prompt_tuning":
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens, **kw)
    reparam = {"p_tuning_mlp": "MLP", "p_tuning_lstm": "LSTM"}[kind]
    kw.setdefault("encoder_hidden_size", 24)
    if reparam == "LSTM":
        kw.setdefault("encoder_num_layers", 2)
    return PromptEncoderConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens,
                               encoder_reparameterization_type=reparam, **kw)


def make_peft_model(model_dir: Path, kind: str, *, num_virtual_tokens: int = 8, seed: int = 1,
                    **config_kw):
    """A PEFT model with freshly initialized (seeded) prompt parameters."""
    from peft import get_peft_model

    base = load_base(model_dir)
    task_type = "SEQ_2_SEQ_LM" if base.config.is_encoder_decoder else "CAUSAL_LM"
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, _peft_config(kind, task_type, num_virtual_tokens,
                                                   **config_kw))
    if kind == "prompt_tuning":
        with torch.no_grad():
            emb = peft_model.prompt_encoder["default"].embedding.weight
            emb.normal_(0.0, 1.0)
    return peft_model.eval()


def make_adapter(model_dir: Path, out_dir: Path, kind: str, *, num_virtual_tokens: int = 8,
                 seed: int = 1, **config_kw) -> Path:
    """An adapter directory exactly as PEFT's save_pretrained writes it."""
    peft_model = make_peft_model(model_dir, kind, num_virtual_tokens=num_virtual_tokens,
                                 seed=seed, **config_kw)
    peft_model.save_pretrained(out_dir)
    return out_dir


def make_encoder_checkpoint(model_dir: Path, out_dir: Path, kind: str, *,
                            num_virtual_tokens: int = 8, seed: int = 1, strip_prefix: bool = False,
                            reference_dir: Path | None = None, **config_kw) -> Path:
    """A P-tuning training checkpoint: the raw prompt-encoder weights (not collapsed).

    When reference_dir is given, the same model's save_pretrained output is written there, so
    a test can compare the collapse against PEFT's own.
    """
    assert kind in ("p_tuning_mlp", "p_tuning_lstm")
    peft_model = make_peft_model(model_dir, kind, num_virtual_tokens=num_virtual_tokens,
                                 seed=seed, **config_kw)
    prefix = "prompt_encoder.default."
    tensors = {
        (k[len(prefix):] if strip_prefix else k): v.detach().clone().contiguous()
        for k, v in peft_model.state_dict().items()
        if k.startswith(prefix)
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.peft_config["default"].save_pretrained(out_dir)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    if reference_dir is not None:
        peft_model.save_pretrained(reference_dir)
    return out_dir


def peft_reference_generate(model_dir: Path, adapter_dir: Path | None, prompt_ids: list[int],
                            max_new_tokens: int) -> list[int]:
    """The reference semantics: PEFT's greedy output for this request run alone (float32)."""
    base = load_base(model_dir)
    if adapter_dir is None:
        model = base
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=PAD_ID)
    if base.config.is_encoder_decoder:
        seq = out[0].tolist()[1:]  # drop decoder_start_token
    else:
        seq = out[0].tolist()[len(prompt_ids):]
    return seq


def load_peft_reference(model_dir: Path, adapter_dir: Path | None):
    """The model peft_reference_generate builds, loaded once so a test can reuse it per request."""
    base = load_base(model_dir)
    if adapter_dir is None:
        return base
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def reference_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """peft_reference_generate's decoding on an already loaded model (same arguments)."""
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=PAD_ID)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config.is_encoder_decoder:
        return out[0].tolist()[1:]  # drop decoder_start_token
    return out[0].tolist()[len(prompt_ids):]


def load_prompt_embeddings(adapter_dir: Path, *, seq2seq: bool = False) -> torch.Tensor:
    """The saved `prompt_embeddings` tensor [num_virtual_tokens, hidden] of a PEFT output dir.

    Seq2seq adapters store 2 * num_virtual_tokens rows (encoder and decoder); PEFT prepends only
    the first num_virtual_tokens on the encoder side, so that is what is returned.
    """
    from safetensors.torch import load_file

    emb = load_file(str(adapter_dir / "adapter_model.safetensors"))["prompt_embeddings"]
    n = json.loads((adapter_dir / "adapter_config.json").read_text())["num_virtual_tokens"]
    return emb[:n] if seq2seq else emb


def peft_prompt(model_dir: Path, adapter_dir: Path) -> torch.Tensor:
    """The adapter's rows as PEFT's get_prompt gives them: the definition's soft prompt."""
    from peft import PeftModel

    peft = PeftModel.from_pretrained(load_base(model_dir), str(adapter_dir)).eval()
    with torch.inference_mode():
        return peft.get_prompt(batch_size=1)[0].detach().clone()


def greedy_by_recomputation(base, prompt: torch.Tensor | None, text_ids: list[int], n: int, *,
                            stop_at_eos: bool = True) -> list[int]:
    """The definition of a request's output: greedy by full recomputation over [prompt rows;
    text embeddings] (then the drawn tokens' embeddings)."""
    with torch.inference_mode():
        x = base.get_input_embeddings()(torch.tensor(text_ids, dtype=torch.long))
        if prompt is not None:
            x = torch.cat([prompt, x])
    return greedy_from_embeddings(base, x, n, stop_at_eos=stop_at_eos)


def penalized_greedy(base, prompt: torch.Tensor | None, text_ids: list[int], n: int, *,
                     presence: float, frequency: float, repetition: float) -> list[int]:
    """Greedy by recomputation with the penalties as defined: the repetition penalty over the
    text's and drawn tokens (positive logits divided, negative multiplied), then presence once
    and frequency per occurrence of each drawn token subtracted."""
    drawn: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            x = base.get_input_embeddings()(torch.tensor([*text_ids, *drawn], dtype=torch.long))
            if prompt is not None:
                x = torch.cat([prompt, x])
            logits = base(inputs_embeds=x[None]).logits[0, -1].float().clone()
            for token in set(text_ids) | set(drawn):
                value = logits[token]
                logits[token] = value / repetition if value > 0 else value * repetition
            for token in set(drawn):
                logits[token] -= frequency * drawn.count(token) + presence
            drawn.append(int(logits.argmax()))
    return drawn


def with_chat_template(model_dir: Path, out: Path) -> Path:
    """A copy of model_dir whose tokenizer has the built-in minimal chat template."""
    from server.engine.builtin import CHAT_TEMPLATE

    shutil.copytree(model_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


UNEMBEDDABLE_TOKENS = ("<|tool|>", "<|image|>")


def with_unembeddable_tokens(model_dir: Path, out: Path) -> Path:
    """A copy of model_dir whose tokenizer knows special tokens the model's embedding has no
    rows for (added without resizing, as many checkpoints ship): ids from the embedding's size
    up."""
    shutil.copytree(model_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.add_special_tokens({"additional_special_tokens": list(UNEMBEDDABLE_TOKENS)})
    tokenizer.save_pretrained(out)
    return out


def spliced_embeddings(base, pieces: list[torch.Tensor | list[int]]) -> torch.Tensor:
    """A template's input: soft rows (tensors) and token ids (lists) embedded, in order."""
    embed = base.get_input_embeddings()
    with torch.inference_mode():
        return torch.cat([p if isinstance(p, torch.Tensor)
                          else embed(torch.tensor(p, dtype=torch.long)) for p in pieces])


def greedy_from_embeddings(base, embeds: torch.Tensor, n: int, *,
                           stop_at_eos: bool = True) -> list[int]:
    """Greedy by full recomputation in float32 from input embeddings [length, hidden]. A
    decoder-only model reads them and then each drawn token's embedding; a seq2seq model's
    encoder reads them and its decoder recomputes from the decoder start token."""
    eos = base.generation_config.eos_token_id
    out: list[int] = []
    with torch.inference_mode():
        if base.config.is_encoder_decoder:
            encoded = base.get_encoder()(inputs_embeds=embeds[None])
            decoder = [base.config.decoder_start_token_id]
        x = embeds
        for _ in range(n):
            if base.config.is_encoder_decoder:
                logits = base(encoder_outputs=encoded, use_cache=False,
                              decoder_input_ids=torch.tensor([decoder])).logits[0, -1]
            else:
                logits = base(inputs_embeds=x[None], use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            if base.config.is_encoder_decoder:
                decoder.append(token)
            else:
                token_embed = base.get_input_embeddings()(torch.tensor([token]))
                x = torch.cat([x, token_embed])
            if stop_at_eos and token == eos:
                break
    return out


def templated_reference(model_dir: Path, adapter_dir: Path, rows: int, text_ids: list[int],
                        n: int) -> list[int]:
    """The definition for "{soft:2} Review: {text} {soft} Sentiment:": the adapter's rows and
    the anchors' and text's token embeddings spliced in that order, greedy by recomputation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = load_base(model_dir)
    prompt = peft_prompt(model_dir, adapter_dir)[:rows]  # seq2seq: the first n of 2n

    def anchor(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    embeds = spliced_embeddings(base, [prompt[:2], anchor(" Review: "), text_ids, anchor(" "),
                                       prompt[2:], anchor(" Sentiment:")])
    return greedy_from_embeddings(base, embeds, n)
