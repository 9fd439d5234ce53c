"""The CLI: flags mirror Settings and SOFTPROMPT_* variables; bad values name the flag."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import sys
import threading

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


def _serve(tmp_path, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server", "serve", "--store", str(tmp_path / "store"),
         "--port", str(free_port()), *argv],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env=None if env is None else os.environ | env)


@pytest.mark.parametrize(("model", "says"), [
    ("{tmp}/missing", "no such directory"),
    ("./no/such/dir", "no such directory"),
    ("{tmp}", "no config.json"),
    ("builtin:huge", "not a built-in model"),
    ("some-org/not-downloaded", "not in the Hugging Face cache"),
])
def test_a_model_that_cannot_be_found_stops_before_binding(tmp_path, model, says):
    proc = _serve(tmp_path, "--model", model.format(tmp=tmp_path),
                  env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--model" in lines[0] and says in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Uvicorn running" not in proc.stderr


def test_checking_the_model_imports_neither_torch_nor_transformers(tmp_path):
    """A wrong --model is reported before the engine's imports, which take seconds on a small
    machine; the check runs before anything else is loaded."""
    code = (
        "import sys\n"
        "from server.engine.model_source import ModelSourceError, check_model_source\n"
        "for model in sys.argv[1:]:\n"
        "    try:\n"
        "        check_model_source(model)\n"
        "    except ModelSourceError as e:\n"
        "        print('refused', model)\n"
        "print('loaded', sorted({'torch', 'transformers'} & set(sys.modules)))\n")
    proc = subprocess.run([sys.executable, "-c", code, "builtin:huge", str(tmp_path / "no"),
                           "builtin:tiny"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, check=True)
    assert proc.stdout.splitlines() == ["refused builtin:huge", f"refused {tmp_path / 'no'}",
                                        "loaded []"]


@pytest.fixture()
def trickling_hub():
    """An HF_ENDPOINT that accepts every connection and answers one byte a second, forever:
    each read gets a byte before any read timeout, as through a stalled proxy."""
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)

    def trickle(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the client giving up closes it
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Pad: ")
            while not stop.wait(1.0):
                conn.sendall(b"a")

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=trickle, args=(conn,), daemon=True).start()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    server.join(5)  # out of accept() before its socket closes
    listener.close()


def test_a_hub_id_not_cached_fails_fast_naming_the_fix_when_the_hub_stalls(tmp_path,
                                                                          trickling_hub):
    """Without HF_HUB_OFFLINE, a stalled hub is given a bounded time, then the process ends
    before binding, saying how to run without the network. (Unbounded, this call never ends:
    the subprocess' limit would fail the test.)"""
    env = {"HF_HUB_CACHE": str(tmp_path / "empty-cache"), "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": trickling_hub, "HF_HUB_OFFLINE": "", "NO_PROXY": "127.0.0.1",
           "no_proxy": "127.0.0.1", "HF_HUB_ETAG_TIMEOUT": "2"}  # the default is 10 s
    proc = _serve(tmp_path, "--model", "some-org/not-downloaded", env=env)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "--model some-org/not-downloaded" in line and "hub cannot be reached" in line
    assert "no answer within 2 s" in line
    assert "HF_HUB_OFFLINE=1" in line and "hf download some-org/not-downloaded" in line


def test_a_model_that_fails_to_load_stops_the_server(tmp_path):
    """Found but unloadable (a broken config.json): the background load fails, the process
    exits 1 naming --model."""
    model = tmp_path / "broken"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "no-such-architecture"}')
    proc = _serve(tmp_path, "--model", str(model))
    assert proc.returncode == 1
    assert "--model" in proc.stderr


def test_an_s3_store_without_boto3_says_which_extra_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "boto3", None)  # what an install without the extra has
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--store", "s3://bucket/prefix", "--model-cache", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--store" in err and "softprompt-server[s3]" in err


def test_served_model_names_are_repeatable_and_comma_separated(monkeypatch):
    args = build_parser().parse_args(["serve", "--served-model-name", "a", "b",
                                      "--served-model-name", "c"])
    assert settings_from_args(args).served_model_name == ["a", "b", "c"]
    monkeypatch.setenv("SOFTPROMPT_SERVED_MODEL_NAME", "x, y")
    assert settings_from_args(build_parser().parse_args(["serve"])).served_model_name == [
        "x", "y"]
    with pytest.raises(ValueError, match="--served-model-name"):
        settings_from_args(build_parser().parse_args(["serve", "--served-model-name", "a",
                                                      "a"]))


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
