"""The soak benchmark's traffic: per tenant, clients that generate, stream, call the OpenAI
routes and walk away mid-stream, beside an uploader that overwrites and deletes the very
adapters those clients are using at that moment.

Every request ends as one `Outcome`. Whether a status is expected depends on what was asked:
an adapter the uploader churns may be gone (404) or replaced (409) by the time its request
runs, a tenant may hit its quota (429), but a stable adapter, the base model and every upload
must succeed, and another tenant's adapter must always be 404.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx

from benchmarks.soak_state import ENDPOINTS, Kind, Tenant, Traffic

_EXPECTED_STREAM_ERRORS = frozenset({"adapter_not_found", "adapter_changed", "model_not_found",
                                     "rate_limited", "queue_full"})
_WORDS = ("tweet", "label", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog",
          "I", "love", "it", "soak", "test", "server", "prompt", ":", ".", "\n")
_STOPS = ("\n", ".", "e", "a", " the", "xyz")


def _client(traffic: Traffic, tenant: Tenant) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=traffic.base_url, headers={"Authorization": f"Bearer {tenant.key}"},
        timeout=httpx.Timeout(traffic.request_timeout_s, connect=10),
        limits=httpx.Limits(max_connections=4, max_keepalive_connections=4))


async def run_tenant(traffic: Traffic, tenant: Tenant, rng: random.Random) -> None:
    """The tenant's four clients until the deadline: generate, stream, mixed, uploader."""
    async with _client(traffic, tenant) as http:
        seeds = [rng.randrange(2**32) for _ in range(4)]
        await asyncio.gather(
            _loop(traffic, lambda r: _inference(traffic, tenant, http, r, Kind.GENERATE),
                  seeds[0]),
            _loop(traffic, lambda r: _inference(traffic, tenant, http, r, Kind.STREAM),
                  seeds[1]),
            _loop(traffic, _mixed_step(traffic, tenant, http), seeds[2]),
            _loop(traffic, _upload_step(traffic, tenant, http), seeds[3]))


async def _loop(traffic: Traffic, step, seed: int) -> None:
    rng = random.Random(seed)
    while time.monotonic() < traffic.deadline:
        await step(rng)


def _mixed_step(traffic: Traffic, tenant: Tenant, http: httpx.AsyncClient):
    """Each kind once first (so a short run still makes every kind), then at random."""
    first = [Kind.DISCONNECT, Kind.COMPLETIONS, Kind.CHAT_STREAM, Kind.CROSS_TENANT,
             Kind.COMPLETIONS_STREAM, Kind.CHAT]
    weights = {Kind.DISCONNECT: 35, Kind.COMPLETIONS: 14, Kind.COMPLETIONS_STREAM: 14,
               Kind.CHAT: 14, Kind.CHAT_STREAM: 14, Kind.CROSS_TENANT: 9}

    async def step(rng: random.Random) -> None:
        kind = first.pop(0) if first else rng.choices(list(weights), list(weights.values()))[0]
        if kind is Kind.DISCONNECT:
            await _disconnect(traffic, tenant, http, rng)
        elif kind is Kind.CROSS_TENANT:
            await _cross_tenant(traffic, tenant, http, rng)
        else:
            await _inference(traffic, tenant, http, rng, kind)
    return step


def _pick_adapter(tenant: Tenant, rng: random.Random) -> str | None:
    """The base model sometimes, a stable adapter often, a churned one (maybe just deleted)
    half the time."""
    roll = rng.random()
    if roll < 0.15:
        return None
    if roll < 0.5:
        return rng.choice(list(tenant.stable))
    existing = [a for a, there in tenant.churn.items() if there]
    return rng.choice(existing if existing and rng.random() < 0.9 else list(tenant.churn))


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 40)))


