"""Benchmark of adapters_store: parse + validate + store, load back, list 10,000.

Run: ``python benchmarks/store_bench.py [--root DIR]``. The root should be on the filesystem the
server will use (fsync cost is most of a put). Prints medians against the store's targets.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save

from adapters_store import LocalAdapterStore, ModelSpec, TaskType, parse_files

ROWS, DIM, LISTED = 20, 4096, 10_000
SPEC = ModelSpec(token_dim=DIM, task_type=TaskType.CAUSAL_LM)


def _adapter_files(rows: int, dim: int, seed: int = 0) -> tuple[bytes, bytes]:
    """What an upload of PEFT's save_pretrained output would carry (bf16, like a trained one)."""
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": rows,
              "token_dim": dim, "num_transformer_submodules": 1}
    table = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))
    return json.dumps(config).encode(), save({"prompt_embeddings": table.to(torch.bfloat16)})


def _median_ms(fn: Callable[[int], object], repeats: int) -> float:
    fn(-1)  # warm-up
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=None, help="store directory (default: temp)")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        store = LocalAdapterStore(Path(tmp) / "store")
        config, weights = _adapter_files(ROWS, DIM)

        def parse(i: int):
            return parse_files(config=config, weights=weights,
                               weights_name="adapter_model.safetensors", spec=SPEC)

        def put(i: int) -> None:
            store.put("bench", f"big{i % 5 + 5}", parse(i), overwrite=True)

        def fsync_4k(i: int) -> None:
            path = Path(tmp) / "probe"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.write(fd, bytes(4096))
            os.fsync(fd)
            os.close(fd)

        fsync_ms = _median_ms(fsync_4k, args.repeats)
        parse_ms = _median_ms(parse, args.repeats)
        put_ms = _median_ms(put, args.repeats)
        get_ms = _median_ms(lambda i: store.get("bench", f"big{i % 5 + 5}"), args.repeats * 4)

        small_config, small_weights = _adapter_files(1, 8)
        small = parse_files(config=small_config, weights=small_weights,
                            weights_name="adapter_model.safetensors", spec=ModelSpec(8))
        start = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:  # overlapping fsyncs: only to fill faster
            list(pool.map(lambda i: store.put(f"tenant{i % 100}", f"adapter{i}", small),
                          range(LISTED)))
        fill_s = time.perf_counter() - start
        list_ms = _median_ms(lambda i: store.list(), 5)
        listed = len(store.list())

    rows = [
        (f"parse+validate {ROWS}x{DIM} (bf16 upload)", parse_ms, float("nan")),
        (f"parse+validate+store {ROWS}x{DIM} (bf16 upload)", put_ms, 20.0),
        (f"load back {ROWS}x{DIM}", get_ms, 5.0),
        (f"list {listed:,} adapters", list_ms, 1000.0),
    ]
    print(f"{'operation':<44} {'median ms':>10} {'target ms':>10}  ok")
    for name, measured, target in rows:
        ok = "" if target != target else "yes" if measured < target else "NO"
        print(f"{name:<44} {measured:>10.2f} {target:>10.0f}  {ok}")
    print(f"{'disk baseline: write+fsync 4 KiB':<44} {fsync_ms:>10.2f}")
    print(f"(filling {LISTED:,} small adapters with 16 threads took {fill_s:.1f} s; a put "
          "is 6 fsyncs, so its time follows the disk baseline)")


if __name__ == "__main__":
    main()
