"""Helpers of the serving tests: a real uvicorn server on a free loopback port, and image bytes."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import uvicorn
from PIL import Image

from capas.deploy.serve import create_app, make_settings
from capas.deploy.serve.app import uvicorn_config
from capas.deploy.serve.protocol import http_protocol

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium (scripts/setup.sh installs it)"
)


@contextlib.contextmanager
def browser_page() -> Iterator[tuple[object, list[str]]]:
    """A page of headless Chromium (Playwright) and the list its script errors and console errors go to."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page()
            problems: list[str] = []
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("console", lambda message: message.type == "error" and problems.append(message.text))
            yield page, problems
        finally:
            browser.close()


@contextlib.contextmanager
def live_server(parser: str | None = None, **settings) -> Iterator[tuple[str, object]]:
    """Serve with these settings on 127.0.0.1 (a free port) in a thread; yields (base URL, app).
    `parser` ("httptools", "h11") replaces the server's default HTTP parser."""
    options = make_settings(port=0, **settings)
    app = create_app(options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    limits = (options.header_timeout_s, options.max_header_kb * 1024, options.send_timeout_s)
    overrides = {"http": http_protocol(*limits, parser)} if parser else {}
    server = uvicorn.Server(uvicorn_config(app, options, log_level="warning", **overrides))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def png(image: torch.Tensor) -> bytes:
    """uint8 (C, H, W) -> PNG bytes."""
    array = image.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buffer, "PNG")
    return buffer.getvalue()


def noised(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator) * sigma
    return (images.float() + noise).clamp(0, 255).to(torch.uint8)


def micro_batcher(run, max_batch: int, drift_per_batch: int = 8, on_batch=lambda n: None):
    """The server's MicroBatcher for a run, with the batching tests' queue, wait and one thread."""
    from capas.deploy.serve.batching import MicroBatcher

    return MicroBatcher(
        run,
        max_batch=max_batch,
        max_wait_ms=200,
        max_queue=64,
        threads=1,
        drift_per_batch=drift_per_batch,
        on_batch=on_batch,
    )
