"""The --api-keys file: tenants, their keys and quota overrides, and admin keys.

    {"tenants": [{"name": "acme", "keys": ["<plaintext>", "sha256:<hex>"],
                  "quotas": {"max_adapters": 10}, "weight": 2}],
     "admin_keys": ["sha256:<hex>"]}

"weight" (default 1) is the tenant's share of batch slots relative to the others when several
want more than an equal split (server.engine.fairness).

Parsing turns every key into the sha256 hex of the key, so plaintext keys never outlive the
parse. A file that does not parse raises KeyFileError with a message a person can act on.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.api.schemas import ADAPTER_ID_PATTERN

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME_RE = re.compile(ADAPTER_ID_PATTERN)
MAX_KEY_FILE_BYTES = 16 << 20
MAX_WEIGHT = 1000.0  # a bigger ratio is a typo, not a policy


class KeyFileError(ValueError):
    """The keys file is missing, unreadable or malformed."""


class QuotaOverrides(BaseModel):
    """Per-tenant quotas; a field left out takes the server-wide default (Settings)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_adapters: int | None = Field(None, ge=0)
    max_stored_bytes: int | None = Field(None, ge=0)
    max_concurrent_requests: int | None = Field(None, ge=1)
    requests_per_second: float | None = Field(None, gt=0)
    max_new_tokens: int | None = Field(None, ge=1)
    max_input_tokens: int | None = Field(None, ge=1)


class _TenantEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str
    keys: list[str] = Field(min_length=1)
    quotas: QuotaOverrides = Field(default_factory=QuotaOverrides)
    weight: float = Field(1.0, gt=0, le=MAX_WEIGHT)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        # The name is the store namespace: the same rule as adapter ids keeps it a safe path.
        if not _NAME_RE.fullmatch(value):
            raise ValueError(f"tenant name {value!r} must match {ADAPTER_ID_PATTERN}")
        return value


class _KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenants: list[_TenantEntry] = Field(default_factory=list)
    admin_keys: list[str] = Field(default_factory=list)


def key_hash(key: str) -> str:
    """The sha256 hex of a plaintext key, or the hex given as "sha256:<hex>"."""
    if key.startswith("sha256:"):
        digest = key.removeprefix("sha256:").lower()
        if not _HEX64.fullmatch(digest):
            raise KeyFileError("a 'sha256:' key must be followed by 64 hex digits")
        return digest
    if not key:
        raise KeyFileError("empty API key")
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyTable:
    """Hashed keys -> tenant name (None for admin keys), and each tenant's overrides."""

    owners: dict[str, str | None] = field(default_factory=dict)
    quotas: dict[str, QuotaOverrides] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    @property
    def tenants(self) -> frozenset[str]:
        return frozenset(self.quotas)

    def weight(self, tenant: str) -> float:
        """The tenant's scheduling weight; 1 for a tenant the file does not name."""
        return self.weights.get(tenant, 1.0)


def parse_key_file(path: Path) -> KeyTable:
    """Read and check the file; KeyFileError says what is wrong (the caller names the flag)."""
    try:
        if path.stat().st_size > MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"{path}: larger than {MAX_KEY_FILE_BYTES} bytes")
        data = json.loads(path.read_bytes())
        parsed = _KeyFile.model_validate(data)
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise KeyFileError(f"{path}: not JSON: {e}") from e
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'file'}: {err['msg']}"
                             for err in e.errors())
        raise KeyFileError(f"{path}: {problems}") from e
    owners: dict[str, str | None] = {}
    quotas: dict[str, QuotaOverrides] = {}
    weights: dict[str, float] = {}
    entries = [(t.name, k) for t in parsed.tenants for k in t.keys]
    entries += [(None, k) for k in parsed.admin_keys]
    for tenant in parsed.tenants:
        if tenant.name in quotas:
            raise KeyFileError(f"{path}: tenant {tenant.name!r} appears twice")
        quotas[tenant.name] = tenant.quotas
        weights[tenant.name] = tenant.weight
    for owner, key in entries:
        digest = key_hash(key)
        if digest in owners:
            raise KeyFileError(f"{path}: the same key is listed twice")
        owners[digest] = owner
    return KeyTable(owners=owners, quotas=quotas, weights=weights)
