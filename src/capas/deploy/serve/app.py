"""create_app(settings) builds the FastAPI app for one run directory; serve(settings) runs it under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import logging
import socket
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import TypeAdapter
from starlette.requests import ClientDisconnect

import capas
from capas.deploy.drift import DriftDetector
from capas.deploy.serve.batching import MicroBatcher
from capas.deploy.serve.deps import ServerState, known_query
from capas.deploy.serve.middleware import BodyLimit, HeadAsGet, HostGuard, RequestMetrics, TokenGuard
from capas.deploy.serve.monitor import NO_REFERENCE, Metrics, Monitor
from capas.deploy.serve.routes import api, monitoring, pages
from capas.deploy.serve.settings import ServeSettings
from capas.errors import CapasError, Terminated
from capas.inference import model_device, resolve_device
from capas.runs import REFERENCE, Run, load_reference, load_run
from capas.spec.summary import summarize

log = logging.getLogger("capas.serve")
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the answer"


def _json_file(run: Run, name: str) -> dict | list | None:
    """A JSON (or, for .jsonl, JSON-lines) file of the run, None if absent; a damaged one is a CapasError."""
    file = run.path / name
    if not file.is_file():
        return None
    try:
        text = file.read_text()
        if name.endswith(".jsonl"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except (OSError, ValueError, RecursionError) as error:
        raise CapasError(
            f"{file}: damaged, not readable as JSON ({error}); restore it or delete it"
        ) from None


def run_info(run: Run, settings: ServeSettings) -> dict:
    """What /info answers: the model, its training and test metrics, and how it is served."""
    summary = summarize(run.spec)
    config = _json_file(run, "config.json") or {}
    if not isinstance(config, dict):
        raise CapasError(f"{run.path / 'config.json'}: damaged, expected a JSON object")
    history = _json_file(run, "metrics.jsonl") or []
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
        "test": _json_file(run, "test.json"),
        "serving": settings.model_dump(
            mode="json",
            include={
                "max_batch",
                "max_wait_ms",
                "max_body_mb",
                "max_images",
                "max_pixels",
                "max_request_pixels",
                "max_queue",
                "threads",
                "top_k",
                "drift_window",
                "drift_alpha",
                "drift_permutations",
            },
        ),
    }


def encoded_info(info: dict) -> dict[bool, bytes]:
    """/info's answers, with and without the test confusion matrix (keyed by whether they hold it), encoded
    once: the run is fixed, and a 1,000-class run's 2 MB encoded at every call held the event loop ~50 ms."""
    test = info["test"]
    brief = (
        {**info, "test": {key: value for key, value in test.items() if key != "confusion_matrix"}}
        if isinstance(test, dict)
        else info
    )
    encode = TypeAdapter(dict).dump_json  # as FastAPI encodes a returned dict (NaN as null)
    return {True: encode(info), False: encode(brief)}


async def _drift_loop(monitor: Monitor, every_s: float, drifter: ThreadPoolExecutor) -> None:
    """Re-test drift every `every_s` seconds on the drift thread, so /metrics stays current."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await asyncio.get_running_loop().run_in_executor(drifter, monitor.check_drift)
        except Exception:  # a failed test must not stop monitoring; the next tick tries again
            log.exception("drift test failed")


async def _client_closed(request: Request, error: ClientDisconnect) -> Response:
    """The client went away mid-upload: nobody to answer, nothing to log; counted as 499, not 500."""
    return Response(status_code=CLIENT_CLOSED)


async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 naming each bad field; unlike FastAPI's default, the offending input is never echoed back."""
    return JSONResponse({"detail": api.validation_detail(error.errors())}, status_code=422)


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=error)
    return JSONResponse(
        {"detail": "internal error while serving the request (see the server log)"}, status_code=500
    )


def create_app(settings: ServeSettings) -> FastAPI:
    """The app serving `settings.run_dir`; loads the model now, so a bad run directory fails before binding."""
    import fastapi_offline

    run = load_run(settings.run_dir, device=resolve_device(settings.device))
    detector = _drift_detector(run, settings)
    if detector is None:
        log.warning("drift monitoring is off: %s", NO_REFERENCE)
    metrics = Metrics(run.classes, drift=detector is not None)
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
    info = run_info(run, settings)
    info["drift"] = (
        {"enabled": True, "reference": len(detector.reference.embeddings)}
        if detector is not None
        else {"enabled": False, "reason": NO_REFERENCE}
    )
    state = ServerState(settings, run, encoded_info(info), metrics, monitor)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = MicroBatcher(
            run,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            threads=settings.threads,
            # No reference, no drift test: skip the embedding pass it would feed.
            drift_per_batch=settings.drift_per_batch if detector is not None else 0,
            on_batch=metrics.batch_size.observe,
        )
        await batcher.start()
        if detector is not None:
            # One drift test before serving: its first run imports scipy and sets up its kernels, which
            # took seconds and stalled the first minute's requests when it happened under load.
            reference = detector.reference
            warm = (
                reference.embeddings[: settings.drift_window],
                reference.input_stats[: settings.drift_window],
            )
            await run_in_threadpool(detector.test, *warm)
        state.decoder = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="capas-decode")
        state.drifter = ThreadPoolExecutor(1, thread_name_prefix="capas-drift")
        state.batcher = batcher
        drift_task = (
            asyncio.create_task(_drift_loop(monitor, settings.drift_every_s, state.drifter))
            if detector is not None
            else None
        )
        try:
            yield
        finally:
            if drift_task is not None:
                drift_task.cancel()
            state.batcher = None
            await batcher.stop()
            state.decoder.shutdown(wait=True)
            state.drifter.shutdown(wait=True)

    app = FastAPI(
        title=f"capas serve: {run.spec.name}",
        version=capas.__version__,
        lifespan=lifespan,
        description="Predictions, feedback and monitoring for a capas run directory.",
        docs_url=None,
        redoc_url=None,  # /docs is served from local files (routes/pages.py): no CDN here
    )
    app.state.server = state
    app.include_router(api.router, dependencies=[Depends(known_query)])
    app.include_router(monitoring.router, dependencies=[Depends(known_query)])
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=pages.STATIC), name="static")
    app.mount(
        pages.DOCS_ASSETS,
        StaticFiles(directory=Path(fastapi_offline.__file__).parent / "static"),
        name="docs-assets",
    )
    app.add_exception_handler(Exception, _internal_error)
    app.add_exception_handler(ClientDisconnect, _client_closed)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    # The last added is the outermost: metrics see every answer, including 401, 413 and 421.
    app.add_middleware(HeadAsGet)
    if settings.token is not None:
        app.add_middleware(TokenGuard, token=settings.token.get_secret_value())
    else:
        app.add_middleware(HostGuard, bound=settings.host)
    app.add_middleware(BodyLimit, limit=int(settings.max_body_mb * 1e6), timeout=settings.read_timeout_s)
    # FastAPI keeps included routers whole in app.routes: their routes are listed from the routers
    routes = [*api.router.routes, *monitoring.router.routes, *pages.router.routes, *app.routes]
    app.add_middleware(RequestMetrics, metrics=metrics, on_predict=monitor.record_latency, routes=routes)
    return app


