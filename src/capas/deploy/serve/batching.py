"""Micro-batching: requests that arrive together share one forward pass.

Requests put their decoded images on an asyncio queue and await a future. One task takes the first
waiting request, then whatever else is queued, and waits at most `max_wait_ms` for more until
`max_batch` images are gathered; the batch is preprocessed and run through the model on one
dedicated thread (so the event loop keeps accepting and parsing requests meanwhile), under
`torch.inference_mode`, and each request gets its rows back. While a forward pass runs, new
requests queue up, so under load batches fill by themselves. The wait is adaptive: a batch waits
only while other requests are being received or decoded (`arriving`), so a lone client never
pays `max_wait_ms`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from capas.data import Preprocess
from capas.inference import autocast, model_device
from capas.runs import Run, input_statistics


@dataclass(frozen=True)
class Output:
    """Model outputs for the images of one request."""

    probabilities: torch.Tensor  # (n, classes)
    embeddings: torch.Tensor  # (e, F) for the first e <= n images: the ones sampled for drift
    input_stats: torch.Tensor  # (e, 2)


@dataclass
class _Request:
    images: list[torch.Tensor]  # uint8 (C, H, W), any sizes
    future: asyncio.Future = field(repr=False)


def preprocess_batch(preprocess: Preprocess, images: list[torch.Tensor]) -> torch.Tensor:
    """Preprocess uint8 (C, H, W) images of mixed sizes into one (B, C, H, W) batch, in their order.

    Images of one size are preprocessed together (one call instead of one per image); each image is
    transformed independently, so the result equals preprocessing them one by one.
    """
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for position, image in enumerate(images):
        groups[tuple(image.shape)].append(position)
    rows: list[torch.Tensor | None] = [None] * len(images)
    for positions in groups.values():
        batch = preprocess(torch.stack([images[p] for p in positions]))  # (b, C, H, W)
        for row, position in zip(batch, positions, strict=True):
            rows[position] = row
    return torch.stack(rows)


class MicroBatcher:
    """Collects images from concurrent requests into batches for one model (see the module docstring)."""

    def __init__(
        self,
        run: Run,
        *,
        max_batch: int,
        max_wait_ms: float,
        threads: int,
        drift_per_batch: int,
        on_batch: Callable[[int], None],
    ):
        self.run = run
        self.on_batch = on_batch  # told the number of images of every forward pass
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000  # seconds
        self.threads = threads
        self.drift_per_batch = drift_per_batch
        self.arriving = 0  # requests being read or decoded that will join a batch soon (see `receiving`)
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        # One thread runs every forward pass: the model is shared, never copied per request, and
        # PyTorch's own intra-op threads (`threads`) parallelise inside the pass.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capas-model")
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, torch.set_num_threads, self.threads)
        self._task = asyncio.create_task(self._loop(), name="capas-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    @contextlib.contextmanager
    def receiving(self) -> Iterator[None]:
        """Wrap reading and decoding a request, so that batches being gathered wait for it."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1

    async def predict(self, images: list[torch.Tensor]) -> Output:
        """Probabilities (and drift features) for the decoded uint8 (C, H, W) images of one request."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(images, future))
        return await future

    async def _collect(self) -> list[_Request]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        size = len(batch[0].images)
        deadline = loop.time() + self.max_wait
        while size < self.max_batch:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0 or not self.arriving:  # nobody else is on the way: do not wait
                    break
                try:
                    request = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                request = self._queue.get_nowait()
            batch.append(request)
            size += len(request.images)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            images = [image for request in batch for image in request.images]
            try:
                probabilities, embeddings, stats = await loop.run_in_executor(
                    self._executor, self._forward, images
                )
            except Exception as error:  # a model failure fails this batch's requests, not the server
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(error)
                continue
            self.on_batch(len(images))
            start = 0
            for request in batch:
                n = len(request.images)
                sampled = max(0, min(n, len(embeddings) - start))
                if not request.future.done():  # a client that went away cancelled its future
                    request.future.set_result(
                        Output(
                            probabilities[start : start + n],
                            embeddings[start : start + sampled],
                            stats[start : start + sampled],
                        )
                    )
                start += n

    def _forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.run.model
        device = model_device(model)
        with torch.inference_mode(), autocast(device, self.run.precision):
            x = preprocess_batch(self.run.preprocess, images).to(device)  # (B, C, H, W) float
            probabilities = model.predict_proba(x).float().cpu()  # (B, classes)
            # Drift needs the penultimate features; a second partial pass on a few images per batch
            # keeps its cost bounded under load (drift_per_batch / max_batch of the model's work).
            sample = x[: self.drift_per_batch]
            embeddings = model.embed(sample).float().cpu() if len(sample) else torch.empty(0, 0)
            return probabilities, embeddings, input_statistics(sample).cpu()
