"""Heavy requests do not stall the event loop, through the real server in both engine modes.

A request whose answer is large (every token's text of a long prompt, n echoed choices with
top logprobs) is built off the event loop: health checks sent meanwhile keep being answered.
No wall-clock bound is asserted: each check compares the longest time the server left the
health checks unanswered with how long the heavy work itself took, which holds on a slow or
loaded machine and fails when the loop is blocked for most of that work.

/tokenize and /detokenize are bounded by the tenant's max_input_tokens, as generation is.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from transformers import AutoTokenizer

from tests.e2e.conftest import ENGINE_MODES
from tests.e2e.server_process import ServerProcess

KEYS = {"roomy": "roomy-secret-1", "tight": "tight-secret-2"}
TIGHT_INPUT_TOKENS = 64  # the tight tenant's max_input_tokens
ROOMY_INPUT_TOKENS = 1_500_000  # the server's, so a prompt of a million tokens is allowed
LONG_PROMPT = "ab cd é" * ((1 << 20) // 7)  # 1 MiB of text, 8 byte tokens per 7 characters


def _auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture(scope="module", **ENGINE_MODES)
def loop_server(request, model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("event-loop")
    keys = root / "keys.json"
    keys.write_text(json.dumps({"tenants": [
        {"name": "roomy", "keys": [KEYS["roomy"]]},
        {"name": "tight", "keys": [KEYS["tight"]],
         "quotas": {"max_input_tokens": TIGHT_INPUT_TOKENS}}]}))
    with ServerProcess(model_dir, root / "store", root / "server.log", "--api-keys", str(keys),
                       "--max-input-tokens", str(ROOMY_INPUT_TOKENS), "--max-batch-size", "32",
                       *request.param) as proc:
        yield proc


@pytest.fixture()
def roomy(loop_server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=loop_server.url, timeout=300, headers=_auth("roomy")) as c:
        yield c


@pytest.fixture()
def tight(loop_server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=loop_server.url, timeout=60, headers=_auth("tight")) as c:
        yield c


class HealthProbe:
    """Polls /healthz on a thread of its own and keeps the time of every answer."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.answers: list[float] = []

    def _run(self) -> None:
        with httpx.Client(base_url=self._url, timeout=120) as c:
            while not self._stop.is_set():
                assert c.get("/healthz").status_code == 200
                self.answers.append(time.perf_counter())
                time.sleep(0.01)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        deadline = time.monotonic() + 30
        while len(self.answers) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.answers) >= 3, "no health answers before the heavy request"
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.1)  # one more answer after the heavy request closes its window
        self._stop.set()
        self._thread.join(120)

    def longest_silence(self, start: float, end: float) -> float:
        """The longest stretch of [start, end] in which no health check was answered."""
        points = [start, *(t for t in self.answers if start < t < end), end]
        return max(b - a for a, b in zip(points, points[1:], strict=False))


def _engine_seconds(response: httpx.Response) -> float:
    """How long the engine took for the request, from its Server-Timing header."""
    match = re.search(r"engine;dur=([0-9.]+)", response.headers["server-timing"])
    assert match, response.headers["server-timing"]
    return float(match.group(1)) / 1000


@pytest.mark.slow
def test_token_strings_of_a_long_prompt_leave_health_checks_answered(roomy, loop_server,
                                                                     model_dir):
    with HealthProbe(loop_server.url) as probe:
        started = time.perf_counter()
        r = roomy.post("/tokenize", json={"prompt": LONG_PROMPT, "return_token_strs": True})
        ended = time.perf_counter()
    assert r.status_code == 200, r.text[:500]
    silence = probe.longest_silence(started, ended)
    # Tokenizing, decoding a million token strings and writing the answer took `ended -
    # started`; a loop blocked for that work leaves health checks unanswered for most of it.
    assert silence < (ended - started) / 2, (silence, ended - started)
    body = r.json()
    reference = AutoTokenizer.from_pretrained(model_dir)
    ids = body["tokens"]
    assert body["count"] == len(ids) > 1_000_000
    alone = {i: reference.decode([i], skip_special_tokens=True) for i in set(ids)}
    assert body["token_strs"] == [alone[i] for i in ids]  # each id decoded alone


ECHO_PROMPT = "the quick brown fox " * 24  # 480 byte tokens
ECHOED_CHOICES = 32


def _probed_echo(client: httpx.Client, url: str, *, new_tokens: int,
                 seed: int) -> tuple[httpx.Response, HealthProbe, float, float]:
    """32 echoed choices of ECHO_PROMPT with 20 top logprobs per token, sent while health
    checks are probed: (the answer, the probe, when it was sent, when it was answered)."""
    model = client.get("/v1/models").json()["data"][0]["id"]
    request = {"model": model, "prompt": ECHO_PROMPT, "max_tokens": new_tokens,
               "n": ECHOED_CHOICES, "echo": True, "logprobs": 20, "temperature": 1.0,
               "seed": seed, "ignore_eos": True}
    with HealthProbe(url) as probe:
        started = time.perf_counter()
        r = client.post("/v1/completions", json=request)
        ended = time.perf_counter()
    assert r.status_code == 200, r.text[:500]
    choices = r.json()["choices"]
    assert len(choices) == ECHOED_CHOICES
    for choice in choices:
        assert len(choice["logprobs"]["top_logprobs"]) == 1 + 480 + new_tokens
    return r, probe, started, ended


