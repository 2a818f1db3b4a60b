"""Monitoring endpoints: Prometheus metrics, the monitor page's data, the drift test."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from capas.deploy.serve.deps import State

router = APIRouter()


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(state: State) -> Response:
    """Prometheus text format: requests, latency histograms, predictions per class, live accuracy, drift."""
    # A plain def: FastAPI runs it in its thread pool. On the event loop, writing out a 1,000-class
    # server's metrics (~35 ms, 0.35 s the first time) kept every other client waiting
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/monitor/data", response_class=Response, responses={200: {"content": {"application/json": {}}}})
def monitor_data(state: State) -> Response:
    """What the monitor page charts: per time window volumes, class counts, latency, accuracy and drift."""
    # Encoded by the monitor, ended windows once: FastAPI's encoder, walking an hour's 360 windows, took
    # ~60 ms on the event loop, and json.dumps of 1,000 classes' counts in each ~0.1 s. A plain def, in
    # the thread pool: the first poll after a busy hour still sums up its ended windows (~0.1 s)
    return Response(state.monitor.snapshot(), media_type="application/json")


@router.get("/drift")
async def drift(state: State) -> dict:
    """The drift test on the current window of recent inputs (run now if new inputs arrived)."""
    await asyncio.get_running_loop().run_in_executor(state.drifter, state.monitor.check_drift)
    return state.monitor.drift_status()
