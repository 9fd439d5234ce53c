"""create_app(settings, engine): the FastAPI application around one engine.

The app owns the engine's lifetime when asked to (the default): its lifespan starts the
engine (which loads the model in the background, so /healthz answers at once and /readyz
turns 200 when loading is done) and closes it on shutdown.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from server.api import adapters, generate, health, tokenize
from server.api.auth import KeyRing
from server.api.body_limit import BodyLimit
from server.api.body_timeout import BodyTimeout
from server.api.drain import DrainGate
from server.api.edge import EdgeMiddleware
from server.api.errors import install_error_handlers
from server.api.metrics import ApiMetrics
from server.api.openai import routes as openai_routes
from server.api.quotas import QuotaManager
from server.config import Settings
from server.engine.interface import EngineClient

log = logging.getLogger(__name__)

DESCRIPTION = (
    "Serve many tenants' PEFT soft prompts (prompt tuning, P-tuning) on one frozen base model. "
    'Every error is `{"error": {"type": ..., "message": ...}}`.'
)


def create_app(settings: Settings, engine: EngineClient, *, metrics: ApiMetrics | None = None,
               manage_engine: bool = True) -> FastAPI:
    """The app. Pass the ApiMetrics given to build_engine as observer, or engine-side metrics
    (batches, queue wait, cache events) stay at zero. With manage_engine the lifespan calls
    engine.start() and engine.aclose()."""
    metrics = metrics or ApiMetrics()
    metrics.bind_engine(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        start = getattr(engine, "start", None)
        if manage_engine and start is not None:
            start()
        try:
            yield
        finally:
            app.state.draining = True
            aclose = getattr(engine, "aclose", None)
            if manage_engine and aclose is not None:
                # Past an expired drain the grace period is spent: abort what is left at once,
                # or the pod overruns terminationGracePeriodSeconds and is killed mid-write.
                expired = getattr(app.state, "drain_expired", False)
                await aclose(timeout=0.0 if expired else settings.drain_timeout_s)

    # The interactive pages load their scripts from a CDN, which an offline host cannot reach:
    # they are served only when asked for (--docs); /openapi.json always is.
    app = FastAPI(title="softprompt-server", version="0.1.0", description=DESCRIPTION,
                  lifespan=lifespan, docs_url="/docs" if settings.docs else None,
                  redoc_url="/redoc" if settings.docs else None)
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.draining = False
    app.state.drain_expired = False
    app.state.quotas = QuotaManager(settings)
    app.state.keyring = KeyRing(settings.api_keys) if settings.api_keys is not None else None
    set_weights = getattr(engine, "set_tenant_weights", None)
    if app.state.keyring is not None and set_weights is not None:
        keyring = app.state.keyring
        set_weights(lambda tenant: keyring.table.weight(tenant))  # follows reloads
    if app.state.keyring is None:
        log.warning("no --api-keys: single-tenant mode, every request is tenant 'default' "
                    "and needs no key")
    install_error_handlers(app)
    app.add_middleware(BodyTimeout)  # innermost: every route's body, uploads included
    app.add_middleware(BodyLimit)  # inside the drain gate: a draining replica reads nothing
    app.add_middleware(DrainGate)  # inside the edge: refusals are logged and counted
    app.add_middleware(EdgeMiddleware, metrics=metrics)
    for module in (generate, openai_routes, tokenize, adapters, health):
        app.include_router(module.router)
    return app


def build_app(settings: Settings, **engine_kwargs: Any) -> FastAPI:
    """The production wiring: metrics first, then the engine reporting to them, then the app."""
    from server.engine.factory import build_engine

    metrics = ApiMetrics()
    engine = build_engine(settings, observer=metrics, **engine_kwargs)
    return create_app(settings, engine, metrics=metrics)
