"""The monitoring stack of the deploy tests: the real server and a real Prometheus scraping it
with deploy/prometheus/prometheus.yml (retargeted, 1 s intervals) and its alert rules. Each
module that uses the fixtures gets its own pair."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.server_process import ServerProcess, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"


def wait_for(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except httpx.TransportError as e:
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("prom-server")
    with ServerProcess("builtin:tiny", root / "store", root / "server.log",
                       "--model-cache", str(root / "models")) as proc:
        yield proc


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus binary not found: run .ci/system-deps (installs the Debian "
                    "package prometheus) to run this end-to-end test")
    root = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / "alerts.yml")]
    [job] = config["scrape_configs"]
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{server.port}"]
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [binary, f"--config.file={root / 'prometheus.yml'}",
         f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                tail = (root / "prometheus.log").read_text()[-3000:]
                pytest.fail(f"prometheus exited with {proc.returncode}:\n{tail}")
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200

        wait_for(ready, "prometheus /-/ready")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def query(prometheus: str, promql: str) -> list[dict]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=5)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", body
    return body["data"]["result"]


def scalar(prometheus: str, promql: str) -> float | None:
    result = query(prometheus, promql)
    return float(result[0]["value"][1]) if len(result) == 1 else None


