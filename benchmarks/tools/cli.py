"""`python -m benchmarks tools`: guidellm, aiperf and litellm, unchanged, against the real
server, each with a small request count; every request must succeed.

The server (`python -m server serve`, builtin:tiny, CPU, on loopback) gets the sample PEFT
prompt-tuning adapter (`python -m server make-sample-adapter`) uploaded, and every tool sends
its requests with that adapter as the OpenAI `model`. A tool counts its requests in its own
report files, which are read back here; the server's own request counter (/metrics,
`softprompt_requests_total` by route and status) is read before and after each tool too, so a
4xx or 5xx shows even where a tool would not report it. The printout is a table: tool, version,
requests ok/total, what the server answered, notes. inference-perf is not on the package
registry; its row says so.

Each tool is found by its flag, else its environment variable, else on PATH:
--guidellm / $GUIDELLM (`guidellm`), --aiperf / $AIPERF (`aiperf`), --litellm-python /
$LITELLM_PYTHON (a Python that imports litellm; default: the one beside `litellm` on PATH).
.ci/tools-env installs all three in venvs of their own.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness.results import environment, write_json
from benchmarks.tools.runners import RUNNERS, Target, ToolResult, find_tool, run_tool
from tests.e2e.server_process import ServerProcess

ADAPTER = "tools-sample"
DEFAULT_JSON = Path(__file__).resolve().parents[1] / "results" / "tools.json"
SERVER_FLAGS = ("--max-batch-size", "32", "--max-wait-ms", "5", "--log-level", "warning")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks tools",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--tools", default=",".join(RUNNERS),
                   help=f"comma-separated subset of {','.join(RUNNERS)} (default: all)")
    p.add_argument("--requests", type=int, default=32, help="requests per tool (default 32)")
    p.add_argument("--concurrency", type=int, default=8,
                   help="requests in flight at once, where the tool takes it (default 8)")
    p.add_argument("--prompt-tokens", type=int, default=64,
                   help="synthetic prompt length, where the tool makes its prompts (default 64)")
    p.add_argument("--output-tokens", type=int, default=16,
                   help="max_tokens of each request (default 16)")
    p.add_argument("--guidellm", default=None, help="guidellm's executable ($GUIDELLM)")
    p.add_argument("--aiperf", default=None, help="aiperf's executable ($AIPERF)")
    p.add_argument("--litellm-python", default=None,
                   help="a Python that imports litellm ($LITELLM_PYTHON)")
    p.add_argument("--timeout", type=float, default=600,
                   help="seconds each tool may take (default 600)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the JSON")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="keep the store, logs and the tools' reports here")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    names = [t for t in args.tools.split(",") if t]
    unknown = sorted(set(names) - set(RUNNERS))
    if unknown:
        raise SystemExit(f"unknown tool(s): {', '.join(unknown)}")
    flags = {"guidellm": args.guidellm, "aiperf": args.aiperf, "litellm": args.litellm_python}
    result = run_tools(names, requests=args.requests, concurrency=args.concurrency,
                       prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                       flags=flags, timeout=args.timeout, work_dir=args.work_dir)
    print_tools(result)
    write_json(result, args.json)
    print(f"\nJSON: {args.json}")
    ran = [r for r in result["tools"] if r["found"]]
    return 0 if ran and all(r["passed"] for r in ran) else 1


def run_tools(names: list[str], *, requests: int = 32, concurrency: int = 8,
              prompt_tokens: int = 64, output_tokens: int = 16,
              flags: dict[str, str | None] | None = None, timeout: float = 600,
              work_dir: Path | None = None) -> dict[str, Any]:
    """Run each named tool that is found against one real server; returns the JSON record.
    A tool that is not found is a row saying so (`found: false`), not a failure."""
    flags = flags or {}
    env = environment()
    found = {name: find_tool(name, flags.get(name)) for name in names}
    results = [ToolResult.not_found(name) for name, exe in found.items() if exe is None]
    with tempfile.TemporaryDirectory(prefix="softprompt-tools-") as tmp:
        work = work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:
            target = stack.enter_context(serving(work)) if any(found.values()) else None
            for name, exe in found.items():
                if exe is None or target is None:
                    continue
                say(f"running {name} ({exe}) ...")
                out = work / name
                out.mkdir(exist_ok=True)
                before = server_counts(target.url)
                r = run_tool(name, exe, target, out, requests=requests,
                             concurrency=concurrency, prompt_tokens=prompt_tokens,
                             output_tokens=output_tokens, timeout=timeout)
                r.server = diff_counts(server_counts(target.url), before)
                results.append(r)
    results.sort(key=lambda r: names.index(r.tool))
    results.append(ToolResult.not_found(
        "inference-perf", notes="not on the package registry; not installed or run"))
    return {"environment": env, "requests": requests, "concurrency": concurrency,
            "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "model": ADAPTER, "tools": [asdict(r) | {"passed": r.passed} for r in results]}


@contextmanager
def serving(work: Path) -> Iterator[Target]:
    """The real server on builtin:tiny with the sample adapter uploaded as ADAPTER."""
    adapter = work / "adapter"
    model_cache = work / "model-cache"
    subprocess.run([sys.executable, "-m", "server", "make-sample-adapter", "--model-cache",
                    str(model_cache), str(adapter)], check=True, stdout=subprocess.DEVNULL)
    say("starting the server (builtin:tiny, CPU) ...")
    server = ServerProcess(Path("builtin:tiny"), work / "store", work / "server.log",
                           "--model-cache", str(model_cache), *SERVER_FLAGS)
    server.start()
    try:
        files = {name: (name, (adapter / name).read_bytes())
                 for name in ("adapter_config.json", "adapter_model.safetensors")}
        reply = httpx.post(server.url + "/v1/adapters", data={"adapter_id": ADAPTER},
                           files={"config": files["adapter_config.json"],
                                  "weights": files["adapter_model.safetensors"]}, timeout=60)
        reply.raise_for_status()
        tokenizer = next(model_cache.glob("builtin-tiny-v*"))
        yield Target(url=server.url, model=ADAPTER, tokenizer=tokenizer)
    except BaseException:
        say(f"server log (last lines):\n{server.log()}")
        raise
    finally:
        server.stop()


def server_counts(url: str) -> dict[str, float]:
    """`softprompt_requests_total` by "METHOD endpoint status", from /metrics."""
    counts: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if not line.startswith("softprompt_requests_total{"):
            continue
        sample, _, value = line.rpartition(" ")
        labels = dict(part.split("=", 1) for part in
                      sample.partition("{")[2].rstrip("}").split(","))
        labels = {k: v.strip('"') for k, v in labels.items()}
        key = f"{labels['method']} {labels['endpoint']} {labels['status']}"
        counts[key] = counts.get(key, 0.0) + float(value)
    return counts


def diff_counts(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    """What the server answered between two scrapes, less the scrapes themselves (GET /metrics
    200; a failed or HEAD /metrics, which some tools send, still shows)."""
    return {k: int(v - before.get(k, 0.0)) for k, v in sorted(after.items())
            if v - before.get(k, 0.0) > 0 and k != "GET /metrics 200"}


def print_tools(result: dict[str, Any]) -> None:
    env = result["environment"]
    print(f"\ntools against the real server (builtin:tiny, CPU, adapter {result['model']}): "
          f"{result['requests']} requests each, up to {result['output_tokens']} tokens out; "
          f"{env['date']}, commit {env['commit']}")
    print(f"  {'tool':<16}{'version':<10}{'ok/total':>10}  {'result':<7} server answered / notes")
    for r in result["tools"]:
        if not r["found"]:
            print(f"  {r['tool']:<16}{'-':<10}{'-':>10}  {'-':<7} {r['notes']}")
            continue
        answered = ", ".join(f"{k} x{n}" for k, n in r["server"].items()) or "nothing"
        verdict = "ok" if r["passed"] else "FAILED"
        counted = f"{r['ok']}/{r['total']}"
        print(f"  {r['tool']:<16}{r['version'] or '?':<10}{counted:>10}  "
              f"{verdict:<7} {answered}")
        if r["notes"]:
            print(f"  {'':<45}{r['notes']}")


def say(message: str) -> None:
    """Progress notes go to stderr; stdout carries the table."""
    print(message, file=sys.stderr, flush=True)
