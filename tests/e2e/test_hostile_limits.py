"""Hostile input at the edges that protect other clients, through the real server in both
engine modes: numeric fields the engine cannot represent, ids with a trailing newline, chats
built to stall the event loop, method names that would mint metric series, and bodies that
trickle in. Each case is a clean 4xx, the server keeps serving, and nobody else's request
fails because of it.

Nothing here asserts how fast the machine is: a stall of the event loop is measured as the
CPU time its thread spends (from /proc, untouched by other processes' load), and waits are
on events, bounded only against a hang."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from tests.adapters_store.helpers import zip_of_empty_entries
from tests.e2e.conftest import ENGINE_MODES, upload
from tests.e2e.server_process import ServerProcess
from tests.factories import make_adapter

BODY_TIMEOUT_S = 3.0
HANG_S = 60  # a bound on each wait that only a hang reaches
STORED_BYTES_QUOTA = 40_000  # a few tiny adapters; not one with a 45 kB config


@pytest.fixture(scope="module", **ENGINE_MODES)
def limits_server(request, model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    with ServerProcess(model_dir, root / "store", root / "server.log",
                       "--max-batch-size", "16", "--max-wait-ms", "20",
                       "--request-body-timeout-s", str(BODY_TIMEOUT_S),
                       "--tenant-max-stored-bytes", str(STORED_BYTES_QUOTA),
                       # A prompt cache of one adapter's bytes: nearly every request after an
                       # overwrite loads (the overwrite race).
                       "--prompt-cache-bytes", "4096", "--store-refresh-s", "0",
                       *request.param) as proc:
        yield proc


@pytest.fixture()
def lclient(limits_server):
    with httpx.Client(base_url=limits_server.url, timeout=60) as c:
        yield c


def _assert_4xx(r: httpx.Response) -> str:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    body = r.json()
    error = body["error"]
    assert error["message"], body
    return error["message"]


def _good(client: httpx.Client, text: str = "still there?") -> httpx.Response:
    return client.post("/v1/generate", json={"text": text, "max_new_tokens": 3})


BAD_NUMBERS = {
    "top_k-22-digits": {"temperature": 1.0, "top_k": 10**21},
    "top_k-above-vocab": {"temperature": 1.0, "top_k": 10**6},
    "seed-above-64-bits": {"temperature": 1.0, "seed": 2**64},
    "seed-negative": {"temperature": 1.0, "seed": -1},
    "max_new_tokens-22-digits": {"max_new_tokens": 10**21},
    "temperature-negative": {"temperature": -0.5},
    "top_p-zero": {"temperature": 1.0, "top_p": 0.0},
}
# JSON that Python's parser reads as non-finite floats: 1e999 overflows, NaN/Infinity are
# literals it accepts.
NON_FINITE = {
    "temperature-1e999": b'{"text": "x", "temperature": 1e999}',
    "temperature-NaN": b'{"text": "x", "temperature": NaN}',
    "top_p-Infinity": b'{"text": "x", "temperature": 1.0, "top_p": -Infinity}',
}


@pytest.mark.parametrize("case", list(BAD_NUMBERS))
def test_out_of_range_numbers_are_422_and_fail_no_batch_mate(lclient, case):
    """The bad request is refused at the edge; requests submitted at the same moment (batch
    mates it would have had) all succeed."""
    with ThreadPoolExecutor(max_workers=5) as pool:
        mates = [pool.submit(_good, lclient, f"mate {i}") for i in range(4)]
        bad = lclient.post("/v1/generate", json={"text": "x", **BAD_NUMBERS[case]})
        results = [m.result() for m in mates]
    assert bad.status_code == 422, bad.text
    field = case.split("-")[0]
    assert field in _assert_4xx(bad)
    assert [r.status_code for r in results] == [200] * 4


@pytest.mark.parametrize("case", list(NON_FINITE))
def test_non_finite_floats_are_refused(lclient, case):
    r = lclient.post("/v1/generate", content=NON_FINITE[case],
                     headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert "finite" in _assert_4xx(r)
    assert _good(lclient).status_code == 200


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": "x", "top_k": 10**21}),
    ("/v1/completions", {"prompt": "x", "top_k": 10**6, "temperature": 1.0}),
    ("/v1/completions", {"prompt": "x", "seed": 2**64}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "max_tokens": 10**21}),
])
def test_openai_routes_refuse_out_of_range_numbers_with_400(lclient, route, body):
    model = lclient.get("/v1/models").json()["data"][0]["id"]
    r = lclient.post(route, json={"model": model, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


def test_openai_non_finite_temperature_is_400(lclient):
    model = lclient.get("/v1/models").json()["data"][0]["id"]
    r = lclient.post("/v1/completions", headers={"content-type": "application/json"},
                     content=b'{"model": "%s", "prompt": "x", "temperature": 1e999}'
                     % model.encode())
    assert r.status_code == 400, r.text


def test_adapter_ids_with_a_trailing_newline_are_refused_everywhere(lclient, adapter_dirs):
    """`$` matches before a final newline; ids are checked with full-match semantics."""
    good_dir = adapter_dirs["prompt_tuning"][0]
    config = (good_dir / "adapter_config.json").read_bytes()
    weights = (good_dir / "adapter_model.safetensors").read_bytes()
    files = {"config": ("adapter_config.json", config, "application/json"),
             "weights": ("adapter_model.safetensors", weights, "application/octet-stream")}
    assert upload(lclient, "newline-ok", good_dir).status_code == 201

    r = lclient.post("/v1/adapters", data={"adapter_id": "newline-ok\n"}, files=files)
    assert r.status_code == 422, r.text
    assert lclient.get("/v1/adapters/newline-ok%0A").status_code == 422
    assert lclient.delete("/v1/adapters/newline-ok%0A").status_code == 422
    r = lclient.post("/v1/generate", json={"adapter_id": "newline-ok\n", "text": "x"})
    assert r.status_code == 422, r.text
    ids = [a["adapter_id"] for a in lclient.get("/v1/adapters").json()["adapters"]]
    assert ids == ["newline-ok"]


def _probe_health(url: str, stop: threading.Event, out: list[int]) -> None:
    """/healthz, again and again until stopped: the status of each answer."""
    with httpx.Client(base_url=url, timeout=HANG_S) as c:
        while not stop.is_set():
            out.append(c.get("/healthz").status_code)
            time.sleep(0.02)


def _cpu_s(pid: int, thread: int | None = None) -> float:
    """CPU seconds (user + system) a process, or one of its threads, has used (from /proc):
    what it computed, not how long it waited for a CPU."""
    stat = Path(f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()  # from the state, field 3, on
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_chat_of_a_quarter_million_messages_is_refused_without_stalling(lclient,
                                                                         limits_server):
    """Refused by its message count: the event loop decodes and validates the body and does
    nothing more (rendering 250k messages took seconds), while health checks are answered."""
    model = lclient.get("/v1/models").json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": "a"}] * 250_000}
    raw = json.dumps(body, separators=(",", ":")).encode()
    started = time.process_time()
    json.loads(raw)
    decode_s = time.process_time() - started  # what decoding this body costs this machine
    loop = limits_server.proc.pid  # the server's main thread runs the event loop
    stop, statuses = threading.Event(), []
    prober = threading.Thread(target=_probe_health, args=(limits_server.url, stop, statuses))
    prober.start()
    try:
        before = _cpu_s(loop, loop)
        r = lclient.post("/v1/chat/completions", content=raw,
                         headers={"content-type": "application/json"})
        loop_s = _cpu_s(loop, loop) - before
    finally:
        stop.set()
        prober.join()
    assert r.status_code == 400, r.text
    assert "2048" in r.json()["error"]["message"]
    assert statuses and set(statuses) == {200}
    assert loop_s <= 4 * decode_s + 0.05, (loop_s, decode_s)


def test_a_large_prompt_is_tokenized_off_the_event_loop(lclient, limits_server):
    """A prompt of half a million characters takes a while to tokenize; health checks are
    answered meanwhile (the limit still refuses it, after tokenizing). The tokenizing runs on
    another thread: the event loop's thread spends a small share of the CPU the request
    costs the server."""
    pid = limits_server.proc.pid  # its main thread runs the event loop
    stop, statuses = threading.Event(), []
    prober = threading.Thread(target=_probe_health, args=(limits_server.url, stop, statuses))
    prober.start()
    try:
        loop_before, all_before = _cpu_s(pid, pid), _cpu_s(pid)
        r = lclient.post("/v1/generate", json={"text": "ab cd " * 80_000,
                                               "max_new_tokens": 1})
        loop_s, all_s = _cpu_s(pid, pid) - loop_before, _cpu_s(pid) - all_before
    finally:
        stop.set()
        prober.join()
    assert r.status_code in (200, 422), r.text
    assert statuses and set(statuses) == {200}
    assert loop_s <= max(0.01, all_s / 4), (loop_s, all_s)


def test_unknown_methods_share_one_metric_label(lclient):
    reached_the_app = []
    for i in range(5):
        r = lclient.request(f"BREW{i}", "/v1/generate")
        assert 400 <= r.status_code < 500
        reached_the_app.append(r.headers.get("content-type", "").startswith("application/json"))
    text = lclient.get("/metrics").text
    assert "BREW" not in text
    # uvicorn's httptools parser (installed beside vLLM) refuses an unknown method before the
    # app sees it, so nothing is counted; where the app sees them, they share one label.
    if any(reached_the_app):
        assert 'method="other"' in text


def _raw_request(port: int, head: bytes, body_part: bytes) -> tuple[bytes, float]:
    """Send a request whose body stops short; the answer and how long it took (a hang ends
    in the socket's timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_S) as s:
        started = time.perf_counter()
        s.sendall(head + body_part)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and len(data) > data.index(b"\r\n\r\n") + 4:
                break
        return data, time.perf_counter() - started


@pytest.mark.parametrize("path,content_type,start", [
    ("/v1/generate", b"application/json", b'{"text": "slo'),
    ("/v1/adapters", b"multipart/form-data; boundary=xyz",
     b'--xyz\r\nContent-Disposition: form-data; name="config"; filename="c.json"\r\n\r\n{'),
])
def test_a_stalled_body_is_cut_off_with_408(lclient, limits_server, path, content_type, start):
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n".encode()
            + b"Content-Type: " + content_type + b"\r\n\r\n")
    answer, seconds = _raw_request(limits_server.port, head, start)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert seconds > BODY_TIMEOUT_S - 0.2  # not before the deadline (timed from before sending)
    assert b"--request-body-timeout-s" in answer
    assert _good(lclient).status_code == 200
    metrics = lclient.get("/metrics").text
    assert 'status="408"' in metrics


