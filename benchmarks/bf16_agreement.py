"""bfloat16 agreement report: how often the engine in bf16 reproduces PEFT's float32 output.

Greedy decoding in bf16 drifts from float32 once two logits are closer than bf16 can tell
apart; after the first differing token the rest of the row usually differs too. So this is a
report, not a test: per architecture, the mixed batch (every adapter type, raw P-tuning encoders
collapsed by adapters_store, bare rows) runs through run_batch in bfloat16 and is compared
with PEFT's float32 output for each request alone.

    python -m benchmarks.bf16_agreement [--device cpu|cuda] [--rows 32] [--new-tokens 16]
                                        [--dtype bfloat16|float16|float32]

`--dtype float32` is the control: it must print 100% everywhere (the parity tests' claim).

Tiny random models are used (no download); their text is not meaningful. Prints only.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from adapters_store import ModelSpec, parse_directory
from server.engine.generation import run_batch
from server.engine.interface import SamplingParams
from server.engine.rows import BatchRow
from tests.factories import (
    ARCHS,
    build_tiny_model,
    is_seq2seq,
    load_base,
    load_peft_reference,
    load_prompt_embeddings,
    make_adapter,
    make_encoder_checkpoint,
    reference_greedy,
)

# (kind, num_virtual_tokens, raw encoder checkpoint?)
ADAPTERS = (
    ("prompt_tuning", 3, False),
    ("p_tuning_mlp", 6, False),
    ("p_tuning_lstm", 9, False),
    ("prompt_tuning", 12, False),
    ("p_tuning_mlp", 5, True),
    ("p_tuning_lstm", 4, True),
)
TEXTS = (
    "Tweet: I love it. Label:",
    "a",
    "The quick brown fox jumps over the lazy dog",
    "Hi!",
    "Résumé: naïve café ☕",
    "Question: what is 2 + 2? Answer:",
    "lorem ipsum dolor sit amet",
)


@dataclass(frozen=True)
class ArchReport:
    arch: str
    rows: int
    rows_equal: int
    tokens: int
    tokens_equal: int  # position-wise equal tokens over the reference's length
    prefix_tokens: int  # tokens before each row's first difference
    seconds: float


def _adapters(model_dir: Path, root: Path, hidden: int, seq2seq: bool):
    """[(PEFT dir for the float32 reference, float32 soft prompt as the server would serve it)]"""
    out = []
    for i, (kind, n, raw) in enumerate(ADAPTERS):
        peft_dir = root / f"adapter-{i}"
        if raw:
            raw_dir = make_encoder_checkpoint(model_dir, root / f"raw-{i}", kind,
                                              num_virtual_tokens=n, seed=10 + i,
                                              reference_dir=peft_dir)
            parsed = parse_directory(raw_dir, spec=ModelSpec(token_dim=hidden))
            out.append((peft_dir, parsed.embeddings[: parsed.num_virtual_tokens]))
        else:
            make_adapter(model_dir, peft_dir, kind, num_virtual_tokens=n, seed=10 + i)
            out.append((peft_dir, load_prompt_embeddings(peft_dir, seq2seq=seq2seq)))
    return out


def measure(arch: str, root: Path, *, device: str, dtype: torch.dtype, rows: int,
            new_tokens: int) -> ArchReport:
    model_dir = build_tiny_model(arch, root / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    f32 = load_base(model_dir)
    hidden = f32.get_input_embeddings().weight.shape[1]
    adapters = _adapters(model_dir, root, hidden, is_seq2seq(arch))

    # Request i: adapter i % (n + 1), the last slot meaning the bare model.
    requests = []
    for i in range(rows):
        slot = i % (len(adapters) + 1)
        requests.append((TEXTS[i % len(TEXTS)], None if slot == len(adapters) else slot))

    model = load_base(model_dir).to(device=device, dtype=dtype)
    batch = [
        BatchRow(
            prompt_ids=tokenizer(text)["input_ids"],
            prompt_embeds=None if a is None
            else adapters[a][1].to(device=device, dtype=dtype),
            params=SamplingParams(max_new_tokens=new_tokens),
        )
        for text, a in requests
    ]
    start = time.perf_counter()
    outputs = run_batch(model, tokenizer, batch)
    seconds = time.perf_counter() - start

    references = {None: f32}
    references.update({i: load_peft_reference(model_dir, d) for i, (d, _) in enumerate(adapters)})
    rows_equal = tokens = tokens_equal = prefix = 0
    for (_, a), row, out in zip(requests, batch, outputs, strict=True):
        expected = reference_greedy(references[a], list(row.prompt_ids), new_tokens)
        got = list(out.token_ids)
        rows_equal += got == expected
        tokens += len(expected)
        tokens_equal += sum(x == y for x, y in zip(got, expected, strict=False))
        prefix += next((j for j, (x, y) in enumerate(zip(got, expected, strict=False)) if x != y),
                       min(len(got), len(expected)))
    return ArchReport(arch, len(requests), rows_equal, tokens, tokens_equal, prefix, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    print(f"{args.dtype} engine vs float32 PEFT alone; device={args.device}, {args.rows} mixed "
          f"rows per architecture, {args.new_tokens} greedy tokens; tiny random models "
          "(text meaningless)")
    print(f"{'arch':6s} {'rows equal':>12s} {'tokens equal':>16s} {'prefix agree':>16s} "
          f"{'batch s':>8s}")
    totals = [0, 0, 0, 0, 0]
    for arch in ARCHS:
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(arch, Path(tmp), device=args.device, dtype=dtype, rows=args.rows,
                        new_tokens=args.new_tokens)
        totals = [t + v for t, v in zip(totals, (r.rows, r.rows_equal, r.tokens,
                                                   r.tokens_equal, r.prefix_tokens), strict=True)]
        print(f"{r.arch:6s} {r.rows_equal:4d}/{r.rows:<3d} {r.rows_equal / r.rows:4.0%} "
              f"{r.tokens_equal:5d}/{r.tokens:<5d} {r.tokens_equal / r.tokens:4.0%} "
              f"{r.prefix_tokens:5d}/{r.tokens:<5d} {r.prefix_tokens / r.tokens:4.0%} "
              f"{r.seconds:8.2f}")
    rows, rows_eq, tokens, tok_eq, prefix = totals
    print(f"{'all':6s} {rows_eq:4d}/{rows:<3d} {rows_eq / rows:4.0%} "
          f"{tok_eq:5d}/{tokens:<5d} {tok_eq / tokens:4.0%} "
          f"{prefix:5d}/{tokens:<5d} {prefix / tokens:4.0%}")


if __name__ == "__main__":
    main()