def _drift_detector(run: Run, settings: ServeSettings) -> DriftDetector | None:
    """The drift test against the run's reference; None when the run has none (e.g. a Keras import
    without --data). A reference that exists but is damaged or of another model is a CapasError."""
    path = run.path / REFERENCE
    if not path.exists():
        return None
    reference = load_reference(path)
    width = _embedding_width(run)
    if reference.embeddings.shape[1] != width:
        raise CapasError(
            f"{path}: drift reference has {reference.embeddings.shape[1]} features per "
            f"image but the model's embedding has {width}; it belongs to another model (retrain, or "
            "restore the run's own reference)"
        )
    return DriftDetector(reference, alpha=settings.drift_alpha, permutations=settings.drift_permutations)


def _embedding_width(run: Run) -> int:
    """Features per image of the model's embedding (what the drift reference must match)."""
    channels, (height, width) = run.preprocess.channels, run.preprocess.size
    with torch.inference_mode():
        return int(
            run.model.embed(torch.zeros(1, channels, height, width, device=model_device(run.model))).shape[1]
        )


def uvicorn_config(app: FastAPI, settings: ServeSettings, **overrides: object):
    """uvicorn's configuration for `app`: the connection limit and timeouts come from `settings`."""
    import uvicorn

    from capas.deploy.serve.protocol import http_protocol

    return uvicorn.Config(
        app,
        **{
            "host": settings.host,
            "port": settings.port,
            # uvicorn neither times request heads and stalled answers nor limits heads' size with httptools
            "http": http_protocol(
                settings.header_timeout_s, settings.max_header_kb * 1024, settings.send_timeout_s
            ),
            "h11_max_incomplete_event_size": settings.max_header_kb * 1024,
            # No access log: one line per request costs throughput; /metrics counts every request instead.
            "access_log": False,
            "log_level": "info",
            # beyond it uvicorn answers 503 at once; it counts the connection asking among the open
            # ones, so max_connections alone served one fewer (and max_connections 1, no request at all)
            "limit_concurrency": settings.max_connections + 1,
            "timeout_keep_alive": settings.keep_alive_s,  # idle connections close after this (s)
            **overrides,
        },
    )


M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas; True when the C library took the setting.

    glibc gives each thread that allocates under contention an arena of its own (up to 8 per core) and
    rarely returns their free pages: with the decoding pool, uvicorn's worker threads and PyTorch's,
    a 60 s soak grew the server by 194 MB without levelling off, and by 47 MB with 2 arenas
    (benchmarks/serve_soak.py, README). Must run before those threads start allocating."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to cap
        return False
    return mallopt(M_ARENA_MAX, arenas) == 1


def check_address(host: str, port: int) -> None:
    """CapasError naming --host and --port if the server cannot listen there. Checked before the model
    loads: uvicorn binds only once the app has started, then logs the OSError and exits with status 3."""
    try:
        # the addresses asyncio's create_server binds ('' is every interface), with its SO_REUSEADDR
        for family, kind, proto, _, address in socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:  # a family this machine lacks (IPv6): create_server skips it too
                continue
            with sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
    except OSError as error:  # socket.gaierror (an unknown host) included
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise CapasError(f"cannot listen on {where} (--host, --port): {error.strerror}") from None


def serve(settings: ServeSettings) -> None:
    """Serve the run directory until interrupted (Ctrl-C)."""
    import uvicorn

    check_address(settings.host, settings.port)
    limit_malloc_arenas()
    server = uvicorn.Server(uvicorn_config(create_app(settings), settings))
    try:
        server.run()  # after a clean shutdown uvicorn raises again the signal that stopped it
    except Terminated:  # SIGTERM: the command's status says so (143)
        raise
    except KeyboardInterrupt:  # Ctrl-C: stopped as asked
        pass
