"""Operational endpoints: liveness, readiness and the Prometheus scrape."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.deps import EngineDep, MetricsDep
from server.api.errors import ErrorKind, envelope, error_responses
from server.api.schemas import HealthResponse

router = APIRouter(tags=["operations"])
_NOT_READY = ErrorKind(503, "not_ready")


@router.get("/healthz", response_model=HealthResponse, summary="Process is alive")
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=HealthResponse, summary="Ready to serve",
            responses=error_responses(503))
async def readyz(request: Request, engine: EngineDep) -> Response:
    """200 once the model is loaded and the store is reachable; 503 before and while draining."""
    if getattr(request.app.state, "draining", False):
        return JSONResponse(envelope(_NOT_READY, "draining: the server is shutting down"),
                            status_code=503)
    if not engine.is_ready():
        return JSONResponse(envelope(_NOT_READY, "not ready: the model is loading or the "
                                                 "adapter store is unreachable"),
                            status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"}})
async def metrics(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
