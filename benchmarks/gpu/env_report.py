"""The GPU checks' environment: the GPU, torch's CUDA build, where each package the checks need
comes from and whether its version meets the project's requirement.

    python3 benchmarks/gpu/env_report.py [--json PATH]

Exits 1, naming them, when a requirement is unmet, so a host missing a package says so in its
first seconds rather than in a benchmark's traceback. tests/benchmarks/test_gpu_image.py uses
`requirements()` as the set a GPU host must satisfy.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
# What the GPU checks need beyond the project's runtime requirements: PEFT (the parity tests'
# reference), pytest and the plugins pyproject's options name, the harness's client and bars.
# Taken with the test extra's bounds where it names them.
CHECKS_NEED = ("peft", "pytest", "pytest-asyncio", "pytest-timeout", "httpx", "tqdm", "numpy")
# Shown beside them: what transformers and peft pull in that decides whether they import.
SHOWN = ("huggingface-hub", "accelerate", "vllm")


def requirements() -> list[Requirement]:
    """The project's runtime requirements and what the GPU checks add, from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = {canonicalize_name(Requirement(r).name): r
             for r in project["optional-dependencies"]["test"]}
    need = [extra.get(canonicalize_name(n), n) for n in CHECKS_NEED]
    return [Requirement(r) for r in [*project["dependencies"], *need]]


def check(reqs: list[Requirement]) -> list[dict[str, Any]]:
    rows = []
    for req in reqs:
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            rows.append({"name": req.name, "wanted": str(req.specifier), "version": None,
                         "from": None, "ok": False})
            continue
        version = dist.version
        rows.append({"name": req.name, "wanted": str(req.specifier), "version": version,
                     "from": str(dist.locate_file("")),
                     "ok": req.specifier.contains(version, prereleases=True)})
    return rows


def gpu() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "available": cuda,
            "device": torch.cuda.get_device_name(0) if cuda else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False) \
        if shutil.which("nvidia-smi") else None
    commit = subprocess.run(["git", "log", "-1", "--format=%h %s"], capture_output=True,
                            text=True, cwd=ROOT, check=False).stdout.strip()
    rows = check(requirements())
    report = {"python": platform.python_version(), "commit": commit or None,
              "nvidia_smi": smi.stdout.strip() if smi else None, "gpu": gpu(),
              "requirements": rows, "also": {n: _version(n) for n in SHOWN}}
    print(f"commit {report['commit']}\n{report['nvidia_smi'] or 'no nvidia-smi'}")
    g = report["gpu"]
    print(f"python {report['python']} torch {g['torch']} cuda {g['cuda']} cudnn {g['cudnn']} "
          f"available {g['available']} {g['device'] or '-'}")
    for r in rows:
        print(f"  {'ok ' if r['ok'] else 'BAD'} {r['name']:<18} {r['version'] or 'missing':<14} "
              f"wanted {r['wanted'] or 'any':<12} {r['from'] or ''}")
    print("  " + ", ".join(f"{n} {v or 'not installed'}" for n, v in report["also"].items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    bad = [r["name"] for r in rows if not r["ok"]]
    if bad:
        print(f"env_report: unmet requirements: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
