"""Admin HTTP endpoint: ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus text), ``/config_dump``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from authz.metrics import REGISTRY

__all__ = ["build_admin_app"]


def build_admin_app(*, ready: Callable[[], bool], config_dump: Callable[[], dict[str, Any]]) -> FastAPI:
    app = FastAPI(title="meshauthz admin", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        if ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/config_dump")
    async def dump() -> Response:
        return JSONResponse(config_dump())

    return app
