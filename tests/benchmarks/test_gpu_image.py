"""The GPU image's own Python packages plus the wheels benchmarks/gpu/fetch_wheels.sh carries
(benchmarks/gpu/carried.txt) are enough for the GPU checks.

The image's package set (gpu-host-packages.txt in shared/, beside the checkout) is rebuilt here
in a fresh virtual environment. Every package the server, the harness and the GPU tests need,
followed through the requirements of each, is taken from the image's list at its listed
version or from carried.txt at constraints.txt's version, and from nowhere else: pip installs
offline (--no-index, no configuration) from a folder holding exactly those wheels, so a
requirement that neither side meets fails the install. The wheels are downloaded first. Then,
with only that environment and the checkout on sys.path, as run_checks.sh has it, the server,
transformers, peft and the harness import and the GPU tests collect.

What this reproduces: which packages exist and at which versions, and that their requirements
(markers evaluated for the image: CPython 3.12, Linux x86-64) are met. What it cannot: this
interpreter is 3.11 on a CPU where the image's is 3.12 with CUDA. torch is this environment's
CPU build (2.13) in place of the image's CUDA 2.11, and its CUDA packages (nvidia-*, triton)
are left out; a listed version with no wheel for this interpreter (numpy 2.5.2 needs Python
3.12) is taken at constraints.txt's version instead, and each such stand-in is printed; a bare
name on the list (version unknown) is taken at constraints.txt's version, else the newest
release; whatever the checks do not need (jax, onnx, ...) is not installed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.parser import HeaderParser
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from benchmarks.gpu.env_report import requirements

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
IMAGE_LIST = ROOT.parent / "shared" / "gpu-host-packages.txt"
CARRIED = ROOT / "benchmarks/gpu/carried.txt"
# Requirement markers as the image's interpreter evaluates them.
IMAGE_ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
             "implementation_name": "cpython", "platform_python_implementation": "CPython",
             "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
             "os_name": "posix"}
IMPORTS = ("server.cli", "server.api.app", "server.engine", "transformers", "peft",
           "benchmarks.harness.cli", "benchmarks.harness.engine_runner",
           "benchmarks.harness.http_runner", "benchmarks.harness.baselines",
           "benchmarks.step_overhead", "benchmarks.bf16_agreement", "benchmarks.fairness",
           "benchmarks.long_prompts")


@dataclass(frozen=True)
class Choice:
    version: str
    source: str  # "image", "carried" or "local" (torch)
    wheel: Path | None  # None: torch, linked from this environment


@dataclass
class Resolution:
    image: dict[str, str | None]
    carried: dict[str, str]
    wheels: Path  # one wheel for each package chosen, and nothing else
    chosen: dict[str, Choice] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # "name (needed by ...)"
    stand_ins: list[str] = field(default_factory=list)  # "spec -> spec" for this interpreter
    asked: dict[str, list[tuple[Requirement, str]]] = field(default_factory=dict)


def pins(path: Path) -> dict[str, str | None]:
    """name -> version (None for a bare name) of a `name==version` list with # comments."""
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version.strip() or None
    return out


def image_packages() -> dict[str, str | None]:
    if not IMAGE_LIST.is_file():
        pytest.skip(f"the GPU image's package list is absent: no {IMAGE_LIST}")
    return pins(IMAGE_LIST)


def carried_packages(constraints: dict[str, str | None]) -> dict[str, str]:
    names = list(pins(CARRIED))
    unpinned = [n for n in names if not constraints.get(n)]
    assert not unpinned, f"carried but not pinned in constraints.txt: {unpinned}"
    return {n: constraints[n] for n in names}  # type: ignore[misc]


