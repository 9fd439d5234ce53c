"""benchmarks/tools: guidellm, aiperf and litellm, unchanged, against one real server with the
sample adapter, a few requests each; every request must succeed, by the tool's own report and
by the server's request counter. A tool's test skips only when its executable is not found
($GUIDELLM, $AIPERF, $LITELLM_PYTHON or PATH; .ci/tools-env installs them)."""

from __future__ import annotations

import os
import stat

import pytest

from benchmarks.tools.cli import diff_counts, print_tools, run_tools, server_counts, serving
from benchmarks.tools.runners import ENV_VARS, Target, find_tool, run_tool

REQUESTS = 8
OUTPUT_TOKENS = 8


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("tools-server")) as t:
        yield t


def _run(tool: str, request: pytest.FixtureRequest, out, *, model: str | None = None):
    """The tool against the module's server (started only once a tool is found)."""
    exe = find_tool(tool, None)
    if exe is None:
        pytest.skip(f"{tool} not found (${ENV_VARS[tool]} or PATH; .ci/tools-env installs it)")
    target = request.getfixturevalue("target")
    if model is not None:
        target = Target(url=target.url, model=model, tokenizer=target.tokenizer)
    before = server_counts(target.url)
    result = run_tool(tool, exe, target, out, requests=REQUESTS, concurrency=4,
                      prompt_tokens=32, output_tokens=OUTPUT_TOKENS, timeout=300)
    result.server = diff_counts(server_counts(target.url), before)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["guidellm", "aiperf", "litellm"])
def test_every_request_of_the_tool_succeeds(tool, request, tmp_path):
    r = _run(tool, request, tmp_path)
    assert r.exit_status == 0, r.notes
    assert (r.ok, r.total) == (REQUESTS, REQUESTS), r.notes
    assert r.version
    generated = sum(n for key, n in r.server.items()
                    if key.startswith("POST /v1/") and key.endswith(" 200"))
    assert generated == REQUESTS, r.server
    assert all(key.rsplit(" ", 1)[1].startswith("2") for key in r.server), r.server
    assert r.passed
    if tool == "guidellm":  # it validates the backend where vLLM answers
        assert r.server.get("GET /health 200", 0) >= 1, r.server


@pytest.mark.slow
def test_a_tool_whose_requests_fail_is_reported_failed(request, tmp_path):
    """The checks can fail: litellm naming an adapter the server does not have gets 404s,
    counted by litellm's records and by the server."""
    r = _run("litellm", request, tmp_path, model="no-such-adapter")
    assert r.ok == 0 and r.total == REQUESTS
    assert not r.passed
    assert sum(n for key, n in r.server.items() if key.endswith(" 404")) == REQUESTS


def _executable(path, text="#!/bin/sh\n"):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_a_tool_is_found_by_flag_then_variable_then_path(tmp_path, monkeypatch):
    flagged = _executable(tmp_path / "flagged")
    named = _executable(tmp_path / "named")
    on_path = tmp_path / "bin"
    on_path.mkdir()
    _executable(on_path / "aiperf")
    monkeypatch.setenv("PATH", f"{on_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("AIPERF", str(named))
    assert find_tool("aiperf", str(flagged)) == str(flagged)
    assert find_tool("aiperf", None) == str(named)
    monkeypatch.delenv("AIPERF")
    assert find_tool("aiperf", None) == str(on_path / "aiperf")
    monkeypatch.setenv("AIPERF", str(tmp_path / "absent"))
    assert find_tool("aiperf", None) is None


def test_litellm_is_the_python_beside_litellm_on_path(tmp_path, monkeypatch):
    _executable(tmp_path / "litellm")
    python = _executable(tmp_path / "python")
    monkeypatch.delenv("LITELLM_PYTHON", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert find_tool("litellm", None) == str(python)


def test_a_missing_tool_is_a_row_not_a_failure(tmp_path, capsys):
    r = run_tools(["aiperf"], flags={"aiperf": str(tmp_path / "absent")}, work_dir=tmp_path)
    rows = {t["tool"]: t for t in r["tools"]}
    assert rows["aiperf"]["found"] is False and rows["aiperf"]["passed"] is False
    assert "package registry" in rows["inference-perf"]["notes"]
    print_tools(r)
    assert "not found" in capsys.readouterr().out
    assert not (tmp_path / "server.log").exists()  # no tool to run, no server started
