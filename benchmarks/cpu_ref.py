"""The `cpu-ref` reference workload of the engine issue, measured side by side in one run.

Run: ``python benchmarks/cpu_ref.py [--repeats 2] [--peft-sample 4]``

Workload: a GPT-2-small-shaped model (12 layers, 768 hidden, vocab 50257, random init), float32
on the CPU; 32 requests, each with its own prompt-tuning adapter (20 virtual tokens, random
embeddings, written in PEFT's format and uploaded into a temp store), 32 random token ids in,
32 tokens out (ignore_eos). Three ways:

  (a) engine  - the Engine, all 32 submitted concurrently, max_batch_size 32 (adapters already
                resident: a warm-up round loads them first, as in steady-state serving);
  (b) plain   - one model.generate over 32 rows of 52 token ids (same total length, no adapters):
                the ceiling for a batched server on this model;
  (c) peft    - one PeftModel holding all 32 adapters, serving requests one at a time with
                set_adapter; only --peft-sample requests are timed and the per-request time is
                extrapolated to 32 (said in the printout).

Generated tokens per second are printed for each, with the ratios against the targets
(engine >= 0.9x plain, >= 5x peft). Each measurement is repeated and the best is kept: other
processes share the cores, and the best run is the least disturbed one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

from adapters_store import LocalAdapterStore
from server.config import Device, Settings
from server.engine import Engine
from server.engine.interface import AdapterUpload, GenerationRequest, SamplingParams

VOCAB, HIDDEN, LAYERS = 50257, 768, 12
N_REQUESTS, VIRTUAL, PROMPT, NEW = 32, 20, 32, 32
EOS = VOCAB - 1


def build_model(out: Path) -> Path:
    """Random GPT-2-small shape; a word-level tokenizer over the 50257 ids (text is irrelevant)."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=12,
                        n_positions=1024, bos_token_id=EOS, eos_token_id=EOS)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(out)
    vocab = {f"<t{i}>": i for i in range(VOCAB)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<t0>")),
        eos_token=f"<t{EOS}>", pad_token=f"<t{EOS}>", unk_token="<t0>", padding_side="left")
    tok.save_pretrained(out)
    return out