def requires(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        headers = HeaderParser().parsestr(z.read(meta).decode())
    return [Requirement(r) for r in headers.get_all("Requires-Dist") or []]


def needed(reqs: Iterable[Requirement], extras: Iterable[str] = ()) -> list[Requirement]:
    """The requirements that apply on the image (with the given extras asked for)."""
    envs = [{**IMAGE_ENV, "extra": e} for e in ("", *extras)]
    return [r for r in reqs if r.marker is None or any(r.marker.evaluate(e) for e in envs)]


def download(specs: dict[str, str], dest: Path) -> dict[str, str]:
    """Wheels for this interpreter, without their requirements; returns the specs that have
    none (pip stops at the first, named in its message: each is taken out in turn)."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "-d", str(dest)]
    failed: dict[str, str] = {}
    left = dict(specs)
    while left:
        proc = subprocess.run([*cmd, *left.values()], capture_output=True, text=True)
        if proc.returncode == 0:
            break
        named = re.search(r"No matching distribution found for (\S+)", proc.stderr)
        culprit = next((n for n, spec in left.items() if named and spec == named.group(1)),
                       None)
        assert culprit, proc.stderr[-2000:]
        failed[culprit] = left.pop(culprit)
    return failed


def wheels_in(folder: Path) -> dict[str, Path]:
    return {canonicalize_name(parse_wheel_filename(p.name)[0]): p for p in folder.glob("*.whl")}


def resolve(image: dict[str, str | None], carried: dict[str, str],
            constraints: dict[str, str | None], dest: Path) -> Resolution:
    """Follows the checks' requirements through the image and the carried list, downloading a
    wheel for each package reached."""
    res = Resolution(image, carried, dest)
    level = [(r, "the GPU checks") for r in requirements()]
    while level:
        wanted: dict[str, tuple[str, str, set[str]]] = {}  # name -> (spec, source, extras)
        next_level: list[tuple[Requirement, str]] = []
        for req, by in level:
            name = canonicalize_name(req.name)
            res.asked.setdefault(name, []).append((req, by))
            if name in res.chosen or name in wanted:
                continue
            if name == "torch" and name in image:
                res.chosen[name] = Choice(importlib.metadata.version("torch"), "local", None)
                torch_reqs = [Requirement(r) for r in importlib.metadata.requires("torch") or []]
                next_level += [(r, "torch") for r in needed(torch_reqs, req.extras)]
            elif name in carried:
                wanted[name] = (f"{name}=={carried[name]}", "carried", req.extras)
            elif name in image:
                version = image[name] or constraints.get(name)
                spec = f"{name}=={version}" if version else name
                wanted[name] = (spec, "image", req.extras)
            elif f"{name} (needed by {by})" not in res.missing:
                res.missing.append(f"{name} (needed by {by})")
        failed = download({n: spec for n, (spec, _, _) in wanted.items()}, dest)
        for name, spec in failed.items():
            fallback = constraints.get(name)
            retry = download({name: f"{name}=={fallback}" if fallback else name}, dest)
            assert not retry, f"no wheel of {spec} nor of a stand-in for this interpreter"
            res.stand_ins.append(f"{spec} -> {name}=={fallback or 'newest'}")
        found = wheels_in(dest)
        for name, (_, source, extras) in wanted.items():
            wheel = found[name]
            version = parse_wheel_filename(wheel.name)[1].public
            res.chosen[name] = Choice(version, source, wheel)
            next_level += [(r, f"{name} {version}") for r in needed(requires(wheel), extras)]
        level = next_level
    return res


def link_torch(site: Path) -> None:
    """This environment's torch into the simulated one, in place of the image's CUDA build."""
    dist = importlib.metadata.distribution("torch")
    top = dist.read_text("top_level.txt")
    base = Path(str(dist.locate_file("")))
    for name in [*(top.split() if top else ["torch"]), f"torch-{dist.version}.dist-info"]:
        if (base / name).exists():
            (site / name).symlink_to(base / name)


@pytest.fixture(scope="module")
def resolution(tmp_path_factory) -> Resolution:
    constraints = pins(ROOT / "constraints.txt")
    wheels = tmp_path_factory.mktemp("gpu-image-wheels")
    res = resolve(image_packages(), carried_packages(constraints), constraints, wheels)
    print("stand-ins for this interpreter:", res.stand_ins or "none")
    return res


@pytest.fixture(scope="module")
def image_env(resolution, tmp_path_factory) -> tuple[Path, dict[str, Choice]]:
    if resolution.missing:
        pytest.fail(f"unmet on the GPU host: {', '.join(resolution.missing)}")
    work = tmp_path_factory.mktemp("gpu-image")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; "
                                "print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    link_torch(site)
    # Offline, with no pip configuration: only the image's versions and the carried wheels.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    reqs = [str(r) for r in requirements()] + [f"{n}=={v}"
                                               for n, v in resolution.carried.items()]
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index",
         "--no-compile", "--no-cache-dir", "--find-links", str(resolution.wheels), *reqs],
        capture_output=True, text=True, env=env)
    assert install.returncode == 0, install.stderr[-4000:]
    return python, resolution.chosen


def run_in(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Only the simulated environment and the checkout on sys.path (no user site, no inherited
    PYTHONPATH), offline."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
           "PYTHONPATH": str(ROOT), "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([str(python), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_every_package_the_checks_need_is_on_the_image_or_carried(resolution) -> None:
    assert not resolution.missing, (
        "needed on the GPU host, but neither on the image nor carried (benchmarks/gpu/"
        f"carried.txt): {', '.join(resolution.missing)}")


def test_nothing_is_carried_that_the_image_has_at_a_version_that_serves(resolution) -> None:
    """A carried package the image also has must be one whose listed version some requirement
    refuses; otherwise the image's serves and the wheel is dead weight."""
    needless = []
    for name in sorted(set(resolution.carried) & set(resolution.image)):
        listed = resolution.image[name]
        if not listed or all(req.specifier.contains(listed, prereleases=True)
                             for req, _ in resolution.asked.get(name, [])):
            needless.append(f"{name} {listed or '(version not listed)'}")
    assert not needless, ("carried although the image's version meets every requirement on "
                          f"it: {', '.join(needless)}")


def test_the_image_plus_the_carried_wheels_import_the_server_and_harness(image_env) -> None:
    python, chosen = image_env
    probe = ("import importlib, json, sys\n"
             f"for m in {IMPORTS!r}: importlib.import_module(m)\n"
             "import transformers, huggingface_hub, peft, fastapi\n"
             "print('versions', transformers.__version__, huggingface_hub.__version__,"
             " peft.__version__, fastapi.__version__)\n"
             "print('path', json.dumps([p for p in sys.path if 'site-packages' in p]))\n")
    proc = run_in(python, "-c", probe)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The image's transformers and huggingface_hub serve, not newer carried ones.
    versions = re.search(r"^versions (.*)$", proc.stdout, re.M)
    assert versions, proc.stdout
    assert versions.group(1).split()[:2] == [chosen["transformers"].version,
                                             chosen["huggingface-hub"].version]
    site_dirs = json.loads(proc.stdout.split("\npath ", 1)[1])
    assert site_dirs and all(p.startswith(str(python.parent.parent)) for p in site_dirs)
    # run_checks.sh's env step: every requirement met there too.
    report = run_in(python, "benchmarks/gpu/env_report.py")
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-2000:]


def test_the_gpu_tests_collect_in_the_image(image_env) -> None:
    python, _ = image_env
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                   if "mark.gpu" in p.read_text())
    assert files, "no GPU tests found"
    proc = run_in(python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                  "-m", "gpu", *files)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    collected = re.search(r"(\d+)/\d+ tests collected", proc.stdout)
    assert collected and int(collected.group(1)) > 0, proc.stdout[-2000:]