def test_a_slow_but_steady_body_within_the_deadline_is_served(lclient, limits_server):
    """Pieces with pauses between them: about 0.1 s in all, a small part of the deadline."""
    body = json.dumps({"text": "drip", "max_new_tokens": 2}).encode()
    with socket.create_connection(("127.0.0.1", limits_server.port), timeout=HANG_S) as s:
        s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  + f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
        for i in range(0, len(body), 8):
            s.sendall(body[i:i + 8])
            time.sleep(0.02)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def test_the_storage_quota_counts_the_config_stored_verbatim(lclient, adapter_dirs):
    """The embeddings of this adapter are about 1 kB, but its config is padded to 45 kB: all
    of what is written counts, so it does not fit in a 40 kB quota."""
    good_dir = adapter_dirs["prompt_tuning"][0]
    config = json.loads((good_dir / "adapter_config.json").read_bytes())
    weights = (good_dir / "adapter_model.safetensors").read_bytes()
    padded = json.dumps(config | {"notes": "x" * 45_000}).encode()
    files = {"config": ("adapter_config.json", padded, "application/json"),
             "weights": ("adapter_model.safetensors", weights, "application/octet-stream")}

    r = lclient.post("/v1/adapters", data={"adapter_id": "padded"}, files=files)

    assert r.status_code == 413, r.text
    assert r.json()["error"]["type"] == "quota_exceeded"
    assert lclient.get("/v1/adapters/padded").status_code == 404
    small = upload(lclient, "small", good_dir)
    assert small.status_code == 201, small.text
    assert "stored_bytes" not in small.json()  # the record's fields are the contract's
    assert lclient.delete("/v1/adapters/small").status_code == 204


