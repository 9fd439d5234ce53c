"""deploy/prometheus: promtool accepts the scrape config and the alert rules, and the alerts fire
(and stay quiet) as their unit tests in alerts_test.yml say."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
ALERTS_TEST = Path(__file__).with_name("alerts_test.yml")
REQUIRED_ALERTS = {"SoftpromptHighErrorRate", "SoftpromptQueueSaturated",
                   "SoftpromptPromptCacheThrash", "SoftpromptReplicaDown",
                   "SoftpromptReplicaNotReady"}

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not found: run .ci/system-deps (installs Debian package prometheus)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO_ROOT)


def alert_rules() -> dict[str, dict]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


@needs_promtool
def test_promtool_accepts_the_scrape_config_and_its_rule_files():
    result = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


@needs_promtool
def test_promtool_accepts_the_alert_rules():
    result = promtool("check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout + result.stderr


@needs_promtool
def test_alert_unit_tests_pass():
    result = promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_required_alert_exists_and_is_unit_tested():
    rules = alert_rules()
    assert set(rules) >= REQUIRED_ALERTS
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"page", "ticket"}, name
        assert {"summary", "description"} <= set(rule["annotations"]), name
    tested = {case["alertname"] for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
              for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert set(rules) <= tested, f"alerts never shown to fire: {set(rules) - tested}"


def test_the_scrape_config_targets_the_default_server_port_with_the_alerts_job():
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8000"]
    for rule in alert_rules().values():
        for selector in re.findall(r'job=~"([^"]+)"', rule["expr"]):
            assert re.fullmatch(selector, job["job_name"]), (selector, job["job_name"])