@pytest.mark.slow
def test_n_echoed_choices_with_top_logprobs_leave_health_checks_answered(roomy, loop_server):
    # 480 prompt tokens and 20 new: 501 of the context's 512.
    r, probe, started, ended = _probed_echo(roomy, loop_server.url, new_tokens=20, seed=3)
    # The engine's part (generating, and under --engine-process receiving the rows) is not
    # what is checked here: the window is what came after it, writing 32 choices of 501
    # tokens with 21 logprobs each.
    window_start = started + _engine_seconds(r)
    assert ended > window_start
    silence = probe.longest_silence(window_start, ended)
    assert silence < (ended - window_start) / 2, (silence, ended - window_start)
    for choice in r.json()["choices"]:
        assert choice["text"].startswith(ECHO_PROMPT)
        assert choice["logprobs"]["top_logprobs"][-1]  # the last token's top logprobs


@pytest.mark.slow
def test_rows_from_the_engine_process_leave_health_checks_answered(roomy, loop_server):
    """Under --engine-process the rows cross a pipe, several MB for 32 echoed rows with 21
    logprobs per token, and this process decodes them: over the whole request, not only
    while its answer is written, health checks are answered. With one new token the
    engine's own work is a small part of the request, so a loop blocked while the rows
    arrive and are decoded (for about a tenth of it or more) shows."""
    if "--engine-process" not in loop_server.args:
        pytest.skip("in process, no rows cross a pipe")
    r, probe, started, ended = _probed_echo(roomy, loop_server.url, new_tokens=1, seed=5)
    silence = probe.longest_silence(started, ended)
    assert silence < (ended - started) / 20, (silence, ended - started)
    for choice in r.json()["choices"]:
        assert choice["logprobs"]["top_logprobs"][1]  # a prompt token's top logprobs


def test_the_served_processes_leave_their_startup_heap_out_of_full_collections(loop_server):
    """A full garbage-collector pass over what torch, transformers and the model left
    (several hundred thousand objects) held the interpreter lock for about 200 ms, long
    enough to fail a health check; each served process freezes that heap once loaded."""
    processes = 2 if "--engine-process" in loop_server.args else 1
    deadline = time.monotonic() + 60  # the freeze follows readiness: wait for its log line
    while True:
        frozen = [int(n) for n in re.findall(
            r"garbage collector: (\d+) objects loaded at startup",
            loop_server.log_path.read_text(errors="replace"))]
        if len(frozen) >= processes or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(frozen) == processes, loop_server.log()[-3000:]
    assert all(n > 100_000 for n in frozen), frozen


def _limit_error(r: httpx.Response, param: str) -> str:
    assert r.status_code == 400, r.text[:500]
    error = r.json()["error"]
    assert error["param"] == param
    assert f"max_input_tokens={TIGHT_INPUT_TOKENS}" in error["message"]
    return error["message"]


def test_tokenize_is_bounded_by_the_tenants_input_limit(tight):
    fits = "x" * (TIGHT_INPUT_TOKENS - 1)  # with the BOS token, exactly the limit
    r = tight.post("/tokenize", json={"prompt": fits})
    assert r.status_code == 200 and r.json()["count"] == TIGHT_INPUT_TOKENS, r.text
    over = "x" * TIGHT_INPUT_TOKENS
    message = _limit_error(tight.post("/tokenize", json={"prompt": over}), "prompt")
    assert str(TIGHT_INPUT_TOKENS + 1) in message  # the count
    # Generation refuses the same prompt for the same reason.
    model = tight.get("/v1/models").json()["data"][0]["id"]
    r = tight.post("/v1/completions", json={"model": model, "prompt": over, "max_tokens": 1})
    assert r.status_code == 400 and "max_input_tokens" in r.json()["error"]["message"]


def test_tokenize_refuses_text_that_cannot_fit_before_tokenizing_it(tight):
    huge = "x" * (64 * TIGHT_INPUT_TOKENS + 1)  # no tokenizer makes it fewer tokens
    message = _limit_error(tight.post("/tokenize", json={"prompt": huge}), "prompt")
    assert "longer than" in message


def test_tokenize_bounds_chat_messages_too(tight):
    messages = [{"role": "user", "content": "y" * (64 * TIGHT_INPUT_TOKENS + 1)}]
    _limit_error(tight.post("/tokenize", json={"messages": messages}), "messages")


def test_detokenize_is_bounded_by_the_tenants_input_limit(tight):
    r = tight.post("/detokenize", json={"tokens": [100] * TIGHT_INPUT_TOKENS})
    assert r.status_code == 200 and len(r.json()["prompt"]) == TIGHT_INPUT_TOKENS
    message = _limit_error(tight.post("/detokenize",
                                      json={"tokens": [100] * (TIGHT_INPUT_TOKENS + 1)}),
                           "tokens")
    assert str(TIGHT_INPUT_TOKENS + 1) in message
