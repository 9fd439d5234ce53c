"""Operational endpoints: liveness, readiness and the Prometheus scrape."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import __version__
from server.api.deps import EngineDep, MetricsDep
from server.api.errors import ErrorKind, envelope, error_responses
from server.api.schemas import HealthResponse
from server.engine.interface import EngineClient

router = APIRouter(tags=["operations"])
_NOT_READY = ErrorKind(503, "not_ready")


@router.get("/healthz", response_model=HealthResponse, summary="Process is alive")
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=HealthResponse, summary="Ready to serve",
            responses=error_responses(503))
async def readyz(request: Request, engine: EngineDep) -> Response:
    """200 once the model is loaded and the store is reachable; 503 before, while draining,
    and while requests wait on an engine that has stopped making progress."""
    if getattr(request.app.state, "draining", False):
        return JSONResponse(envelope(_NOT_READY, "draining: the server is shutting down"),
                            status_code=503)
    if not engine.is_ready():
        bound_s = request.app.state.settings.engine_stall_timeout_s
        return JSONResponse(envelope(_NOT_READY, _not_ready_reason(engine, bound_s)),
                            status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/health", summary="Serving (vLLM's health path)", responses=error_responses(503))
async def health(request: Request, engine: EngineDep) -> Response:
    """Where tools made for vLLM look (guidellm validates a backend here): 200 with an empty
    body while serving, 503 with the reason while loading, draining or stalled."""
    answer = await readyz(request, engine)
    return Response(status_code=200) if answer.status_code == 200 else answer


@router.get("/version", summary="Server version and engine")
async def version(engine: EngineDep) -> dict[str, str | None]:
    """vLLM's /version shape ({"version": ...}), with the engine running the model ("core" or
    "static" for the built-in engine's loops, "vllm"; null while the model loads)."""
    return {"version": __version__, "engine": getattr(engine, "batching", None)}


def _not_ready_reason(engine: EngineClient, bound_s: float) -> str:
    """The stall, with its numbers, where the engine can tell (server.engine.remote)."""
    progress = getattr(engine, "progress", None)
    if progress is not None and (now := progress()).stalled(bound_s):
        return (f"not ready: the engine has shown no progress for {now.stalled_s:.0f} s while "
                f"{now.waiting} request(s) wait (--engine-stall-timeout-s {bound_s:g})")
    stalled = (", or the engine has shown no progress for over --engine-stall-timeout-s "
               "while requests wait") if bound_s > 0 else ""
    return f"not ready: the model is loading or the adapter store is unreachable{stalled}"


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"}})
async def metrics(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


# HEAD wherever GET is (RFC 9110 asks it of every GET resource): monitoring and load tools
# probe with it (aiperf looks for the Prometheus scrape with HEAD /metrics). The same handler
# answers, with the body left off; kept out of the OpenAPI schema.
for _route in list(router.routes):
    router.add_api_route(_route.path, _route.endpoint, methods=["HEAD"],
                         include_in_schema=False)
