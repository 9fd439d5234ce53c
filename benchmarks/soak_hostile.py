"""The soak benchmark's hostile tenant and its health prober.

One more tenant sends, in turn, what a careless or hostile client sends: lone surrogates in
every text field, booleans and strings where numbers belong, lookalike digits and control
characters in an upload's template, a tokenize request over the input bound and one just
within it with every token's text, and completions that are heavy to answer (n=32, echo, 20
top logprobs). Each must get its documented answer (a 4xx, or a 200 for the heavy but valid
ones), never a 5xx, while the other tenants stream. Beside it a prober asks `/healthz` every
50 ms; the report gives the slowest answer seen over the run (target under 100 ms): a request
whose work runs on the server's event loop shows there. The prober runs in a process of its
own, so the clients' work never delays it.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx

from benchmarks.soak_state import Kind, Tenant, Traffic

HEALTH_TARGET_MS = 100.0
HEALTH_PERIOD_S = 0.05
_REFUSED = frozenset({"400", "413", "422"})
_SERVED = frozenset({"200", "429"})


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: bytes | None  # raw JSON (lone surrogates cannot go through json= in a client)
    expected: frozenset[str]
    template: str | None = None  # an upload with this template instead of a JSON body


def _raw(obj: Any) -> bytes:
    """JSON whose \\ud800 escapes stay escapes: decoded, they are lone surrogates."""
    return json.dumps(obj).replace("LONE", "\\ud800").encode()


def cases(model: str, adapter: str) -> list[Case]:
    words = " ".join(("tweet", "label", "the", "quick", "brown", "fox")) + " "
    return [
        Case("surrogate-generate", "/v1/generate",
             _raw({"adapter_id": adapter, "text": "hi LONE", "max_new_tokens": 2}), _REFUSED),
        Case("surrogate-completions", "/v1/completions",
             _raw({"model": adapter, "prompt": "hi LONE", "max_tokens": 2}), _REFUSED),
        Case("surrogate-completions-list", "/v1/completions",
             _raw({"model": adapter, "prompt": ["ok", "hi LONE"], "max_tokens": 2}), _REFUSED),
        Case("surrogate-chat", "/v1/chat/completions",
             _raw({"model": adapter, "max_tokens": 2,
                   "messages": [{"role": "user", "content": "hi LONE"}]}), _REFUSED),
        Case("surrogate-chat-part", "/v1/chat/completions",
             _raw({"model": adapter, "max_tokens": 2, "messages": [
                 {"role": "user", "content": [{"type": "text", "text": "LONE"}]}]}), _REFUSED),
        Case("surrogate-tokenize", "/tokenize", _raw({"model": model, "prompt": "LONE"}),
             _REFUSED),
        Case("surrogate-tokenize-chat", "/tokenize",
             _raw({"model": model, "messages": [{"role": "user", "content": "LONE"}]}),
             _REFUSED),
        Case("bool-token-ids", "/v1/completions",
             _raw({"model": adapter, "prompt": [True, False], "max_tokens": 2}), _REFUSED),
        Case("string-logprobs", "/v1/completions",
             _raw({"model": adapter, "prompt": "hi", "logprobs": "3", "max_tokens": 2}),
             _REFUSED),
        Case("bool-logprobs", "/v1/completions",
             _raw({"model": adapter, "prompt": "hi", "logprobs": True, "max_tokens": 2}),
             _REFUSED),
        Case("tokenize-over-bound", "/tokenize",
             _raw({"model": model, "prompt": "x" * (512 * 1024), "return_token_strs": True}),
             _REFUSED),
        Case("tokenize-token-strs", "/tokenize",
             _raw({"model": model, "prompt": words * 60, "return_token_strs": True}), _SERVED),
        Case("heavy-completions", "/v1/completions",
             _raw({"model": adapter, "prompt": words * 20, "n": 32, "echo": True,
                   "logprobs": 20, "max_tokens": 8, "temperature": 0.7}), _SERVED),
        Case("template-fullwidth-digit", "/v1/adapters", None, _REFUSED,
             template="{soft:\uff18}{text}"),
        Case("template-control-char", "/v1/adapters", None, _REFUSED,
             template="{soft}\x00{text}\u202e"),
    ]


async def run_hostile(traffic: Traffic, tenant: Tenant, rng: random.Random) -> None:
    """The hostile mix in turn until the deadline, every case first once."""
    adapter = next(iter(tenant.stable))
    mix = cases(traffic.model, adapter)
    async with httpx.AsyncClient(base_url=traffic.base_url,
                                 headers={"Authorization": f"Bearer {tenant.key}"},
                                 timeout=httpx.Timeout(traffic.request_timeout_s * 4,
                                                       connect=10)) as http:
        turn = 0
        while time.monotonic() < traffic.deadline:
            case = mix[turn] if turn < len(mix) else rng.choice(mix)
            turn += 1
            await _send(traffic, tenant, http, rng, case)


async def _send(traffic: Traffic, tenant: Tenant, http: httpx.AsyncClient,
                rng: random.Random, case: Case) -> None:
    started = time.monotonic()
    try:
        if case.template is not None:
            files = rng.choice(traffic.variants)
            r = await http.post("/v1/adapters",
                                data={"adapter_id": f"hostile-{case.name}",
                                      "template": case.template},
                                files={"config": ("adapter_config.json", files.config),
                                       "weights": ("adapter_model.safetensors", files.weights)})
        else:
            r = await http.post(case.path, content=case.body,
                                headers={"content-type": "application/json"})
        status, problem = str(r.status_code), r.text[:300]
    except httpx.TimeoutException as e:
        status, problem = "timeout", repr(e)
    except httpx.TransportError as e:
        status, problem = "conn-error", repr(e)
    traffic.record(Kind.HOSTILE, tenant, status, started, expected=status in case.expected,
                   detail=f"{case.name} {case.path} -> {status}: {problem}")
    if status == "429":
        await asyncio.sleep(rng.uniform(0.5, 1.0))


async def probe_health(traffic: Traffic) -> dict[str, Any]:
    """`/healthz` every HEALTH_PERIOD_S until the deadline, from a process of its own: in this
    one, the clients' event loop (parsing a multi-megabyte answer) would delay the probe and
    count its own stall as the server's. The slowest answer is what a kubelet's probe could
    have waited."""
    seconds = max(0.0, traffic.deadline - time.monotonic())
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.soak_hostile", traffic.base_url, f"{seconds:.3f}",
        stdout=asyncio.subprocess.PIPE)
    out, _ = await child.communicate()
    return json.loads(out.decode().strip().splitlines()[-1])


async def _probe(base_url: str, seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    latencies: list[float] = []
    failures = 0
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                ok = (await http.get("/healthz")).status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.monotonic() - started)
            failures += not ok
            await asyncio.sleep(HEALTH_PERIOD_S)
    ordered = sorted(latencies)
    worst = ordered[-1] * 1000 if ordered else None
    return {"probes": len(latencies), "failures": failures, "max_ms": worst,
            "p99_ms": ordered[int(0.99 * (len(ordered) - 1))] * 1000 if ordered else None,
            "target_ms": HEALTH_TARGET_MS,
            "within_target": worst is not None and worst < HEALTH_TARGET_MS}


if __name__ == "__main__":  # the prober's process: URL and seconds in, one JSON line out
    print(json.dumps(asyncio.run(_probe(sys.argv[1], float(sys.argv[2])))))
