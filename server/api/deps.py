"""Request dependencies: the engine, settings and metrics of this app, and the tenant.

Whose adapters a request sees is decided in server.api.auth (API key -> tenant); TenantDep
and ListScopeDep are re-exported here so routes take all their dependencies from one place.

Dependencies are `async def`: FastAPI runs a plain `def` dependency in its thread pool, a
thread hop (and GIL handoffs with the engine thread) per dependency per request, for work
that takes microseconds.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.api.auth import ListScopeDep, TenantDep
from server.api.edge import AccessEntry
from server.api.metrics import ApiMetrics
from server.config import Settings
from server.engine.interface import EngineClient


async def get_engine(request: Request) -> EngineClient:
    return request.app.state.engine


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


def get_access(request: Request) -> AccessEntry:
    """The access-log entry of this request (a throwaway one outside EdgeMiddleware)."""
    entry = getattr(request.state, "access", None)
    if entry is None:
        entry = AccessEntry(method=request.method, path=request.url.path)
        request.state.access = entry
    return entry


EngineDep = Annotated[EngineClient, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]
__all__ = ["EngineDep", "ListScopeDep", "MetricsDep", "SettingsDep", "TenantDep", "get_access"]
