"""benchmarks/gpu/run_checks.sh, the GPU checks in two calls, runs end to end in its shrunken CPU
mode: a broken script would otherwise only show on a GPU host."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(660)]
ROOT = Path(__file__).resolve().parents[2]
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def run_checks(out: Path, **env: str) -> str:
    """Runs the script quick on the CPU; returns its log."""
    full = {**os.environ, "QUICK": "1", "DEVICE": "cpu", "OUT": str(out), **env,
            # The script calls python3: make it this interpreter (the venv's).
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run_checks.sh")], env=full,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tag = "steps" if "STEPS" in env else f"call{env['CALL']}"
    return (out / f"gpu-checks-{tag}.log").read_text()


def steps(path: Path) -> dict[str, dict[str, Any]]:
    record = json.loads(path.read_text())
    assert record["finished"], "the call's record was not closed"
    return {s["name"]: s for s in record["steps"]}


def systems(path: Path) -> list[str]:
    result = json.loads(path.read_text())
    assert not result["extra"].get("partial"), f"{path.name} is still partial"
    return sorted(result["systems"])


def test_call_1_env_parity_and_gpu_1b_engine_against_the_compiled_baseline(tmp_path) -> None:
    log = run_checks(tmp_path, CALL="1")
    done = steps(tmp_path / "gpu-checks-call1.json")
    for name in ("env", "parity", "gpu1b"):
        assert f"===== {name}: rc=0" in log
        assert done[name]["status"] == "ok" and done[name]["output_tail"], done[name]
    # env: every requirement met, recorded with where it came from.
    env = json.loads((tmp_path / "gpu-env.json").read_text())
    assert env["requirements"] and all(r["ok"] for r in env["requirements"])
    assert systems(tmp_path / "gpu-1b.json") == ["engine", "hf-static-compile"]
    if HAS_VLLM:
        assert systems(tmp_path / "gpu-1b-vllm.json") == ["http"]
    else:
        assert done["gpu1bvllm"]["status"] == "skipped"
        assert "vLLM is not installed" in done["gpu1bvllm"]["reason"]
        assert "gpu1bvllm: skipped: vLLM is not installed" in log


def test_call_2_gpu_8b_bf16_the_rest_of_gpu_1b_and_the_step_overhead(tmp_path) -> None:
    log = run_checks(tmp_path, CALL="2")
    done = steps(tmp_path / "gpu-checks-call2.json")
    assert list(done) == ["gpu8b", "gpu8bvllm", "bf16", "gpu1bmore", "overhead"]
    vllm = done.pop("gpu8bvllm")
    if HAS_VLLM:
        assert vllm["status"] == "ok" and systems(tmp_path / "gpu-8b-vllm.json") == ["http"]
    else:
        assert vllm["status"] == "skipped" and "vLLM is not installed" in vllm["reason"]
        assert "gpu8bvllm: skipped: vLLM is not installed" in log
    assert all(s["status"] == "ok" for s in done.values()), done
    assert systems(tmp_path / "gpu-8b.json") == ["engine"]
    assert systems(tmp_path / "gpu-1b-more.json") == ["http", "peft-sequential", "plain"]
    assert "host time per decode step" in log
    # bf16 agreement's summary row over every architecture, in the call's record.
    assert any(line.startswith("all ") for line in done["bf16"]["output_tail"]), done["bf16"]


def test_named_steps_long_prompts_and_an_unknown_step(tmp_path) -> None:
    log = run_checks(tmp_path, STEPS="longprompts nosuchstep")
    assert steps(tmp_path / "gpu-checks-steps.json")["nosuchstep"]["status"] == "skipped"
    # long-prompts (quick: the prefix cache on only): warm requests reuse their prefix.
    assert "===== longprompts: rc=0" in log and "warm/bare" in log
    runs = json.loads((tmp_path / "long-prompts.json").read_text())["runs"]
    on = runs["prefix-cache"]["prefix_metrics"]
    assert on["prefix_cache_hits_total"] >= 2 and on["prefix_cache_tokens_saved_total"] > 0


def test_a_step_the_budget_cannot_hold_is_skipped_and_recorded(tmp_path) -> None:
    log = run_checks(tmp_path, STEPS="overhead", BUDGET_S="40", MIN_STEP_S="35")
    skipped = steps(tmp_path / "gpu-checks-steps.json")["overhead"]
    assert skipped["status"] == "skipped" and "budget" in skipped["reason"]
    assert "===== overhead (limit" not in log