def test_a_config_over_64_kib_is_413(lclient, adapter_dirs):
    good_dir = adapter_dirs["prompt_tuning"][0]
    config = json.loads((good_dir / "adapter_config.json").read_bytes())
    huge = json.dumps(config | {"notes": "x" * 70_000}).encode()
    files = {"config": ("adapter_config.json", huge, "application/json"),
             "weights": ("adapter_model.safetensors",
                         (good_dir / "adapter_model.safetensors").read_bytes(),
                         "application/octet-stream")}
    r = lclient.post("/v1/adapters", data={"adapter_id": "huge-config"}, files=files)
    assert r.status_code == 413, r.text
    assert "adapter_config.json" in r.json()["error"]["message"]


# ---- uploads whose reading or collapse used to raise, allocate or take seconds ------------


def _safetensors_with_header(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _hostile_uploads(adapter_dirs) -> dict[str, dict]:
    good = adapter_dirs["prompt_tuning"][0]
    config = (good / "adapter_config.json").read_bytes()
    rows, dim = json.loads(config)["num_virtual_tokens"], 64
    raw = adapter_dirs["encoder_raw"][0]
    raw_config = json.loads((raw / "adapter_config.json").read_bytes())
    bomb_config = json.dumps(raw_config | {"encoder_hidden_size": 10**6}).encode()
    hidden = 10**6
    bomb = {"embedding.weight": torch.zeros(raw_config["num_virtual_tokens"], dim),
            "mlp_head.0.weight": torch.zeros(1, 1).expand(hidden, dim),
            "mlp_head.0.bias": torch.zeros(1).expand(hidden),
            "mlp_head.2.weight": torch.zeros(1, 1).expand(hidden, hidden),
            "mlp_head.2.bias": torch.zeros(1).expand(hidden),
            "mlp_head.4.weight": torch.zeros(1, 1).expand(dim, hidden),
            "mlp_head.4.bias": torch.zeros(dim)}
    many = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
            for i in range(100_000)}

    def pair(cfg: bytes, weights: bytes, name: str) -> dict:
        return {"config": ("adapter_config.json", cfg, "application/json"),
                "weights": (name, weights, "application/octet-stream")}

    return {
        "unknown-dtype": pair(config, _safetensors_with_header(
            {"prompt_embeddings": {"dtype": "F4", "shape": [rows, dim],
                                   "data_offsets": [0, rows * dim]}}, b"\0" * rows * dim),
            "adapter_model.safetensors"),
        "meta-tensor-bin": pair(config, _torch_bytes(
            {"prompt_embeddings": torch.empty(rows, dim, device="meta")}), "adapter_model.bin"),
        "zero-stride-encoder-bomb": pair(bomb_config, _torch_bytes(bomb), "adapter_model.bin"),
        "100k-tensor-header": pair(config, _safetensors_with_header(many),
                                   "adapter_model.safetensors"),
        "100k-entry-zip": {"archive": ("a.zip", zip_of_empty_entries(100_000),
                                       "application/zip")},
        "100k-record-bin": pair(config, zip_of_empty_entries(100_000), "adapter_model.bin"),
    }