def write_adapters(root: Path) -> list[Path]:
    """32 adapter directories exactly as PEFT's save_pretrained writes prompt tuning."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    dirs = []
    for i in range(N_REQUESTS):
        d = root / f"a{i}"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
            "num_virtual_tokens": VIRTUAL, "token_dim": HIDDEN,
            "num_transformer_submodules": 1, "num_attention_heads": 12, "num_layers": LAYERS,
            "prompt_tuning_init": "RANDOM", "base_model_name_or_path": None,
            "inference_mode": True,
        }))
        emb = torch.randn(VIRTUAL, HIDDEN, generator=gen) * 0.1
        save_file({"prompt_embeddings": emb}, str(d / "adapter_model.safetensors"))
        dirs.append(d)
    return dirs


async def engine_round(engine: Engine, prompts: list[list[int]]) -> float:
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    reqs = [GenerationRequest(request_id=f"r{time.monotonic_ns()}-{i}", prompt_ids=tuple(p),
                              adapter_id=f"a{i}", namespace="bench", params=params)
            for i, p in enumerate(prompts)]
    start = time.perf_counter()
    results = await asyncio.gather(*(engine.generate(r) for r in reqs))
    elapsed = time.perf_counter() - start
    assert all(r.completion_tokens == NEW for r in results)
    return elapsed


async def start_engine(model_dir: Path, adapters: list[Path], work: Path) -> Engine:
    settings = Settings(model=str(model_dir), store=str(work / "store"), device=Device.CPU,
                        max_batch_size=N_REQUESTS, max_wait_ms=50, max_queue=1024)
    engine = Engine(settings, LocalAdapterStore(settings.store))
    engine.start()
    await asyncio.to_thread(engine.wait_until_ready, 600)
    for i, d in enumerate(adapters):
        await engine.add_adapter("bench", f"a{i}", AdapterUpload(
            config_path=str(d / "adapter_config.json"),
            weights_path=str(d / "adapter_model.safetensors"),
            weights_name="adapter_model.safetensors"))
    return engine


def plain_runner(model_dir: Path, prompts: list[list[int]]) -> Callable[[], float]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(2)
    ids = torch.cat([torch.tensor(prompts),
                     torch.randint(0, VOCAB, (N_REQUESTS, VIRTUAL), generator=gen)], dim=1)

    def once() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                 pad_token_id=EOS)
        assert out.shape[1] == PROMPT + VIRTUAL + NEW
        return time.perf_counter() - start

    return once


def peft_runner(model_dir: Path, adapters: list[Path], prompts: list[list[int]],
                sample: int) -> Callable[[], float]:
    """Seconds for all 32 requests, extrapolated from `sample` timed ones."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name="a0").eval()
    for i, d in enumerate(adapters[1:], start=1):
        peft.load_adapter(str(d), adapter_name=f"a{i}")
    turn = iter(range(10**9))

    def one(i: int) -> None:
        peft.set_adapter(f"a{i}")
        ids = torch.tensor([prompts[i]])
        with torch.inference_mode():
            out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                pad_token_id=EOS)
        assert out.shape[1] == PROMPT + NEW

    def once() -> float:
        first = next(turn) * sample  # a different slice of adapters each repeat
        start = time.perf_counter()
        for k in range(sample):
            one((first + k) % N_REQUESTS)
        return (time.perf_counter() - start) / sample * N_REQUESTS

    return once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--peft-sample", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, VOCAB, (N_REQUESTS, PROMPT), generator=gen).tolist()
    tokens = N_REQUESTS * NEW
    print(f"cpu-ref: GPT-2-small shape ({LAYERS} layers, {HIDDEN} hidden, vocab {VOCAB}, random), "
          f"float32, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"  {N_REQUESTS} requests x ({VIRTUAL} virtual + {PROMPT} tokens in, {NEW} out); "
          f"best of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_model(work / "model")
        adapters = write_adapters(work / "adapters")
        loop = asyncio.new_event_loop()
        engine = loop.run_until_complete(start_engine(model_dir, adapters, work))
        plain_once = plain_runner(model_dir, prompts)
        peft_once = peft_runner(model_dir, adapters, prompts, args.peft_sample)
        runners: dict[str, Callable[[], float]] = {
            "engine": lambda: loop.run_until_complete(engine_round(engine, prompts)),
            "plain": plain_once,
            "peft": peft_once,
        }
        for run in runners.values():  # warm-up; the engine's also loads its 32 adapters
            run()
        # Interleaved, so a burst of load from other processes hits all three alike.
        runs: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, run in runners.items():
                runs[name].append(run())
        loop.run_until_complete(engine.aclose(60))
        loop.close()
    eng, plain, peft = (min(runs[n]) for n in ("engine", "plain", "peft"))
    eng_all, plain_all, peft_all = runs["engine"], runs["plain"], runs["peft"]

    def line(name: str, best: float, runs: list[float], note: str = "") -> None:
        shown = ", ".join(f"{t:.2f}" for t in runs)
        print(f"  {name:<7} {tokens / best:8.1f} tok/s   {best:7.2f} s  (runs: {shown} s){note}")

    line("engine", eng, eng_all)
    line("plain", plain, plain_all, "  [one generate, 52 ids/row, no adapters]")
    line("peft", peft, peft_all,
         f"  [{args.peft_sample} requests timed one at a time, extrapolated to {N_REQUESTS}]")
    print(f"  engine / plain = {plain / eng:.2f}x  (target >= 0.9x)")
    print(f"  engine / peft  = {peft / eng:.2f}x  (target >= 5x)")


if __name__ == "__main__":
    main()
