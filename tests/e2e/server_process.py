"""The real server as a subprocess (`python -m server serve`) on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackProcess:
    """A server as a subprocess on a free loopback port: started (waiting until `ready_path`
    answers 200, `startup_s` says how long that took), stopped with SIGTERM. Subclasses give
    the command line in `args`, built with `self.port`."""

    ready_path = "/readyz"
    stop_wait_s = 30.0
    start_bound_s = 120.0

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.args: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def __enter__(self) -> LoopbackProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        return dict(os.environ, PYTHONUNBUFFERED="1")

    def start(self, timeout: float | None = None) -> None:
        timeout = self.start_bound_s if timeout is None else timeout
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        started = time.monotonic()
        self.proc = subprocess.Popen(self.args, cwd=REPO_ROOT, env=self.env(), stdout=self._log,
                                     stderr=subprocess.STDOUT)
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args[2]} exited with {self.proc.returncode}:\n"
                                   f"{self.log()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    self.startup_s = time.monotonic() - started
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.args[2]} not ready after {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_wait_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        """The log's tail, for a failure's message."""
        return self.log_path.read_text(errors="replace")[-6000:]

    def full_log(self) -> str:
        """The whole log, to look for a line in (vLLM's shutdown alone can fill the tail)."""
        return self.log_path.read_text(errors="replace")


class ServerProcess(LoopbackProcess):
    """`python -m server serve`; starts on __enter__ (waiting for /readyz)."""

    def __init__(self, model_dir: Path, store: Path, log_path: Path, *extra: str) -> None:
        super().__init__(log_path)
        self.args = [sys.executable, "-m", "server", "serve", "--model", str(model_dir),
                     "--store", str(store), "--host", "127.0.0.1", "--port", str(self.port),
                     "--device", "cpu", "--dtype", "float32", *extra]
        if "vllm" in extra:
            # vLLM compiles its model at every start (75 to 100 s on a quiet 2-core machine, far
            # more while another suite runs): the bound is generous, and the wait ends on /readyz.
            self.start_bound_s = 480.0

    def __enter__(self) -> ServerProcess:
        self.start()
        return self


def metric(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted((labels or {}).items()))
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        sample, _, value = line.rpartition(" ")
        if "{" in sample:
            sample_name, _, rest = sample.partition("{")
            got = ",".join(sorted(rest.rstrip("}").split(","))) if rest.rstrip("}") else ""
        else:
            sample_name, got = sample, ""
        if sample_name == name and got == want:
            return float(value)
    return 0.0


def summed_metric(text: str, name: str) -> float:
    """The sum of a metric's samples over every label set (vLLM labels by model and engine);
    0 when absent."""
    found = 0.0
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if not line.startswith("#") and sample.partition("{")[0] == name:
            found += float(value)
    return found
