"""benchmarks/gpu/run_checks.sh, the GPU checks in one go, runs end to end in its shrunken CPU
mode: a broken script would otherwise only show on a GPU host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_run_checks_quick_mode_logs_every_step_and_writes_the_json(tmp_path) -> None:
    env = {**os.environ, "QUICK": "1", "DEVICE": "cpu", "OUT": str(tmp_path),
           "STEPS": "env overhead longprompts nosuchstep",
           # The fairness steps run `python -m benchmarks fairness` or benchmarks/fairness.py
           # with other flags, which tests/benchmarks/test_harness and test_fairness_http
           # run. The script calls python3: make it this interpreter (the venv's).
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run_checks.sh")], env=env,
                          capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "checks.log").read_text()
    assert "===== env: rc=0" in log
    assert "===== overhead: rc=0" in log and "host time per decode step" in log
    assert "unknown step nosuchstep" in log
    # long-prompts (quick: the prefix cache on only): warm requests reuse their prefix.
    assert "===== longprompts: rc=0" in log and "warm/bare" in log
    runs = json.loads((tmp_path / "long-prompts.json").read_text())["runs"]
    on = runs["prefix-cache"]["prefix_metrics"]
    assert on["prefix_cache_hits_total"] >= 2 and on["prefix_cache_tokens_saved_total"] > 0
