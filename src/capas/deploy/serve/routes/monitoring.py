"""Monitoring endpoints: Prometheus metrics, the monitor page's data, the drift test."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from capas.deploy.serve.deps import State

router = APIRouter()


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(state: State) -> Response:
    """Prometheus text format: requests, latency histograms, predictions per class, live accuracy, drift."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/monitor/data")
async def monitor_data(state: State) -> JSONResponse:
    """What the monitor page charts: per time window volumes, class counts, latency, accuracy and drift."""
    # Plain JSON types already: FastAPI's encoder, walking an hour's 360 windows, took ~60 ms on the event loop
    return JSONResponse(state.monitor.snapshot())


@router.get("/drift")
async def drift(state: State) -> dict:
    """The drift test on the current window of recent inputs (run now if new inputs arrived)."""
    await asyncio.get_running_loop().run_in_executor(state.drifter, state.monitor.check_drift)
    return state.monitor.drift_status()
