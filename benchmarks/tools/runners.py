"""One function per tool: its command line against the server, and its own report read back
into requests ok/total. A request counts as ok only where the tool's report says it completed
without an error and got the output it asked for."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

LITELLM_CLIENT = Path(__file__).resolve().parent / "litellm_client.py"
# tool -> the environment variable that names its executable, and the name on PATH
ENV_VARS = {"guidellm": "GUIDELLM", "aiperf": "AIPERF", "litellm": "LITELLM_PYTHON"}
ON_PATH = {"guidellm": "guidellm", "aiperf": "aiperf", "litellm": "litellm"}


@dataclass(frozen=True)
class Target:
    url: str  # the server's base URL, no path
    model: str  # the OpenAI `model` every request names (an adapter id)
    tokenizer: Path  # the served model's directory, for tools that count tokens themselves


@dataclass
class ToolResult:
    tool: str
    found: bool
    version: str | None = None
    ok: int = 0
    total: int = 0
    exit_status: int | None = None
    notes: str = ""
    command: list[str] = field(default_factory=list)
    server: dict[str, int] = field(default_factory=dict)  # "METHOD route status" -> count

    @classmethod
    def not_found(cls, tool: str, notes: str | None = None) -> ToolResult:
        return cls(tool=tool, found=False, notes=notes or f"not found (${ENV_VARS[tool]}, "
                   f"--{tool}{'-python' if tool == 'litellm' else ''}, or PATH); skipped")

    @property
    def passed(self) -> bool:
        """Every request ok, the tool exited 0, and the server answered nothing with an error."""
        errors = [k for k in self.server if not k.rsplit(" ", 1)[1].startswith("2")]
        return (self.found and self.total > 0 and self.ok == self.total
                and self.exit_status == 0 and not errors)


def find_tool(tool: str, flag: str | None) -> str | None:
    """The flag's value, else the environment variable's, else the tool on PATH (litellm: the
    Python beside `litellm` on PATH); None when none of them names an existing file."""
    given = flag or os.environ.get(ENV_VARS[tool])
    if given:
        found = shutil.which(given)
        return found or None
    on_path = shutil.which(ON_PATH[tool])
    if on_path and tool == "litellm":
        python = Path(on_path).parent / "python"
        return str(python) if python.exists() else None
    return on_path


def run_tool(tool: str, exe: str, target: Target, out: Path, *, requests: int,
             concurrency: int, prompt_tokens: int, output_tokens: int,
             timeout: float) -> ToolResult:
    command, read = RUNNERS[tool](exe, target, out, requests=requests, concurrency=concurrency,
                                  prompt_tokens=prompt_tokens, output_tokens=output_tokens)
    # No HF_HUB_OFFLINE: every tool gets the tokenizer as a local directory, and aiperf 0.13.0
    # offline looks a local directory up as a hub repo id (and fails).
    env = dict(os.environ, PYTHONUNBUFFERED="1", DO_NOT_TRACK="1", NO_COLOR="1", COLUMNS="160")
    env.pop("HF_HUB_OFFLINE", None)
    log = out / f"{tool}.log"
    try:
        with open(log, "wb") as f:
            status = subprocess.run(command, cwd=out, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        status = None
    result = ToolResult(tool=tool, found=True, exit_status=status, command=command,
                        total=requests)
    try:
        read(result)
    except (OSError, ValueError, KeyError, TypeError) as e:
        result.notes = f"its report could not be read: {type(e).__name__}: {e}"
    if status != 0:
        tail = log.read_text(errors="replace")[-1500:]
        result.notes = (f"exit status {status}; " + result.notes).strip("; ")
        print(f"{tool}'s output (last lines):\n{tail}", file=sys.stderr)
    return result


Reader = Callable[[ToolResult], None]


def guidellm(exe: str, target: Target, out: Path, *, requests: int, concurrency: int,
             prompt_tokens: int, output_tokens: int) -> tuple[list[str], Reader]:
    """`guidellm run` with its defaults for an OpenAI server: it validates the backend with
    GET /health, lists /v1/models, and streams chat completions with `stream_options`
    {include_usage, continuous_usage_stats}, `ignore_eos` and `max_completion_tokens`, so every
    request must come back with exactly `output_tokens` tokens. Synthetic prompts (counted with
    the model's tokenizer), `concurrency` streams, `requests` requests."""
    report = out / "benchmarks.json"
    command = [exe, "run",
               "--backend", f"kind=openai_http,target={target.url},model={target.model}",
               "--profile", f"kind=concurrent,streams={concurrency}",
               "--constraint", f"kind=max_requests,count={requests}",
               "--tokenizer", f"kind=hf_auto,model={target.tokenizer}",
               "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},"
                         f"output_tokens={output_tokens}",
               "--output", f"kind=json,path={report}", "--disable-console-interactive"]

    def read(r: ToolResult) -> None:
        data = json.loads(report.read_text())
        r.version = data["metadata"]["guidellm_version"]
        requests_ = data["benchmarks"][0]["requests"]
        done = requests_.get("successful") or []
        bad = (requests_.get("errored") or []) + (requests_.get("incomplete") or [])
        short = [q for q in done if q.get("output_tokens") != output_tokens]
        r.ok = len(done) - len(short)
        r.total = max(r.total, len(done) + len(bad))
        notes = []
        if bad:
            notes.append(f"{len(bad)} errored or incomplete")
        if short:
            notes.append(f"{len(short)} with output other than {output_tokens} tokens")
        r.notes = "; ".join(notes)

    return command, read


def aiperf(exe: str, target: Target, out: Path, *, requests: int, concurrency: int,
           prompt_tokens: int, output_tokens: int) -> tuple[list[str], Reader]:
    """`aiperf profile`: streaming chat with `ignore_eos` (vLLM's extension) so every request
    must come back with exactly `output_tokens` tokens, counted by the server's usage."""
    artifacts = out / "artifacts"
    command = [exe, "profile", "--model", target.model, "--url", target.url,
               "--endpoint-type", "chat", "--streaming", "--request-count", str(requests),
               "--concurrency", str(concurrency), "--isl", str(prompt_tokens),
               "--osl", str(output_tokens), "--extra-inputs", "ignore_eos:true",
               "--use-server-token-count", "--tokenizer", str(target.tokenizer),
               "--artifact-dir", str(artifacts), "--ui-type", "none"]

    def read(r: ToolResult) -> None:
        summary = json.loads((artifacts / "profile_export_aiperf.json").read_text())
        r.version = summary.get("aiperf_version")
        records = [json.loads(line) for line in
                   (artifacts / "profile_export.jsonl").read_text().splitlines() if line]
        errored = [x for x in records if x.get("error")]
        lengths = [x["metrics"].get("output_sequence_length", {}).get("value")
                   for x in records if not x.get("error")]
        short = [n for n in lengths if n != output_tokens]
        r.ok = len(lengths) - len(short)
        r.total = max(r.total, len(records))
        notes = []
        if errored:
            notes.append(f"{len(errored)} errored: {errored[0]['error']}"[:300])
        if short:
            notes.append(f"{len(short)} with output other than {output_tokens} tokens")
        if summary.get("error_summary"):
            notes.append(f"error summary: {summary['error_summary']}"[:300])
            r.ok = min(r.ok, r.total - 1)
        r.notes = "; ".join(notes)

    return command, read


def litellm(exe: str, target: Target, out: Path, *, requests: int, concurrency: int,
            prompt_tokens: int, output_tokens: int) -> tuple[list[str], Reader]:
    """litellm's SDK (provider hosted_vllm): chat and text completions, plain and streaming,
    all at once (`concurrency` and `prompt_tokens` do not apply)."""
    report = out / "records.json"
    command = [exe, str(LITELLM_CLIENT), "--base-url", target.url + "/v1", "--model",
               target.model, "--requests", str(requests), "--max-tokens", str(output_tokens),
               "--out", str(report)]

    def read(r: ToolResult) -> None:
        data = json.loads(report.read_text())
        r.version = data["version"]
        records = data["records"]
        r.ok = sum(1 for x in records if x["ok"])
        r.total = max(r.total, len(records))
        failed = [x for x in records if not x["ok"]]
        kinds = sorted({x["kind"] for x in records})
        r.notes = f"{', '.join(kinds)}" + (f"; {len(failed)} failed: {failed[0].get('error')}"
                                           if failed else "")

    return command, read


RUNNERS: dict[str, Callable[..., tuple[list[str], Reader]]] = {
    "guidellm": guidellm, "aiperf": aiperf, "litellm": litellm}
