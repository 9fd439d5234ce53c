"""The production wiring of an engine: the store --store names, the engine in this process or
(--engine-process) in a child process. Each kind is imported only when built, so the HTTP
process of --engine-process does not import the in-process engine (the model classes and the
step loops) at all.
"""

from __future__ import annotations

from server.config import Settings
from server.engine.interface import EngineClient
from server.engine.observer import EngineObserver


def build_engine(settings: Settings, *,
                 observer: EngineObserver | None = None) -> EngineClient:
    """Call start() on what it returns to load the model."""
    if settings.engine_process:
        from server.engine.remote import RemoteEngine

        return RemoteEngine(settings, observer=observer)
    from server.engine.engine import Engine
    from server.engine.stores import open_store

    store = open_store(settings.store, refresh_s=settings.store_refresh_s)
    return Engine(settings, store, observer=observer)
