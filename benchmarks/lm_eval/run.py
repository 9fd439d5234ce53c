"""Run lm-evaluation-harness against softprompt-server's /v1/completions route.

Starts the server (or uses a running one with --url), uploads a PEFT soft-prompt adapter
(the sample adapter unless --adapter-dir or --adapter-id says otherwise), runs lm-eval's
`local-completions` model on the tasks in benchmarks/lm_eval/tasks with the adapter id as the
OpenAI `model`, lets lm-eval print its results table, and stops the server it started.

lm-eval's `local-completions` sends token ids it tokenizes itself, without special tokens
unless `add_bos_token=True`, while its `hf` model keeps the tokenizer's default. So that both
score the same tokens, add_bos_token=True is passed whenever the served model's tokenizer
prepends a beginning-of-sequence token (asked of the tokenizer with the Python that runs
lm-eval; `add_bos_token` in --model-args overrides it). agreement.py, next to this file,
checks that lm-eval through the server and lm-eval's own `hf` + `peft` model agree.

Standard library only: it runs with any Python 3.11+. lm-eval lives in an environment of its
own (see README.md next to this file); give its command with --lm-eval or $LM_EVAL (default:
`lm_eval` on PATH). The server's command comes from --server-cmd or $SERVER_CMD (default:
`softprompt-server` on PATH, else beside this interpreter, else the repository's .venv).

    python benchmarks/lm_eval/run.py --lm-eval /path/to/lmeval-venv/bin/lm_eval

Everything after `--` goes to lm-eval unchanged (e.g. `-- --limit 10 --log_samples
--output_path out/`). The exit status is lm-eval's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TASKS_DIR = HERE / "tasks"
DEFAULT_TASKS = "softprompt_sentiment,softprompt_arithmetic"
BUILTIN_PREFIX = "builtin:"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_server_cmd() -> str:
    """`softprompt-server` on PATH, else beside this interpreter (a venv's python run by its
    path, not activated), else in the repository's .venv."""
    found = shutil.which("softprompt-server")
    if found:
        return found
    for candidate in (Path(sys.executable).parent / "softprompt-server",
                      REPO / ".venv" / "bin" / "softprompt-server"):
        if candidate.exists():
            return str(candidate)
    return "softprompt-server"


def _request(method: str, url: str, *, body: bytes | None = None,
             headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Server:
    """`softprompt-server serve` as a child process; its output goes to a log file."""

    def __init__(self, cmd: list[str], log_path: Path) -> None:
        self.cmd = cmd
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def wait_ready(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode} "
                                   f"before it was ready:\n{self.tail()}")
            try:
                status, _ = _request("GET", url + "/readyz", timeout=5)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server was not ready within {timeout:.0f} s:\n{self.tail()}")

    def stop(self) -> None:
        """SIGTERM (the server drains in-flight requests and exits), then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def builtin_dir(model: str, model_cache: Path) -> Path:
    """The directory the server wrote builtin model `model` to (its tokenizer is there)."""
    kind = model.removeprefix(BUILTIN_PREFIX)
    found = []
    for path in model_cache.glob(f"builtin-{kind}-v*"):
        match = re.fullmatch(rf"builtin-{re.escape(kind)}-v(\d+)", path.name)
        if match and (path / "config.json").is_file():
            found.append((int(match.group(1)), path))
    if not found:
        raise RuntimeError(f"no {model} model under --model-cache {model_cache}")
    return max(found)[1]


def make_sample_adapter(server_cmd: list[str], model: str, model_cache: Path,
                        out_dir: Path) -> Path:
    subprocess.run([*server_cmd, "make-sample-adapter", "--model", model,
                    "--model-cache", str(model_cache), str(out_dir)],
                   check=True, stdout=subprocess.DEVNULL)
    return out_dir


def upload_adapter(url: str, adapter_id: str, adapter_dir: Path, api_key: str | None) -> dict:
    """POST /v1/adapters: adapter_config.json and the weights as multipart files; an existing
    adapter of the same id is overwritten."""
    weights = next((adapter_dir / name for name in ("adapter_model.safetensors",
                                                     "adapter_model.bin")
                    if (adapter_dir / name).is_file()), None)
    config = adapter_dir / "adapter_config.json"
    if weights is None or not config.is_file():
        raise RuntimeError(f"{adapter_dir}: needs adapter_config.json and "
                           "adapter_model.safetensors (or .bin)")
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="adapter_id"\r\n\r\n'
             f"{adapter_id}\r\n".encode()]
    for field, path in (("config", config), ("weights", weights)):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                     f'filename="{path.name}"\r\nContent-Type: application/octet-stream'
                     "\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    status, body = _request(
        "POST", url + "/v1/adapters?overwrite=true", body=b"".join(parts), timeout=120,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}", **_auth(api_key)})
    if status not in (200, 201):
        raise RuntimeError(f"uploading {adapter_dir} as {adapter_id!r}: HTTP {status} "
                           f"{body.decode(errors='replace')}")
    return json.loads(body)


def base_model_name(url: str, api_key: str | None) -> str:
    """The served base model's name: the first entry of GET /v1/models."""
    status, body = _request("GET", url + "/v1/models", headers=_auth(api_key))
    if status != 200:
        raise RuntimeError(f"GET /v1/models: HTTP {status} {body.decode(errors='replace')}")
    return json.loads(body)["data"][0]["id"]


