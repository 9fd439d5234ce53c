"""Time to first token against soft-prompt length, with and without the prefix cache.

Runs benchmarks/long_prompts.py (the real server over HTTP, one request at a time, each
adapter's prefix warm) for each length, prefix cache on and off, and plots the median warm
TTFT beside the bare model's for the same texts.

    python -m benchmarks.plots.ttft_prompt_length                      # CPU, GPT-2-small shape
    python -m benchmarks.plots.ttft_prompt_length --device cuda --dtype bfloat16

Writes docs/img/ttft-prompt-length.png and benchmarks/results/ttft-prompt-length.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.plots.figure import REPO, axes, commit

LENGTHS = (16, 64, 128, 256)


def _run(length: int, args: argparse.Namespace, out: Path) -> dict:
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "long_prompts.py"),
                    "--virtual-tokens", str(length), "--device", args.device,
                    "--dtype", args.dtype, "--requests", str(args.requests),
                    "--samples", str(args.samples), "--json", str(out),
                    *(["--layers", str(args.layers)] if args.layers else [])],
                   check=True, cwd=REPO)
    return json.loads(out.read_text())


def _plot(rows: list[dict], out: Path, title: str) -> None:
    xs = [r["virtual_tokens"] for r in rows]
    with axes(out, title) as ax:
        for mode, label in (("prefix-cache", "prefix cache (default)"),
                            ("no-prefix-cache", "--no-prefix-cache")):
            ax.plot(xs, [r[mode] for r in rows], marker="o", label=label)
        ax.plot(xs, [r["bare"] for r in rows], color="grey", linestyle="--",
                label="bare model, same texts")
        ax.set_xlabel("virtual tokens of the adapter")
        ax.set_ylabel("median time to first token (ms)")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylim(0, None)
        ax.legend(fontsize=8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--requests", type=int, default=16, help="the throughput part's")
    parser.add_argument("--samples", type=int, default=12, help="TTFT samples per point")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (quick runs)")
    parser.add_argument("--png", type=Path, default=REPO / "docs/img/ttft-prompt-length.png")
    parser.add_argument("--json", type=Path,
                        default=REPO / "benchmarks/results/ttft-prompt-length.json")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ttft-length-") as tmp:
        for length in (int(x) for x in args.lengths.split(",")):
            result = _run(length, args, Path(tmp) / f"{length}.json")
            runs = result["runs"]
            rows.append({"virtual_tokens": length,
                         "prefix-cache": runs["prefix-cache"]["ttft_ms"]["warm_p50"],
                         "no-prefix-cache": runs["no-prefix-cache"]["ttft_ms"]["warm_p50"],
                         "bare": runs["prefix-cache"]["ttft_ms"]["bare_p50"]})
            print(json.dumps(rows[-1]), flush=True)
    measured_at = commit()
    title = (f"GPT-2-small shape, {args.dtype} on {args.device}, texts of 3-16 tokens, "
             f"over HTTP\ncommit {measured_at}")
    _plot(rows, args.png, title)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"commit": measured_at, "device": args.device,
                                     "dtype": args.dtype, "points": rows}, indent=2) + "\n")
    print(f"wrote {args.png} and {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
