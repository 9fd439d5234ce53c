"""Per-tenant quotas: request rate (token bucket), concurrency, and the size limits.

Limits come from the tenant's "quotas" in --api-keys over the server-wide --tenant-* defaults.
Rate and concurrency refusals are 429 with Retry-After; size and count refusals are 413
(stored adapters and bytes) or 422 (max_new_tokens, input tokens), each naming the limit.
A Lease is held for the whole of a generate call or stream and released exactly once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

from starlette.requests import Request

from server.api.errors import RequestQuotaError, StorageQuotaError, TooManyRequestsError
from server.api.tenants import KeyTable, QuotaOverrides
from server.config import Settings


@dataclass(frozen=True)
class Quotas:
    max_adapters: int
    max_stored_bytes: int
    max_concurrent_requests: int
    requests_per_second: float  # 0: unlimited
    max_new_tokens: int
    max_input_tokens: int


class _Bucket:
    """Token bucket: refills `rate` tokens a second up to `burst` = max(1, rate)."""

    def __init__(self, rate: float) -> None:
        self.rate, self.burst = rate, max(1.0, rate)
        self.tokens, self.stamp = self.burst, time.monotonic()

    def take(self) -> float:
        """0 when a token was taken, else the seconds until one is available."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class Lease:
    """One admitted request's concurrency slots (one per sequence it runs); release() is
    idempotent."""

    def __init__(self, manager: QuotaManager, tenant: str, slots: int = 1) -> None:
        self._manager, self._tenant, self._slots, self._held = manager, tenant, slots, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._manager._release(self._tenant, self._slots)


class QuotaManager:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._active: dict[str, int] = defaultdict(int)
        self._buckets: dict[str, _Bucket] = {}
        self._upload_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def limits(self, tenant: str, table: KeyTable | None) -> Quotas:
        s = self.settings
        o = table.quotas.get(tenant, QuotaOverrides()) if table else QuotaOverrides()

        def pick(override: float | None, default: float) -> float:
            return default if override is None else override

        return Quotas(
            max_adapters=int(pick(o.max_adapters, s.tenant_max_adapters)),
            max_stored_bytes=int(pick(o.max_stored_bytes, s.tenant_max_stored_bytes)),
            max_concurrent_requests=int(pick(o.max_concurrent_requests,
                                             s.tenant_max_concurrent_requests)),
            requests_per_second=float(pick(o.requests_per_second, s.tenant_requests_per_second)),
            max_new_tokens=min(int(pick(o.max_new_tokens, s.max_new_tokens_limit)),
                               s.max_new_tokens_limit),
            max_input_tokens=min(int(pick(o.max_input_tokens, s.max_input_tokens)),
                                 s.max_input_tokens))

    def admit(self, tenant: str, quotas: Quotas, *, slots: int = 1) -> Lease:
        """Take a rate token and `slots` concurrency slots (an OpenAI request's n choices of
        each prompt run as that many sequences), or raise 429 with Retry-After; more slots
        than the tenant may ever hold is a 422."""
        if slots > quotas.max_concurrent_requests:
            raise RequestQuotaError(
                f"{slots} sequences in one request; above the limit max_concurrent_requests="
                f"{quotas.max_concurrent_requests} for tenant {tenant!r}")
        with self._lock:
            if quotas.requests_per_second > 0:
                bucket = self._buckets.get(tenant)
                if bucket is None or bucket.rate != quotas.requests_per_second:
                    bucket = self._buckets[tenant] = _Bucket(quotas.requests_per_second)
                wait = bucket.take()
                if wait > 0:
                    raise TooManyRequestsError(
                        f"rate limit: requests_per_second={quotas.requests_per_second:g} for "
                        f"tenant {tenant!r}", retry_after_s=wait)
            if self._active[tenant] + slots > quotas.max_concurrent_requests:
                raise TooManyRequestsError(
                    f"concurrency limit: max_concurrent_requests="
                    f"{quotas.max_concurrent_requests} for tenant {tenant!r}", retry_after_s=1)
            self._active[tenant] += slots
        return Lease(self, tenant, slots)

    def _release(self, tenant: str, slots: int) -> None:
        with self._lock:
            self._active[tenant] -= slots

    def active(self, tenant: str) -> int:
        return self._active.get(tenant, 0)

    def upload_lock(self, tenant: str) -> asyncio.Lock:
        """Uploads of one tenant run one at a time so the storage check cannot race."""
        return self._upload_locks[tenant]


def quotas_for(request: Request, tenant: str) -> tuple[QuotaManager, Quotas]:
    """This app's QuotaManager and the tenant's limits under the current keys file."""
    manager: QuotaManager = request.app.state.quotas
    keyring = request.app.state.keyring
    return manager, manager.limits(tenant, keyring.table if keyring is not None else None)


def check_generation(quotas: Quotas, *, max_new_tokens: int, input_tokens: int | None) -> None:
    if max_new_tokens > quotas.max_new_tokens:
        raise RequestQuotaError(f"max_new_tokens {max_new_tokens} is above the limit "
                                f"max_new_tokens={quotas.max_new_tokens}")
    if input_tokens is not None and input_tokens > quotas.max_input_tokens:
        raise RequestQuotaError(f"text is {input_tokens} tokens; above the limit "
                                f"max_input_tokens={quotas.max_input_tokens}")


def check_storage(quotas: Quotas, *, count: int, stored_bytes: int, new_bytes: int,
                  replacing: bool) -> None:
    """Before (estimate) and after (actual size) an upload; count excludes a replaced one."""
    if not replacing and count >= quotas.max_adapters:
        raise StorageQuotaError(f"adapter limit reached: max_adapters={quotas.max_adapters}")
    if stored_bytes + new_bytes > quotas.max_stored_bytes:
        raise StorageQuotaError(
            f"storage limit: {stored_bytes + new_bytes} bytes would exceed "
            f"max_stored_bytes={quotas.max_stored_bytes}")