def offline_env() -> dict[str, str]:
    """This environment, with the Hub off unless set: local task data and tokenizer."""
    env = dict(os.environ)
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.setdefault(name, "1")
    return env


def lm_eval_python(lm_eval: str) -> list[str] | None:
    """The Python that runs lm-eval: `PY -m lm_eval` names it; a console script's `#!` line
    does; else a `python` beside the script. None if none is found."""
    words = shlex.split(lm_eval)
    if len(words) >= 3 and words[1:3] == ["-m", "lm_eval"]:
        return [words[0]]
    script = shutil.which(words[0]) if words else None
    if script is None:
        return None
    try:
        with open(script, "rb") as f:
            first = f.readline().decode(errors="replace").strip()
    except OSError:
        return None
    if first.startswith("#!") and "python" in first:
        return shlex.split(first[2:])
    beside = Path(script).parent / "python"
    return [str(beside)] if beside.exists() else None


_BOS_PROBE = """
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
bos = tok.bos_token_id
default = tok("a").input_ids
plain = tok("a", add_special_tokens=False).input_ids
adds = bos is not None and default[:1] == [bos] and plain[:1] != [bos]
print(json.dumps({"adds_bos": adds, "bos_token": tok.bos_token}))
"""


def tokenizer_adds_bos(python: list[str], tokenizer: str) -> tuple[bool, str | None]:
    """Whether `tokenizer` prepends its BOS token by default (as lm-eval's `hf` model encodes),
    and that token's text."""
    proc = subprocess.run([*python, "-c", _BOS_PROBE, tokenizer], env=offline_env(),
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"could not load the tokenizer {tokenizer!r} with "
                           f"{shlex.join(python)}:\n{proc.stderr[-2000:]}")
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    return bool(answer["adds_bos"]), answer["bos_token"]


def bos_model_args(lm_eval: str, tokenizer: str, model_args: str) -> list[str]:
    """["add_bos_token=True"] when the tokenizer prepends BOS, else []; says which, and why.
    An `add_bos_token` in model_args is left as given."""
    if re.search(r"(^|,)\s*add_bos_token\s*=", model_args):
        print("add_bos_token: as given in --model-args", flush=True)
        return []
    python = lm_eval_python(lm_eval)
    if python is None:
        raise RuntimeError(f"cannot tell which Python runs {lm_eval!r}, so cannot ask the "
                           "tokenizer whether it adds a BOS token; pass --model-args "
                           "add_bos_token=True (it does) or add_bos_token=False")
    adds, token = tokenizer_adds_bos(python, tokenizer)
    if adds:
        print(f"add_bos_token=True: the tokenizer prepends {token!r}, as lm-eval's hf model "
              "would", flush=True)
        return ["add_bos_token=True"]
    print("add_bos_token left out: the tokenizer prepends no BOS token", flush=True)
    return []


def lm_eval_command(args: argparse.Namespace, *, url: str, model: str, tokenizer: str,
                    extra: list[str], bos_args: Sequence[str] = ()) -> list[str]:
    model_args = [f"model={model}", f"base_url={url}/v1/completions",
                  f"tokenizer={tokenizer}", "tokenizer_backend=huggingface",
                  f"num_concurrent={args.num_concurrent}", f"max_retries={args.max_retries}",
                  *bos_args]
    if args.model_args:
        model_args.append(args.model_args)
    return [*shlex.split(args.lm_eval), "run", "--model", "local-completions",
            "--model_args", ",".join(model_args), "--tasks", args.tasks,
            "--include_path", str(TASKS_DIR), *extra]


