"""deploy/grafana against a real server, idle and busy: every metric a panel names is in the
server's own /metrics scrape, and what each panel shows is in its range (no negative rate,
no utilisation outside 0 to 100%), evaluated by a real Prometheus scraping that server.

Module-scoped pair (tests/deploy/conftest.py): the idle checks run on a server that has served
nothing yet, so they sit first and take no traffic fixture."""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.deploy.conftest import REPO_ROOT, query, scalar, wait_for

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "softprompt-server.json"
VARIABLES = {"$job": "softprompt-server", "$__rate_interval": "5m"}
KV_PANEL = "KV cache slots in use"
HANG_S = 120  # a bound that only a hang reaches

pytestmark = pytest.mark.slow


def _panels() -> list[tuple[str, str | None, str]]:
    """(title, unit, PromQL with Grafana's variables substituted) per target."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], unit, expr))
    return out


def _values(prometheus: str, expr: str) -> list[float]:
    return [float(r["value"][1]) for r in query(prometheus, expr)]


def _check_range(title: str, unit: str | None, expr: str, values: list[float]) -> None:
    for v in values:
        if not math.isfinite(v):  # a ratio of rates with nothing to divide: Grafana shows none
            continue
        assert v >= 0, f"panel {title!r} shows {v}: {expr}"
        if unit == "percentunit":
            assert v <= 1, f"panel {title!r} shows {v:.1%}: {expr}"


def _scraped_names(server_url: str) -> set[str]:
    text = httpx.get(server_url + "/metrics", timeout=30).text
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def _kv_in_use(prometheus: str) -> float | None:
    [(_, _, expr)] = [p for p in _panels() if p[0] == KV_PANEL]
    return scalar(prometheus, expr)


def test_an_idle_server_shows_no_kv_slot_in_use_and_every_panel_in_range(server, prometheus):
    wait_for(lambda: scalar(prometheus, 'up{job="softprompt-server"}') == 1, "the target up")
    used = wait_for(lambda: (v := _kv_in_use(prometheus)) is not None and [v],
                    "the KV panel to have data")[0]
    assert used == 0.0, f"an idle server's KV slots in use read {used:.1%}"
    for title, unit, expr in _panels():
        _check_range(title, unit, expr, _values(prometheus, expr))


@pytest.fixture(scope="module")
def busy(server, prometheus) -> Iterator[float]:
    """Long requests kept coming until Prometheus has scraped some while they ran and one has
    finished (a series appears at its first observation); yields the KV panel's value while
    they ran. They keep coming until the module ends."""
    done = threading.Event()
    completed: list[int] = []  # one entry per finished request

    def send() -> None:
        with httpx.Client(base_url=server.url, timeout=HANG_S) as client:
            while not done.is_set():
                r = client.post("/v1/generate", json={"text": "busy", "max_new_tokens": 256,
                                                      "ignore_eos": True})
                assert r.status_code == 200, r.text
                completed.append(1)

    workers = [threading.Thread(target=send, daemon=True) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        used = wait_for(lambda: [v for v in [_kv_in_use(prometheus)] if v],
                        "a scrape with KV slots in use", timeout=HANG_S)[0]
        wait_for(lambda: completed, "a request to finish", timeout=HANG_S)
        yield used
    finally:
        done.set()
        for w in workers:
            w.join(HANG_S)


def test_a_busy_server_shows_every_panel_in_range(server, prometheus, busy):
    assert 0 < busy <= 1, f"a busy server's KV slots in use read {busy:.1%}"
    for title, unit, expr in _panels():
        _check_range(title, unit, expr, _values(prometheus, expr))


def test_every_metric_a_panel_names_is_in_a_busy_servers_scrape(server, busy):
    scraped = _scraped_names(server.url)
    for title, _, expr in _panels():
        for name in re.findall(r"\bsoftprompt_\w+", expr):
            assert name in scraped, f"panel {title!r} reads {name}, which /metrics lacks"
