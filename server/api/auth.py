"""API keys -> tenants: the KeyRing (hashed keys, reloadable) and the request dependencies.

Only sha256 hashes of keys are kept. A presented key is hashed and looked up; the lookup hit is
confirmed with hmac.compare_digest so the comparison itself is constant-time. The file is
re-read on SIGHUP (reload()) and when its mtime changes (checked at most once a second, on a
request). A file that breaks on reload is logged and the previous keys stay in force.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Query, Request

from server.api.errors import AuthError, InvalidRequestError
from server.api.schemas import ADAPTER_ID_PATTERN
from server.api.tenants import KeyFileError, KeyTable, parse_key_file

log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
UNAUTHENTICATED = "unauthenticated"
_MTIME_CHECK_S = 1.0


@dataclass(frozen=True)
class Principal:
    """Who is asking: a tenant, or an admin (tenant None)."""

    tenant: str | None
    admin: bool = False


class KeyRing:
    """The current KeyTable of one --api-keys file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._mtime = self._stat_mtime()
        self._table: KeyTable = parse_key_file(path)  # raises KeyFileError at startup
        self._checked = time.monotonic()

    @property
    def table(self) -> KeyTable:
        return self._table

    def _stat_mtime(self) -> float | None:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return None

    def reload(self) -> bool:
        """Re-read the file; on failure log and keep the old keys. True when reloaded."""
        with self._lock:
            mtime = self._stat_mtime()
            try:
                table = parse_key_file(self.path)
            except KeyFileError as e:
                self._mtime = mtime  # do not retry the same broken file on every request
                log.error("--api-keys reload failed, keeping the previous keys: %s", e)
                return False
            self._table, self._mtime = table, mtime
        log.info("--api-keys reloaded: %d tenants", len(table.tenants))
        return True

    def maybe_reload(self) -> None:
        """Reload when the file's mtime changed; stat at most once per second."""
        now = time.monotonic()
        if now - self._checked < _MTIME_CHECK_S:
            return
        self._checked = now
        if self._stat_mtime() != self._mtime:
            self.reload()

    def authenticate(self, authorization: str | None) -> Principal:
        self.maybe_reload()
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        digest = hashlib.sha256(key.strip().encode()).hexdigest()
        owners = self._table.owners
        stored = digest if digest in owners else "0" * 64
        if digest not in owners or not hmac.compare_digest(stored, digest):
            raise AuthError("invalid API key")
        owner = owners[digest]
        return Principal(tenant=owner, admin=owner is None)


def _label(request: Request, tenant: str) -> None:
    """Name the tenant on the access-log entry (and so on the request metrics)."""
    access = getattr(request.state, "access", None)
    if access is not None:
        access.tenant = tenant


async def get_principal(request: Request) -> Principal:
    """The caller; single-tenant mode (no --api-keys) makes everyone tenant 'default'. Runs on
    the event loop: a key check is a hash and a lookup, and the keys file is stat'ed at most
    once a second (re-read only when it changed)."""
    keyring: KeyRing | None = request.app.state.keyring
    if keyring is None:
        principal = Principal(tenant=DEFAULT_TENANT)
    else:
        principal = keyring.authenticate(request.headers.get("authorization"))
    _label(request, principal.tenant or "admin")
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
_TENANT_QUERY = Query(pattern=ADAPTER_ID_PATTERN, description="Admin keys only: the tenant "
                      "whose adapters this request acts on. Ignored for tenant keys.")


def _admin_target(request: Request, tenant: str) -> str:
    keyring: KeyRing | None = request.app.state.keyring
    if keyring is not None and tenant not in keyring.table.tenants:
        raise InvalidRequestError(f"no tenant named {tenant!r} in --api-keys")
    _label(request, tenant)
    return tenant


async def get_tenant(request: Request, principal: PrincipalDep,
               tenant: Annotated[str | None, _TENANT_QUERY] = None) -> str:
    """The namespace a request acts in. An admin must name it with ?tenant=."""
    if not principal.admin:
        return principal.tenant or DEFAULT_TENANT
    if tenant is None:
        raise InvalidRequestError("an admin key must name the tenant: add ?tenant=<name>")
    return _admin_target(request, tenant)


async def get_list_scope(request: Request, principal: PrincipalDep,
                   tenant: Annotated[str | None, _TENANT_QUERY] = None) -> str | None:
    """Like get_tenant, but an admin without ?tenant= lists every tenant (None)."""
    if not principal.admin:
        return principal.tenant or DEFAULT_TENANT
    return None if tenant is None else _admin_target(request, tenant)


TenantDep = Annotated[str, Depends(get_tenant)]
ListScopeDep = Annotated[str | None, Depends(get_list_scope)]
