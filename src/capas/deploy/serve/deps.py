"""What routes depend on: the server's state, injected as `Annotated[..., Depends(...)]`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from capas.deploy.serve.batching import MicroBatcher
from capas.deploy.serve.monitor import Metrics, Monitor
from capas.deploy.serve.settings import ServeSettings
from capas.runs import Run


@dataclass
class ServerState:
    """One served model: its run directory, settings, batcher, monitor and metrics."""

    settings: ServeSettings
    run: Run
    info: dict[bool, bytes]  # /info's JSON answers, with and without the confusion matrix (app.encoded_info)
    metrics: Metrics
    monitor: Monitor
    batcher: MicroBatcher | None = None  # started with the app (it needs the running event loop)
    decoder: ThreadPoolExecutor | None = None  # decodes and preprocesses request images, off the loop
    # runs the drift tests (one at a time anyway): /drift calls waiting for one queue here, not on the
    # thread pool Starlette reads the pages' files on, which 40 waiting calls held entirely
    drifter: ThreadPoolExecutor | None = None


async def get_state(request: Request) -> ServerState:
    # async: FastAPI runs a plain function on anyio's thread pool (40 threads), and every route then
    # waited for a thread while that pool was busy (40 /drift calls held it all before `drifter`)
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]


async def known_query(request: Request) -> None:
    """Refuse a query parameter the route does not take (`/predict?topk=2` gave the default 5 classes,
    as a misplaced `top_k` in a JSON body once did): the token is every route's; the pages, which
    browsers open with whatever a link adds, do not check."""
    route = request.scope.get("route")
    taken = {param.alias for param in getattr(getattr(route, "dependant", None), "query_params", ())}
    if unknown := next((name for name in request.query_params if name not in taken | {"token"}), None):
        raise HTTPException(
            422,
            f"query parameter {unknown[:64]!r}: not one {request.url.path} takes; "
            + (f"it takes {', '.join(sorted(taken))}" if taken else "it takes none"),
        )