def split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    """This script's arguments, and after a `--` those passed through to lm-eval."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    argv, extra = split_extra(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lm-eval", default=os.environ.get("LM_EVAL", "lm_eval"),
                   help="lm-eval's command, split like a shell line (also $LM_EVAL), e.g. "
                        "'/opt/lmeval/bin/lm_eval' or '/opt/lmeval/bin/python -m lm_eval'")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="lm-eval tasks, comma-separated")
    p.add_argument("--url", default=None, help="use this running server instead of "
                   "starting one (e.g. http://127.0.0.1:8000); needs --tokenizer")
    p.add_argument("--server-cmd", default=os.environ.get("SERVER_CMD", _default_server_cmd()),
                   help="softprompt-server's command, split like a shell line (also "
                        "$SERVER_CMD)")
    p.add_argument("--model", default="builtin:tiny", help="--model of the started server")
    p.add_argument("--model-cache", type=Path, default=None, help="--model-cache of the "
                   "started server (default: a fresh directory of this run)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for `softprompt-server serve` (repeatable), e.g. "
                        "--server-arg=--device=cuda")
    p.add_argument("--ready-timeout", type=float, default=600,
                   help="seconds to wait for the started server's /readyz")
    p.add_argument("--tokenizer", default=None, help="the served model's tokenizer for "
                   "lm-eval (a local directory or Hugging Face id; default: the builtin "
                   "model's directory, else --model)")
    p.add_argument("--adapter-dir", type=Path, default=None, help="a PEFT adapter directory "
                   "(adapter_config.json + adapter_model.safetensors) to upload; default: a "
                   "sample adapter made with `softprompt-server make-sample-adapter`")
    p.add_argument("--adapter-id", default="lm-eval-sample", help="the adapter id lm-eval "
                   "sends as `model` (uploaded first, unless --url is given without "
                   "--adapter-dir: then it must exist already)")
    p.add_argument("--no-adapter", action="store_true", help="evaluate the bare base model "
                   "(the base model's name as `model`)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="API key for "
                   "a server started with --api-keys (also $OPENAI_API_KEY, which lm-eval "
                   "sends as the bearer token)")
    p.add_argument("--num-concurrent", type=int, default=1, help="lm-eval's num_concurrent")
    p.add_argument("--max-retries", type=int, default=1, help="lm-eval's max_retries")
    p.add_argument("--model-args", default="", help="more lm-eval model_args, "
                   "comma-separated (e.g. max_length=4096,max_gen_toks=64)")
    p.add_argument("--workdir", type=Path, default=None, help="where the store, model cache, "
                   "sample adapter and server log go (default: a temporary directory, "
                   "removed afterwards)")
    args = p.parse_args(argv)
    if args.url and not args.tokenizer:
        p.error("--url needs --tokenizer (the served model's tokenizer)")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    keep = args.workdir is not None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lm-eval-softprompt-"))
    workdir.mkdir(parents=True, exist_ok=True)
    server_cmd = shlex.split(args.server_cmd)
    model_cache = args.model_cache or workdir / "model-cache"
    server: Server | None = None
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            server = Server([*server_cmd, "serve", "--model", args.model, "--port", str(port),
                             "--store", str(workdir / "store"), "--model-cache",
                             str(model_cache), *args.server_arg], workdir / "server.log")
            print(f"starting the server on {url} (log: {server.log_path})", flush=True)
            server.start()
            server.wait_ready(url, args.ready_timeout)

        if args.no_adapter:
            model = base_model_name(url, args.api_key)
        else:
            model = args.adapter_id
            adapter_dir = args.adapter_dir
            if adapter_dir is None and not args.url:
                adapter_dir = make_sample_adapter(server_cmd, args.model, model_cache,
                                                  workdir / "sample-adapter")
            if adapter_dir is not None:
                record = upload_adapter(url, model, adapter_dir, args.api_key)
                print(f"uploaded adapter {record['adapter_id']!r}: {record['peft_type']}, "
                      f"{record['num_virtual_tokens']} virtual tokens", flush=True)

        tokenizer = args.tokenizer
        if tokenizer is None:
            tokenizer = (str(builtin_dir(args.model, model_cache))
                         if args.model.startswith(BUILTIN_PREFIX) else args.model)

        bos_args = bos_model_args(args.lm_eval, tokenizer, args.model_args)
        cmd = lm_eval_command(args, url=url, model=model, tokenizer=tokenizer, extra=extra,
                              bos_args=bos_args)
        print("running: " + shlex.join(cmd), flush=True)
        env = offline_env()
        if args.api_key:
            env["OPENAI_API_KEY"] = args.api_key
        # The task files name their data relative to the repository root.
        return subprocess.run(cmd, cwd=REPO, env=env, check=False).returncode
    finally:
        if server is not None and server.proc is not None:
            server.stop()
            print(f"server stopped (exit status {server.proc.returncode})", flush=True)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