def _generate_body(rng: random.Random, adapter: str | None, max_new_tokens: int) -> dict:
    body: dict = {"adapter_id": adapter, "text": _text(rng),
                  "max_new_tokens": rng.randint(1, max_new_tokens),
                  "ignore_eos": rng.random() < 0.5}
    if rng.random() < 0.3:
        body["stop"] = rng.sample(_STOPS, rng.randint(1, 2))
    if rng.random() < 0.3:
        body.update(temperature=0.8, top_p=0.9, top_k=rng.choice((0, 20)),
                    seed=rng.randrange(1000))
    return body


def _openai_body(traffic: Traffic, rng: random.Random, kind: Kind, adapter: str | None) -> dict:
    body: dict = {"model": adapter or traffic.model,
                  "max_tokens": rng.randint(1, traffic.max_new_tokens),
                  "temperature": rng.choice((0, 0.7))}
    if kind in (Kind.CHAT, Kind.CHAT_STREAM):
        body["messages"] = [{"role": "user", "content": _text(rng)}]
    else:
        body["prompt"] = _text(rng)
    if rng.random() < 0.3:
        body["stop"] = rng.choice(_STOPS)
    if kind in (Kind.COMPLETIONS_STREAM, Kind.CHAT_STREAM):
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


_PATHS = {Kind.GENERATE: "/v1/generate", Kind.STREAM: "/v1/generate",
          Kind.COMPLETIONS: "/v1/completions", Kind.COMPLETIONS_STREAM: "/v1/completions",
          Kind.CHAT: "/v1/chat/completions", Kind.CHAT_STREAM: "/v1/chat/completions"}


async def _inference(traffic: Traffic, tenant: Tenant, http: httpx.AsyncClient,
                     rng: random.Random, kind: Kind) -> None:
    """One request of an inference kind, its answer checked for shape and token counts."""
    adapter = _pick_adapter(tenant, rng)
    if kind in (Kind.GENERATE, Kind.STREAM):
        body = _generate_body(rng, adapter, traffic.max_new_tokens)
        body["stream"] = kind is Kind.STREAM
    else:
        body = _openai_body(traffic, rng, kind, adapter)
    churned = adapter in tenant.churn
    refusals = {"404", "409", "429"} if churned else {"429"}
    streaming = bool(body.get("stream"))
    started = time.monotonic()
    tenant.in_use[adapter or ""] += 1
    try:
        if streaming:
            status, problem, final = await _read_stream(http, _PATHS[kind], body)
            if kind is Kind.STREAM and status == "200" and problem is None:
                problem = _check_answer(kind, body, final, tenant, adapter)
        else:
            r = await http.post(_PATHS[kind], json=body)
            status, problem = str(r.status_code), r.text[:300]
            if r.status_code == 200:
                try:
                    problem = _check_answer(kind, body, r.json(), tenant, adapter)
                except ValueError:
                    problem = f"not JSON: {r.text[:200]!r}"
    except httpx.TimeoutException as e:
        status, problem = "timeout", repr(e)
    except httpx.TransportError as e:
        status, problem = "conn-error", repr(e)
    finally:
        tenant.in_use[adapter or ""] -= 1
    if status == "200":
        ok = problem is None
        status = "200" if ok else "200-invalid"
    elif status.startswith("200+"):
        ok = churned and status[4:] in _EXPECTED_STREAM_ERRORS
    else:
        ok = status in refusals
    traffic.record(kind, tenant, status, started, expected=ok,
                   detail=f"{_PATHS[kind]} {json.dumps(body)} -> {status}: {problem}")
    await _back_off(status, rng)


async def _back_off(status: str, rng: random.Random) -> None:
    """After a 429, wait about its Retry-After (1 s), as a polite client does; after a
    connection error too, so a dead server is not hammered in a tight loop."""
    if status in ("429", "conn-error"):
        await asyncio.sleep(rng.uniform(0.5, 1.0))


