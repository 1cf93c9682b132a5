"""Operations, outside ``/api/v1``: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from countersign.api.errors import error_response

router = APIRouter(tags=["operations"])


@router.get("/health/live")
async def live() -> dict[str, str]:
    """The process is up and serving."""
    return {"status": "ok"}


@router.get("/health/ready", responses={503: {"description": "Not ready, with the reason"}})
async def ready(request: Request) -> JSONResponse:
    """The database is reachable and migrated to this version's head."""
    reason = await request.app.state.readiness()
    if reason is not None:
        return error_response(503, "not_ready", reason)
    return JSONResponse({"status": "ok"})


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: requests by route and status, latency, the database pool and the
    runs being carried out (under ``serve --workers``: of every worker)."""
    # Under workers this reads every worker's files: not on the event loop.
    body = await asyncio.to_thread(request.app.state.metrics.exposition)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
