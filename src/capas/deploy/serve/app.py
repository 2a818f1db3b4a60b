"""create_app(settings) builds the FastAPI app for one run directory; serve(settings) runs it under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

import capas
from capas.deploy.drift import DriftDetector
from capas.deploy.serve.batching import MicroBatcher
from capas.deploy.serve.deps import ServerState
from capas.deploy.serve.middleware import BodyLimit, RequestMetrics, TokenGuard
from capas.deploy.serve.monitor import Metrics, Monitor
from capas.deploy.serve.routes import api, monitoring, pages
from capas.deploy.serve.settings import ServeSettings
from capas.inference import resolve_device
from capas.runs import REFERENCE, Run, load_reference, load_run
from capas.spec.summary import summarize

log = logging.getLogger("capas.serve")


def run_info(run: Run, settings: ServeSettings) -> dict:
    """What /info answers: the model, its training and test metrics, and how it is served."""
    summary = summarize(run.spec)
    config = run.read_json("config.json") or {}
    history_file = run.path / "metrics.jsonl"
    history = (
        [json.loads(line) for line in history_file.read_text().splitlines() if line.strip()]
        if history_file.is_file()
        else []
    )
    return {
        "model": run.spec.name,
        "capas_version": capas.__version__,
        "backend": "torch" if isinstance(run.model, torch.nn.Module) else type(run.model).__name__,
        "classes": list(run.classes),
        "input_shape": list(run.spec.input_shape),
        "parameters": summary.total,
        "trainable_parameters": summary.trainable,
        "macs": summary.macs,
        "spec": run.spec.to_dict(),
        "preprocess": run.preprocess.model_dump(mode="json"),
        "training": {
            "data": config.get("data"),
            "train": config.get("train"),
            "splits": config.get("splits"),
            "environment": config.get("environment"),
            "history": history,
        },
        "test": run.read_json("test.json"),
        "serving": settings.model_dump(
            mode="json",
            include={
                "max_batch",
                "max_wait_ms",
                "max_body_mb",
                "max_images",
                "threads",
                "top_k",
                "drift_window",
                "drift_alpha",
                "drift_permutations",
            },
        ),
    }


async def _drift_loop(monitor: Monitor, every_s: float) -> None:
    """Re-test drift every `every_s` seconds on a worker thread, so /metrics stays current."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await run_in_threadpool(monitor.check_drift)
        except Exception:  # a failed test must not stop monitoring; the next tick tries again
            log.exception("drift test failed")


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=error)
    return JSONResponse(
        {"detail": "internal error while serving the request (see the server log)"}, status_code=500
    )


def create_app(settings: ServeSettings) -> FastAPI:
    """The app serving `settings.run_dir`; loads the model now, so a bad run directory fails before binding."""
    import fastapi_offline

    run = load_run(settings.run_dir, device=resolve_device(settings.device))
    detector = DriftDetector(
        load_reference(run.path / REFERENCE),
        alpha=settings.drift_alpha,
        permutations=settings.drift_permutations,
    )
    metrics = Metrics(run.classes)
    monitor = Monitor(
        run.classes,
        detector,
        metrics,
        max_predictions=settings.max_predictions,
        drift_window=settings.drift_window,
        drift_min=settings.drift_min,
        bucket_s=settings.bucket_s,
        history=settings.history,
    )
    state = ServerState(settings, run, run_info(run, settings), metrics, monitor)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = MicroBatcher(
            run,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            threads=settings.threads,
            drift_per_batch=settings.drift_per_batch,
            on_batch=metrics.batch_size.observe,
        )
        await batcher.start()
        state.batcher = batcher
        drift_task = asyncio.create_task(_drift_loop(monitor, settings.drift_every_s))
        try:
            yield
        finally:
            drift_task.cancel()
            state.batcher = None
            await batcher.stop()

    app = FastAPI(
        title=f"capas serve: {run.spec.name}",
        version=capas.__version__,
        lifespan=lifespan,
        description="Predictions, feedback and monitoring for a capas run directory.",
        docs_url=None,
        redoc_url=None,  # /docs is served from local files (routes/pages.py): no CDN here
    )
    app.state.server = state
    app.include_router(api.router)
    app.include_router(monitoring.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=pages.STATIC), name="static")
    app.mount(
        pages.DOCS_ASSETS,
        StaticFiles(directory=Path(fastapi_offline.__file__).parent / "static"),
        name="docs-assets",
    )
    app.add_exception_handler(Exception, _internal_error)
    # The last added is the outermost: metrics see every answer, including 401 and 413.
    app.add_middleware(BodyLimit, limit=int(settings.max_body_mb * 1e6))
    if settings.token is not None:
        app.add_middleware(TokenGuard, token=settings.token.get_secret_value())
    app.add_middleware(RequestMetrics, metrics=metrics, on_predict=monitor.record_latency)
    return app


def serve(settings: ServeSettings) -> None:
    """Serve the run directory until interrupted (Ctrl-C)."""
    import uvicorn

    app = create_app(settings)
    # No access log: one line per request costs throughput; /metrics counts every request instead.
    uvicorn.run(app, host=settings.host, port=settings.port, access_log=False, log_level="info")