def _check_answer(kind: Kind, body: dict, answer: dict, tenant: Tenant,
                  adapter: str | None) -> str | None:
    """What is wrong with a 200 answer, or None: finish reason, token counts, and for the base
    model and stable adapters (never replaced) the virtual token count."""
    if kind in (Kind.GENERATE, Kind.STREAM):
        usage, reason, limit = answer.get("usage") or {}, answer.get("finish_reason"), \
            body["max_new_tokens"]
        if reason not in ("length", "stop", "eos"):
            return f"finish_reason {reason!r}"
        done = usage.get("completion_tokens", -1)
        if not 0 <= done <= limit or (reason == "length" and done != limit):
            return f"completion_tokens {done} for max_new_tokens {limit} ({reason})"
        if adapter is None or adapter in tenant.stable:
            want = tenant.stable.get(adapter, 0) if adapter else 0
            if usage.get("virtual_tokens") != want:
                return f"virtual_tokens {usage.get('virtual_tokens')} (expected {want})"
        return None
    choices = answer.get("choices") or []
    if len(choices) != 1 or choices[0].get("finish_reason") not in ("length", "stop"):
        return f"choices {choices!r:.200}"
    done = (answer.get("usage") or {}).get("completion_tokens", -1)
    if not 0 <= done <= body["max_tokens"]:
        return f"completion_tokens {done} for max_tokens {body['max_tokens']}"
    return None


async def _read_stream(http: httpx.AsyncClient, path: str, body: dict, *,
                       leave_after: int | None = None) -> tuple[str, str | None, dict]:
    """(status, problem, last event): reads the SSE stream to [DONE] (or leaves after
    `leave_after` data events, closing the connection); an error event inside the stream is
    status `200+<type>`."""
    async with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return str(r.status_code), (await r.aread()).decode(errors="replace")[:300], {}
        events, final, done = 0, {}, False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                return f"200+{event['error'].get('type')}", json.dumps(event)[:300], event
            events += 1
            final = event
            if leave_after is not None and events >= leave_after:
                return "200", None, final  # leaving: the context manager closes the connection
    if not done:
        return "200", f"stream ended without [DONE] after {events} events", final
    if "usage" not in final:
        return "200", f"no usage in the last event: {final!r:.200}", final
    return "200", None, final


async def _disconnect(traffic: Traffic, tenant: Tenant, http: httpx.AsyncClient,
                      rng: random.Random) -> None:
    """A long stream the client walks away from: after a few events, or (one in four) before
    the response even starts."""
    adapter = _pick_adapter(tenant, rng)
    body = {"adapter_id": adapter, "text": _text(rng), "stream": True, "ignore_eos": True,
            "max_new_tokens": rng.randint(64, 256)}
    churned = adapter in tenant.churn
    started = time.monotonic()
    tenant.in_use[adapter or ""] += 1
    try:
        if rng.random() < 0.25:
            try:
                async with asyncio.timeout(rng.uniform(0.005, 0.1)):
                    status, problem, _ = await _read_stream(http, "/v1/generate", body,
                                                            leave_after=1)
            except TimeoutError:
                status, problem = "left-early", None
        else:
            status, problem, _ = await _read_stream(http, "/v1/generate", body,
                                                    leave_after=rng.randint(1, 4))
    except httpx.TimeoutException as e:
        status, problem = "timeout", repr(e)
    except httpx.TransportError as e:
        status, problem = "conn-error", repr(e)
    finally:
        tenant.in_use[adapter or ""] -= 1
    ok = (status in ("200", "left-early") and problem is None) or status == "429" or (
        churned and (status in ("404", "409") or status[4:] in _EXPECTED_STREAM_ERRORS))
    traffic.record(Kind.DISCONNECT, tenant, status, started, expected=ok,
                   detail=f"/v1/generate {json.dumps(body)} -> {status}: {problem}")
    await _back_off(status, rng)


