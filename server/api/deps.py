"""Request dependencies: the engine, settings and metrics of this app, and the tenant.

get_tenant is the one place that decides whose adapters a request sees. Today everything lives
in namespace "default"; the multi-tenancy issue replaces this function (API key -> tenant)
without touching the routes.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.api.edge import AccessEntry
from server.api.metrics import ApiMetrics
from server.config import Settings
from server.engine.interface import EngineClient

DEFAULT_NAMESPACE = "default"


def get_tenant() -> str:
    return DEFAULT_NAMESPACE


def get_engine(request: Request) -> EngineClient:
    return request.app.state.engine


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> ApiMetrics:
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
TenantDep = Annotated[str, Depends(get_tenant)]
