"""The CLI: flags mirror Settings and SOFTPROMPT_* variables; bad values name the flag."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import httpx
import pytest
from transformers import AutoTokenizer

from server.cli import build_parser, main, settings_from_args
from server.config import Settings
from tests.e2e.server_process import REPO_ROOT, free_port
from tests.factories import peft_reference_generate


def _settings(argv: list[str]) -> Settings:
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_flag_beats_env_beats_default(monkeypatch):
    assert _settings([]).max_batch_size == 32
    monkeypatch.setenv("SOFTPROMPT_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("SOFTPROMPT_DTYPE", "BFLOAT16")
    assert _settings([]).max_batch_size == 7
    assert _settings(["--max-batch-size", "9"]).max_batch_size == 9
    assert _settings([]).dtype == "bfloat16"
    assert _settings(["--port", "9001"]).port == 9001


def test_every_setting_has_a_documented_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    serve = capsys.readouterr().out
    for name in Settings.model_fields:
        flag, env = "--" + name.replace("_", "-"), "SOFTPROMPT_" + name.upper()
        assert flag in top and env in top and flag in serve, name


@pytest.mark.parametrize(("argv", "named"), [
    (["--max-batch-size", "0"], "--max-batch-size"),
    (["--port", "http"], "--port"),
    (["--max-wait-ms", "-1"], "--max-wait-ms"),
    (["--api-keys", "/no/such/file.json"], "--api-keys"),
])
def test_invalid_values_fail_naming_the_flag(argv, named, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", *argv])
    assert exc.value.code == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("content", ["{not json", '{"tenants": [{"name": "../x", "keys": ["k"]}]}',
                                     '{"admin_keys": ["sha256:nothex"]}',
                                     '{"tenants": [{"name": "a", "keys": ["k"], "weight": 0}]}',
                                     '{"tenants": [{"name": "a", "keys": ["k"], "weight": 1e6}]}'])
def test_a_bad_api_keys_file_fails_startup_naming_the_flag(tmp_path, content, capsys):
    keys = tmp_path / "keys.json"
    keys.write_text(content)
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--api-keys", str(keys), "--store", str(tmp_path / "store")])
    assert exc.value.code == 2
    assert "--api-keys" in capsys.readouterr().err


def test_unloadable_model_stops_the_server(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--model", str(tmp_path / "missing"),
         "--store", str(tmp_path / "store"), "--port", str(free_port())],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "--model" in proc.stderr


async def test_sample_adapter_is_peft_format_and_serves(app, client, tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["llama"]
    out = tmp_path / "sample"
    assert main(["make-sample-adapter", str(out), "--model", str(model_dir),
                 "--num-virtual-tokens", "5", "--seed", "3"]) == 0
    files = {"config": ("adapter_config.json", (out / "adapter_config.json").read_bytes()),
             "weights": ("adapter_model.safetensors",
                         (out / "adapter_model.safetensors").read_bytes())}
    r = await client.post("/v1/adapters", data={"adapter_id": "sample"}, files=files)
    assert r.status_code == 201, r.text
    assert r.json()["num_virtual_tokens"] == 5 and r.json()["peft_type"] == "PROMPT_TUNING"
    r = await client.post("/v1/generate", json={"adapter_id": "sample", "text": "hi",
                                                "max_new_tokens": 6, "ignore_eos": True})
    assert isinstance(r, httpx.Response) and r.status_code == 200
    prompt_ids = AutoTokenizer.from_pretrained(model_dir)("hi")["input_ids"]
    assert r.json()["token_ids"] == peft_reference_generate(model_dir, out, prompt_ids, 6)


def test_sample_adapter_for_the_builtin_model(tmp_path):
    assert main(["make-sample-adapter", str(tmp_path / "a"),
                 "--model-cache", str(tmp_path / "cache")]) == 0
    config = (tmp_path / "a" / "adapter_config.json").read_text()
    assert '"token_dim": 128' in config and '"peft_type": "PROMPT_TUNING"' in config


def test_sample_adapter_files_are_readable_by_others(tmp_path):
    out = tmp_path / "a"
    old = os.umask(0o077)  # as under a strict login shell
    try:
        assert main(["make-sample-adapter", str(out),
                     "--model-cache", str(tmp_path / "cache")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {"adapter_config.json": 0o644, "adapter_model.safetensors": 0o644}