async def _cross_tenant(traffic: Traffic, tenant: Tenant, http: httpx.AsyncClient,
                        rng: random.Random) -> None:
    """Another tenant's stable adapter, with this tenant's key: must be 404, never served."""
    other = rng.choice([t for t in traffic.tenants if t is not tenant])
    body = {"adapter_id": rng.choice(list(other.stable)), "text": _text(rng),
            "max_new_tokens": 4}
    started = time.monotonic()
    try:
        r = await http.post("/v1/generate", json=body)
        status, problem = str(r.status_code), r.text[:300]
    except httpx.TransportError as e:
        status, problem = "conn-error", repr(e)
    traffic.record(Kind.CROSS_TENANT, tenant, status, started, expected=status in ("404", "429"),
                   detail=f"/v1/generate {json.dumps(body)} -> {status}: {problem}")
    await _back_off(status, rng)


def _upload_step(traffic: Traffic, tenant: Tenant, http: httpx.AsyncClient):
    """Overwrite, delete and re-upload the churned adapters, preferring ones in use right now;
    the first operations cover every kind so a short run has them all."""
    first = [Kind.OVERWRITE, Kind.DELETE, Kind.UPLOAD, Kind.CONFLICT, Kind.LIST]

    async def step(rng: random.Random) -> None:
        await asyncio.sleep(rng.uniform(*traffic.upload_pause_s))
        if time.monotonic() >= traffic.deadline:
            return
        existing = [a for a, there in tenant.churn.items() if there]
        missing = [a for a, there in tenant.churn.items() if not there]
        kind = first.pop(0) if first else rng.choices(
            [Kind.OVERWRITE, Kind.DELETE, Kind.UPLOAD, Kind.CONFLICT, Kind.LIST],
            [35, 30, 25, 5, 5])[0]
        if kind in (Kind.OVERWRITE, Kind.DELETE, Kind.CONFLICT) and not existing:
            kind = Kind.UPLOAD
        if kind is Kind.UPLOAD and not missing:
            kind = Kind.OVERWRITE
        busy = [a for a in existing if tenant.in_use[a] > 0]
        pool = missing if kind is Kind.UPLOAD else busy or existing or list(tenant.churn)
        target = rng.choice(pool)
        if kind in (Kind.OVERWRITE, Kind.DELETE) and tenant.in_use[target] > 0:
            tenant.ops_on_busy[kind.value] += 1
        await _adapter_op(traffic, tenant, http, rng, kind, target)
    return step


async def _adapter_op(traffic: Traffic, tenant: Tenant, http: httpx.AsyncClient,
                      rng: random.Random, kind: Kind, adapter: str) -> None:
    want = {Kind.UPLOAD: "201", Kind.OVERWRITE: "201", Kind.CONFLICT: "409",
            Kind.DELETE: "204", Kind.LIST: "200"}[kind]
    started = time.monotonic()
    what = f"{ENDPOINTS[kind]} {adapter}"
    try:
        if kind is Kind.LIST:
            r = await http.get("/v1/adapters")
        elif kind is Kind.DELETE:
            r = await http.delete(f"/v1/adapters/{adapter}")
        else:
            files = rng.choice(traffic.variants)
            what += f" (num_virtual_tokens {files.num_virtual_tokens})"
            parts = ({"archive": ("adapter.tar.gz", files.archive, "application/gzip")}
                     if rng.random() < 0.3 else
                     {"config": ("adapter_config.json", files.config, "application/json"),
                      "weights": ("adapter_model.safetensors", files.weights,
                                  "application/octet-stream")})
            r = await http.post("/v1/adapters", data={"adapter_id": adapter}, files=parts,
                                params={"overwrite": "true"} if kind is Kind.OVERWRITE else None)
        status, problem = str(r.status_code), r.text[:300]
    except httpx.TimeoutException as e:
        status, problem = "timeout", repr(e)
    except httpx.TransportError as e:
        status, problem = "conn-error", repr(e)
    if status == want and kind in (Kind.UPLOAD, Kind.OVERWRITE):
        tenant.churn[adapter] = True
    elif status == want and kind is Kind.DELETE:
        tenant.churn[adapter] = False
    traffic.record(kind, tenant, status, started, expected=status == want,
                   detail=f"{what} -> {status}: {problem}")