UPLOADS = ["unknown-dtype", "meta-tensor-bin", "zero-stride-encoder-bomb", "100k-tensor-header",
           "100k-entry-zip", "100k-record-bin"]


@pytest.mark.parametrize("case", UPLOADS)
def test_an_upload_that_cannot_be_read_is_a_4xx_naming_the_file(lclient, adapter_dirs, case):
    """Each is refused by a check made before the costly step (tests/adapters_store assert
    which work is skipped, without timing it); the server keeps serving."""
    files = _hostile_uploads(adapter_dirs)[case]
    r = lclient.post("/v1/adapters", data={"adapter_id": f"bad-{case}"}, files=files)
    message = _assert_4xx(r)
    assert r.status_code in (400, 413), r.text
    assert "adapter_model" in message or "archive" in message, message
    assert lclient.get(f"/v1/adapters/bad-{case}").status_code == 404
    assert _good(lclient).status_code == 200


# ---- adapter versions racing overwrites ---------------------------------------------------

OVERWRITES, SERVED = 5, 10  # the race runs until both have happened
TEXT = "Tweet: I love it. Label:"


@pytest.fixture(scope="module")
def versions(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("race-adapters")
    return [make_adapter(model_dir, root / f"v{n}", "prompt_tuning", num_virtual_tokens=n,
                         seed=40 + n) for n in (2, 7)]


def _generate(client: httpx.Client, adapter_id: str) -> httpx.Response:
    return client.post("/v1/generate", json={"adapter_id": adapter_id, "text": TEXT,
                                             "max_new_tokens": 4, "ignore_eos": True})


def test_requests_racing_overwrites_use_one_whole_version(limits_server, versions):
    """Every request racing overwrites runs with one whole version (that version's output,
    token for token) or fails cleanly with 409; never a 5xx, never two versions mixed."""
    with httpx.Client(base_url=limits_server.url, timeout=60) as client:
        expected = {}
        for path in versions:  # each version's output, served alone under its own id
            n = path.name
            assert upload(client, f"ref-{n}", path).status_code == 201
            r = _generate(client, f"ref-{n}")
            assert r.status_code == 200, r.text
            expected[r.json()["usage"]["virtual_tokens"]] = r.json()["token_ids"]
        assert upload(client, "raced", versions[0]).status_code == 201

        stop = threading.Event()
        overwritten: list[int] = []
        served: list[httpx.Response] = []

        def overwrite() -> int:
            done = 0
            while not stop.is_set():
                r = upload(client, "raced", versions[done % 2], overwrite=True)
                assert r.status_code == 201, r.text
                done += 1
                overwritten.append(done)
            return done

        def generate() -> list[httpx.Response]:
            out = []
            while not stop.is_set():
                out.append(_generate(client, "raced"))
                if out[-1].status_code == 200:
                    served.append(out[-1])
            return out

        with ThreadPoolExecutor(max_workers=5) as pool:
            writer = pool.submit(overwrite)
            readers = [pool.submit(generate) for _ in range(4)]
            # Race until enough of both happened, however long that takes (a hang: HANG_S).
            deadline = time.monotonic() + HANG_S
            while (len(overwritten) < OVERWRITES or len(served) < SERVED) \
                    and time.monotonic() < deadline \
                    and not any(f.done() for f in (writer, *readers)):  # none has failed
                time.sleep(0.05)
            stop.set()
            overwrites = writer.result()
            responses = [r for f in readers for r in f.result()]
        for adapter_id in ("raced", *(f"ref-{p.name}" for p in versions)):
            assert client.delete(f"/v1/adapters/{adapter_id}").status_code == 204

    statuses = {r.status_code for r in responses}
    assert statuses <= {200, 409}, [(r.status_code, r.text[:200]) for r in responses
                                    if r.status_code not in (200, 409)]
    ok = [r.json() for r in responses if r.status_code == 200]
    assert overwrites >= OVERWRITES and len(ok) >= SERVED
    for body in ok:
        assert body["token_ids"] == expected[body["usage"]["virtual_tokens"]], body
    for r in responses:
        if r.status_code == 409:
            assert r.json()["error"]["type"] == "adapter_changed"
