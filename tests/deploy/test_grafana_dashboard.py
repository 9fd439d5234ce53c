"""deploy/grafana: every panel's PromQL, run by a real Prometheus that scraped a real server
serving a little traffic (adapters, a bare model, a stream, a 404), returns data; and the gpu
overlay provisions the dashboard for Grafana's sidecar."""

from __future__ import annotations

import json
import math
import subprocess

import httpx
import pytest
import yaml

from server.sample_adapter import write_sample_adapter
from tests.deploy.conftest import REPO_ROOT, query, scalar, wait_for

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "softprompt-server.json"
# What Grafana substitutes: the job variable (All) and the rate window.
VARIABLES = {"$job": "softprompt-server", "$__rate_interval": "5m"}
FIRST_TOKENS = 'sum(softprompt_time_to_first_token_seconds_count{job="softprompt-server"})'

pytestmark = pytest.mark.slow


def _targets() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"]
            for target in panel["targets"]]


def _promql(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"an unsubstituted variable in {expr}"
    return expr


@pytest.fixture(scope="module")
def traffic(server, prometheus, tmp_path_factory) -> int:
    """Sent once Prometheus scrapes the server, so every rate sees it grow."""
    wait_for(lambda: scalar(prometheus, 'up{job="softprompt-server"}') == 1, "the target up")
    adapter = write_sample_adapter(tmp_path_factory.mktemp("adapter") / "a",
                                   model="builtin:tiny",
                                   model_cache=tmp_path_factory.mktemp("models"))
    generated = 0
    with httpx.Client(base_url=server.url, timeout=120) as client:
        files = {name: (name, (adapter / name).read_bytes())
                 for name in ("adapter_config.json", "adapter_model.safetensors")}
        r = client.post("/v1/adapters", data={"adapter_id": "dash"},
                        files={"config": files["adapter_config.json"],
                               "weights": files["adapter_model.safetensors"]})
        assert r.status_code == 201, r.text
        for i, adapter_id in enumerate(["dash", None, "dash", "dash", None, "dash"]):
            r = client.post("/v1/generate", json={"adapter_id": adapter_id, "text": f"r{i}",
                                                  "max_new_tokens": 3, "ignore_eos": True})
            assert r.status_code == 200, r.text
            generated += r.json()["usage"]["completion_tokens"]
            if i == 1:
                # A labelled series starts at its first observation: traffic spread over two
                # scrapes at least, so that rates over every series grow, as in production.
                wait_for(lambda: scalar(prometheus, FIRST_TOKENS) == 2, f"{FIRST_TOKENS} == 2")
        with client.stream("POST", "/v1/generate", json={
                "adapter_id": "dash", "text": "s", "max_new_tokens": 3, "ignore_eos": True,
                "stream": True}) as r:
            assert r.status_code == 200 and "[DONE]" in r.read().decode()
        generated += 3
        r = client.post("/v1/generate", json={"adapter_id": "ghost", "text": "x"})
        assert r.status_code == 404
    total = 'sum(softprompt_generated_tokens_total{job="softprompt-server"})'
    wait_for(lambda: scalar(prometheus, total) == generated, f"{total} == {generated}")
    return generated


def test_the_dashboard_shows_what_operators_asked_for():
    exprs = " ".join(expr for _, expr in _targets())
    for metric in ("softprompt_requests_total", "softprompt_time_to_first_token_seconds_bucket",
                   "softprompt_queue_wait_seconds_bucket", "softprompt_batch_size_sum",
                   "softprompt_batch_distinct_adapters_sum", "softprompt_engine_kv_slots_free",
                   "softprompt_resident_adapter_bytes", "softprompt_prefix_cache_hits_total"):
        assert metric in exprs, metric
    assert 'sum by (tenant) (rate(softprompt_requests_total' in exprs
    assert 'status=~"[45].."' in exprs


@pytest.mark.parametrize(("title", "expr"), _targets())
def test_every_panel_query_returns_data(prometheus, traffic, title, expr):
    def answered() -> list[dict] | None:
        result = query(prometheus, _promql(expr))
        finite = [r for r in result if math.isfinite(float(r["value"][1]))]
        return finite or None

    wait_for(answered, f"panel {title!r}: {expr} to return a finite value", timeout=20)


def test_the_gpu_overlay_provisions_the_dashboard_for_grafanas_sidecar():
    overlay = REPO_ROOT / "deploy" / "kubernetes" / "overlays" / "gpu"
    built = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True,
                           text=True, check=False)
    if built.returncode != 0 and "not found" in built.stderr:
        pytest.skip("kubectl not found: run .ci/system-deps")
    assert built.returncode == 0, built.stderr
    maps = [d for d in yaml.safe_load_all(built.stdout)
            if d and d["kind"] == "ConfigMap"
            and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert len(maps) == 1
    assert json.loads(maps[0]["data"]["softprompt-server.json"]) == json.loads(
        DASHBOARD.read_text())
