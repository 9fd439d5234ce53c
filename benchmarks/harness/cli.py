"""`python -m benchmarks <workload>`: run one named workload against its baselines, side by side.

Prints a table (tokens/s, requests/s, p50/p99 latency and time to first token per system, then
each server system's throughput ratio against each baseline) and writes the same as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.harness import fixtures
from benchmarks.harness.results import (
    Run,
    SystemResult,
    environment,
    print_table,
    report,
    write_json,
)
from benchmarks.harness.server_log import exit_on_signal, show_log
from benchmarks.harness.workloads import (
    SCENARIOS,
    WORKLOADS,
    Workload,
    check_vllm_shape,
    model_line,
)

MODES = ("engine", "http")
BASELINES = ("plain", "hf-static-compile", "peft-sequential", "peft-batched", "vllm-peer")
ENGINES = ("builtin", "vllm")
LABELS = {"engine": "engine (in process)", "http": "HTTP server, concurrent clients",
          "plain": "plain HF generate, no adapters",
          "hf-static-compile": "HF static cache + torch.compile, no adapters",
          "peft-sequential": "PEFT one at a time",
          "peft-batched": "PEFT batched, single adapter",
          "vllm-peer": "vLLM OpenAI server, prompt_embeds"}
HTTP_VLLM_LABEL = "HTTP server, vllm engine"
# Between timed runs beside a vLLM server: its worker busy-polls its input queue for a second
# after its last step (vLLM's shm_broadcast), which would take cores from the next run.
VLLM_SETTLE_S = 2.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("workload", choices=[*WORKLOADS, *SCENARIOS, "soak", "cpu-contention",
                                        "tools", "list"],
                   help="what to run; 'list' prints the workloads; 'soak', "
                        "'cpu-contention' and 'tools' have options of their own (python -m "
                        "benchmarks soak --help)")
    p.add_argument("--engine", choices=ENGINES, default="builtin",
                   help="the engine the http system's server runs (its --engine; default "
                        "builtin). vllm: --kv-cache-memory twice what the workload's rows "
                        "take (cpu-ref: 1GiB); measures the http system against the "
                        "vllm-peer baseline by default")
    p.add_argument("--modes", default=None,
                   help="server systems to measure: engine, http or both (default both; "
                        "with --engine vllm, http)")
    p.add_argument("--baselines", default=None,
                   help="comma-separated subset of plain,hf-static-compile,peft-sequential,"
                        "peft-batched,vllm-peer (default: the workload's; with --engine "
                        "vllm, vllm-peer)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per system, interleaved; the best is reported "
                        "(default 2; 1 for many-adapters, whose first run is the cold one)")
    p.add_argument("--json", type=Path, default=None,
                   help="where to write the JSON (default benchmarks/results/<workload>.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--max-wait-ms", type=float, default=50.0,
                   help="server's --max-wait-ms (default 50)")
    p.add_argument("--batching", choices=("core", "static"),
                   default="core",
                   help="server's --batching (default core, as the server)")
    p.add_argument("--engine-process", action="store_true",
                   help="the http system's server runs its engine in a child process "
                        "(--engine-process)")
    p.add_argument("--overhead-requests", type=int, default=0,
                   help="also measure the HTTP layer's overhead with N sequential 1-token "
                        "requests (default 0: skip)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="keep the model and store here instead of a temp dir")
    over = p.add_argument_group("overrides (the run is then marked as not the reference "
                                "workload)")
    for name, kind in (("device", str), ("dtype", str), ("requests", int), ("adapters", int),
                       ("new_tokens", int), ("new_tokens_max", int), ("prompt_tokens", int),
                       ("max_batch_size", int), ("peft_sample", int), ("layers", int),
                       ("vocab", int), ("cache_adapters", int)):
        over.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    fair = p.add_argument_group("fairness")
    fair.add_argument("--policy", choices=("round_robin", "fifo"), default="round_robin")
    fair.add_argument("--backlog", type=int, default=200)
    fair.add_argument("--rounds", type=int, default=6,
                      help="B rounds per phase and cycle")
    fair.add_argument("--cycles", type=int, default=3,
                      help="idle and loaded phases alternate this many times")
    fair.add_argument("--contended-tenant-rows", type=int, default=0,
                      help="the engine's --contended-tenant-rows (0: auto)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["soak"]:  # the real server over time, not measured against baselines
        from benchmarks.soak import main as soak

        return soak(argv[1:])
    if argv[:1] == ["cpu-contention"]:  # the real server quiet and beside a busy core
        from benchmarks.cpu_contention import main as contention

        return contention(argv[1:])
    if argv[:1] == ["tools"]:  # guidellm, aiperf, litellm unchanged against the real server
        from benchmarks.tools.cli import main as tools

        return tools(argv[1:])
    args = build_parser().parse_args(argv)
    # A time limit's SIGTERM unwinds like an error: the servers stop and their log is shown.
    signal.signal(signal.SIGTERM, exit_on_signal)
    if args.workload == "list":
        for w in WORKLOADS.values():
            print(f"{w.name:<15} {w.description}")
        print(f"{'fairness':<15} tenant A keeps 200 requests queued, tenant B sends 5 at a time: "
              "B's median latency against an idle server (builtin:tiny, engine in process)")
        print(f"{'soak':<15} the real server for --minutes N under mixed multi-tenant load "
              "with adapter churn and disconnects: 5xx, latency over time, RSS growth")
        print(f"{'cpu-contention':<15} the real server's cpu-ref throughput beside a busy core, "
              "as a ratio to a quiet run, per --torch-threads setting")
        print(f"{'tools':<15} guidellm, aiperf and litellm, unchanged, against the real server "
              "with a small request count: every request must succeed")
        return 0
    # A run on the vllm engine keeps the builtin engine's figures for the same workload.
    name = args.workload + ("-vllm" if args.engine == "vllm" else "")
    out = args.json or Path(__file__).resolve().parents[1] / "results" / f"{name}.json"
    result = _fairness(args) if args.workload == "fairness" else _workload(args, out)
    write_json(result, out)
    print(f"\nJSON: {out}")
    return 0


def _fairness(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.fairness import fairness_report, run_fairness

    r = asyncio.run(run_fairness(policy=args.policy, backlog=args.backlog, rounds=args.rounds,
                                 cycles=args.cycles, batching=args.batching,
                                 device=args.device or "cpu",
                                 contended_tenant_rows=args.contended_tenant_rows,
                                 engine=args.engine))
    result = fairness_report(r)
    env = result["environment"]
    print(f"\nfairness ({args.policy}, {args.batching} batching, {r['device']}, "
          f"{r['model']}): {env['date']}, commit {env['commit']}")
    print(f"  B p50 idle {r['b_idle_ms']['p50']:.1f} ms, with A's backlog of {args.backlog} "
          f"{r['b_loaded_ms']['p50']:.1f} ms: ratio {r['ratio']:.2f}x (target <= 2x)")
    a = r["a_requests_per_s"]
    print(f"  A's requests/s alone {a['alone']:.0f}, beside B {a['beside_b']:.0f} "
          f"({r['cycles']} cycles of {r['rounds']} B rounds per phase)")
    return result


def _workload(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    base = WORKLOADS[args.workload]
    changes = {k: getattr(args, k) for k in ("device", "dtype", "requests", "adapters",
                                              "new_tokens", "new_tokens_max", "prompt_tokens",
                                              "max_batch_size", "peft_sample", "cache_adapters")}
    overrides = {k: v for k, v in changes.items() if v is not None}
    w = base.with_overrides(**changes)
    for name in ("layers", "vocab"):  # the model's shape: fewer layers, a smaller vocabulary
        if (value := getattr(args, name)) is not None:
            overrides[name] = value
            w = dataclasses.replace(w, shape=dataclasses.replace(w.shape, **{name: value}))
    if w.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{w.name} runs on CUDA and this machine has none; pass --device cpu "
                         "(and a smaller --layers/--requests) to try the code path here")
    vllm = args.engine == "vllm"
    modes_arg = args.modes if args.modes is not None else ("http" if vllm else "engine,http")
    modes = [m for m in modes_arg.split(",") if m]
    baselines = args.baselines.split(",") if args.baselines is not None else (
        ["vllm-peer"] if vllm else list(w.baselines))
    unknown = sorted(set(modes) - set(MODES)) + sorted(set(baselines) - set(BASELINES) - {""})
    if unknown:
        raise SystemExit(f"unknown system(s): {', '.join(unknown)}")
    _check_vllm(w, args, modes, baselines)
    repeats = args.repeats or (1 if w.zipf_s is not None else 2)
    with tempfile.TemporaryDirectory(prefix="softprompt-bench-") as tmp:
        work = args.work_dir or Path(tmp)
        return _measure(w, work, modes, [b for b in baselines if b], repeats, args, overrides,
                        out)


def _check_vllm(w: Workload, args: argparse.Namespace, modes: list[str],
                baselines: list[str]) -> None:
    """What the vLLM systems cannot run, refused before anything is built."""
    from benchmarks.harness.vllm_peer import require_vllm

    if args.engine == "vllm":
        if "engine" in modes:
            raise SystemExit("--engine vllm measures the real server (--modes http); the "
                             "engine system is the builtin engine in this process")
        if args.engine_process:
            raise SystemExit("--engine-process is for the builtin engine: the vllm engine "
                             "runs its core in a process of its own already")
    if args.engine == "vllm" or "vllm-peer" in baselines:
        if w.device != "cpu" and baselines:  # --engine vllm alone fits a GPU
            raise SystemExit("on a GPU, --engine vllm runs alone (--baselines \"\"): two "
                             "vLLM servers, or one and the baselines' model, would share one "
                             "GPU; pass --device cpu to measure them side by side")
        check_vllm_shape(w)
        require_vllm("--engine vllm" if args.engine == "vllm" else "the vllm-peer baseline")


def _even_vllm_startups() -> None:
    """The vLLM servers start one after the other; without this the first would pay for
    reading vLLM's files from disk and the second find them in the page cache, and the second
    could load the torch.compile artifacts the first saved for the same model. So vLLM is
    imported once in a throwaway process first, and neither server uses the compile cache:
    both compile, as on a first start."""
    os.environ.setdefault("VLLM_DISABLE_COMPILE_CACHE", "1")
    say("reading vLLM's files once, so that neither server's startup pays for it ...")
    subprocess.run([sys.executable, "-c", "import vllm.entrypoints.openai.api_server, "
                    "vllm.v1.engine.async_llm"], check=True, capture_output=True)


def _measure(w: Workload, work: Path, modes: list[str], baselines: list[str], repeats: int,
             args: argparse.Namespace, overrides: dict[str, Any],
             out: Path) -> dict[str, Any]:
    """Every system's runs, interleaved. After each run the figures so far are written to
    `out` with `"partial": true` in `extra`, so a run cut short by a time limit still leaves
    what it measured; the complete result replaces it at the end."""
    from benchmarks.harness.baselines import Baselines
    from benchmarks.harness.engine_runner import EngineRunner, settings_for
    from benchmarks.harness.http_runner import HttpRunner
    from benchmarks.harness.vllm_peer import VllmPeerRunner

    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        say(f"building a random {w.shape.arch} model, {w.shape.params() / 1e9:.2f}B params, "
            f"{w.dtype} ...")
        fixtures.build_model(w.shape, model_dir, dtype=w.dtype, device=w.device)
    store_dir = work / "store"
    with tqdm(total=w.adapters, desc="storing adapters", disable=args.no_progress,
              file=sys.stderr, leave=False) as bar:
        fixtures.populate_store(w, store_dir, progress=bar)
    requests = fixtures.make_requests(w)
    settings = settings_for(w, model_dir, store_dir, args.max_wait_ms, args.batching,
                            engine=args.engine)
    with_vllm = args.engine == "vllm" or "vllm-peer" in baselines
    if with_vllm:
        say(f"model: {model_line(w)}")
        _even_vllm_startups()
    warm_adapters = w.zipf_s is None  # many-adapters measures the cold cache too

    runners: dict[str, Any] = {}
    systems: list[SystemResult] = []
    env = environment()  # before this run writes its partial JSON into the tree
    try:
        if "engine" in modes:
            say("starting the engine ...")
            runners["engine"] = EngineRunner(settings, requests)
        if "http" in modes:
            say(f"starting the server (--engine {args.engine}) ...")
            runners["http"] = HttpRunner(settings, requests, work / "server.log",
                                         engine_process=args.engine_process)
        for name in runners:
            label = HTTP_VLLM_LABEL if name == "http" and args.engine == "vllm" \
                else LABELS[name]
            systems.append(SystemResult(name, "server", label))
        if "vllm-peer" in baselines:
            say("starting vLLM's OpenAI server (the vllm-peer baseline) ...")
            runners["vllm-peer"] = VllmPeerRunner(w, settings, model_dir, requests,
                                                  work / "vllm-peer.log")
            systems.append(SystemResult("vllm-peer", "baseline", LABELS["vllm-peer"]))
        in_process = [b for b in baselines if b != "vllm-peer"]
        if in_process:
            say("loading the baselines' model ...")
            base = Baselines(w, model_dir, work / "peft-adapters", requests)
            for name in in_process:
                runners[name] = _BaselineRunner(base.runner(name),
                                                functools.partial(base.warm_up, name))
                systems.append(SystemResult(name, "baseline", LABELS[name]))
        say("warming up ...")
        for runner in runners.values():
            runner.warm_up(with_adapters=warm_adapters)
        for k in range(repeats):  # interleaved: a burst of outside load hits all alike
            for s in systems:
                if with_vllm:  # a vLLM worker polls for a second after its last step
                    time.sleep(VLLM_SETTLE_S)
                s.runs.append(_timed(runners[s.name], s.label, k, repeats, len(requests), w,
                                     args.no_progress))
                write_json(report(w.to_json(), systems, overrides=overrides, env=env,
                                  extra={"batching": args.batching, "engine": args.engine,
                                         "partial": True}), out)
        extra = {"batching": args.batching, "engine": args.engine,
                 **_extras(w, systems, requests)}
        if "http" in runners:
            extra["engine_process"] = args.engine_process
        if with_vllm:
            extra.update(_wire_extras(w, systems, runners))
        if args.overhead_requests and "http" in runners:
            say("measuring the HTTP layer's overhead ...")
            extra["http_overhead"] = runners["http"].overhead(args.overhead_requests)
    except BaseException:
        if "http" in runners:
            show_log(runners["http"].server, "the http system")
        if "vllm-peer" in runners:
            show_log(runners["vllm-peer"].server, "the vllm-peer baseline")
        raise
    finally:
        for runner in runners.values():
            runner.close()
    result = report(w.to_json(), systems, extra=extra, overrides=overrides, env=env)
    print_table(result)
    if "http/vllm-peer" in result["ratios"]:
        print(f"  this server (--engine {args.engine}) / vllm-peer: "
              f"{result['ratios']['http/vllm-peer']:.2f}x tokens/s (target >= 1.0x)")
    return result


def _wire_extras(w: Workload, systems: list[SystemResult],
                 runners: dict[str, Any]) -> dict[str, Any]:
    """Beside vLLM's own server: which model both served, each server's time from start to
    ready, and what a request costs on the wire (the peer's carries every embedding)."""
    extra: dict[str, Any] = {"model": model_line(w), "startup_s": {}, "request_bytes": {},
                             "response_bytes": {}}
    for s in systems:
        if s.name in ("http", "vllm-peer") and s.runs:
            extra["startup_s"][s.name] = round(runners[s.name].startup_s, 1)
            extra["request_bytes"][s.name] = round(s.best.extra["request_bytes"])
            extra["response_bytes"][s.name] = round(s.best.extra["response_bytes"])
    return extra


class _BaselineRunner:
    def __init__(self, run: Callable[[Callable[[int], None]], Run],
                 warm: Callable[[], None]) -> None:
        self._run, self._warm = run, warm

    def warm_up(self, *, with_adapters: bool) -> None:
        self._warm()

    def run(self, tick: Callable[[int], None]) -> Run:
        return self._run(tick)

    def close(self) -> None:
        pass


def _timed(runner: Any, label: str, k: int, repeats: int, total: int, w: Workload,
           quiet: bool) -> Run:
    if w.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with tqdm(total=total, desc=f"{label} ({k + 1}/{repeats})", disable=quiet,
              file=sys.stderr, leave=False) as bar:
        run = runner.run(bar.update)
    if w.device == "cuda":  # the in-process systems only (the HTTP server is another process)
        run.extra["peak_cuda_mib_in_process"] = torch.cuda.max_memory_allocated() / 2**20
    return run


def _extras(w: Workload, systems: list[SystemResult],
            requests: list[fixtures.RequestSpec]) -> dict[str, Any]:
    """Workload-specific figures: cache behaviour, row-steps wasted on finished rows."""
    extra: dict[str, Any] = {}
    by = {s.name: s for s in systems if s.runs}
    if "engine" in by:
        e = by["engine"].best.extra
        if w.zipf_s is not None:
            first = by["engine"].runs[0].extra  # the cold run
            extra["engine_prompt_cache_first_run"] = first["prompt_cache"]
            extra["engine_cold_loads_first_run"] = {"count": first["cold_loads"],
                                                    "ms": first["cold_load_ms"]}
            extra["distinct_adapters_requested"] = len({r.adapter for r in requests})
        if w.new_tokens_max is not None:
            extra["engine_wasted_row_steps_pct"] = round(e["wasted_row_steps_pct"], 1)
        extra["engine_batches"] = e["batches"]
        if e.get("decode_step_ms"):
            extra["engine_decode_step_ms"] = e["decode_step_ms"]
        if w.device == "cuda":
            extra["bandwidth_floor"] = bandwidth_floor(w)
    if w.new_tokens_max is not None and "plain" in by:
        extra["plain_wasted_row_steps_pct"] = round(by["plain"].best.extra[
            "wasted_row_steps_pct"], 1)
    return extra


# Peak memory bandwidth (bytes/s) by GPU name, for the decode step's floor: every step reads
# every weight once.
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12,
                   "A10G": 0.6e12, "L4": 0.3e12}


def bandwidth_floor(w: Workload) -> dict[str, Any]:
    """The least time a decode step can take on this GPU: the weights' bytes over its peak
    memory bandwidth (the KV cache read is left out, small at this workload's lengths)."""
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    per_s = next((bw for key, bw in HBM_BYTES_PER_S.items() if key in name), None)
    element = torch.empty((), dtype=fixtures.dtype_of(w.dtype)).element_size()
    weight_bytes = w.shape.params() * element
    return {"gpu": name, "weight_bytes": weight_bytes, "bandwidth_bytes_per_s": per_s,
            "floor_ms": None if per_s is None else round(1e3 * weight_bytes / per_s, 3)}


def say(message: str) -> None:
    """Progress notes go to stderr; stdout carries the table."""
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
