"""Micro-batching: requests that arrive together share one forward pass.

Requests put their preprocessed images (model-sized float tensors: decoding and resizing happen
per request, before this module, so a batch never holds a full-size image) on an asyncio queue and
await a future. One task takes the first waiting request, then whatever else is queued, and waits
at most `max_wait_ms` for more while fewer than `max_batch` images are gathered (a request with
more images than `max_batch` is queued in slices of at most `max_batch`, and a request that would
overflow a batch opens the next one: no forward pass exceeds `max_batch`); the batch is concatenated
and run through the model on one dedicated thread (so the event loop keeps accepting and parsing
requests meanwhile), under `torch.inference_mode`, and each request gets its rows back. While a
forward pass runs, new requests queue up, so under load batches fill by themselves. The wait is
adaptive: a batch waits only while other requests are being received or decoded (`arriving`), so
a lone client never pays `max_wait_ms`. The queue holds at most `max_queue` images: past that a
request is refused at once (`Overloaded`, answered 503 with Retry-After) rather than held in memory.
If a batched forward pass fails, each of its requests is run again alone, so one bad request fails
only itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from capas.inference import autocast, model_device, tta_logits
from capas.runs import Run, input_statistics


class Overloaded(Exception):
    """The queue is full: the client should retry later."""


@dataclass(frozen=True)
class Output:
    """Model outputs for the images of one request."""

    probabilities: torch.Tensor  # (n, classes)
    embeddings: torch.Tensor  # (e, F) for e <= n of the images: the ones sampled for drift
    input_stats: torch.Tensor  # (e, 2)


@dataclass
class _Request:
    inputs: torch.Tensor  # (n, C, H, W) float, preprocessed to the model's input size
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Collects images from concurrent requests into batches for one model (see the module docstring)."""

    def __init__(
        self,
        run: Run,
        *,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
        threads: int,
        drift_per_batch: int,
        on_batch: Callable[[int], None],
    ):
        self.run = run
        self.on_batch = on_batch  # told the number of images of every forward pass
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000  # seconds
        self.max_queue = max_queue
        self.threads = threads
        self.drift_per_batch = drift_per_batch
        self.arriving = 0  # requests being read or decoded that will join a batch soon (see `receiving`)
        self.queued = 0  # images waiting in the queue
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._next: _Request | None = None  # taken from the queue, too large for the batch it met
        # One thread runs every forward pass: the model is shared, never copied per request, and
        # PyTorch's own intra-op threads (`threads`) parallelise inside the pass.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capas-model")
        self._task: asyncio.Task | None = None
        self._sampling = torch.Generator().manual_seed(0)  # which images of a batch feed drift

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, torch.set_num_threads, self.threads)
        await loop.run_in_executor(self._executor, self._warm_up)
        self._task = asyncio.create_task(self._loop(), name="capas-batcher")

    def _warm_up(self) -> None:
        """One forward pass per power-of-two batch size up to max_batch, before the first request:
        the first pass at a new size sets up its kernels (oneDNN primitives, allocator pools), which
        otherwise lands on the first users' latency."""
        channels, (height, width) = self.run.preprocess.channels, self.run.preprocess.size
        size = 1
        while True:
            self._forward(torch.zeros(size, channels, height, width))
            if size >= self.max_batch:
                return
            size = min(2 * size, self.max_batch)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    def full(self) -> bool:
        """Whether a new request would be refused now (checked before its body is even read)."""
        return self.queued >= self.max_queue

    @contextlib.contextmanager
    def receiving(self) -> Iterator[None]:
        """Wrap reading and decoding a request, so that batches being gathered wait for it."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1

    async def predict(self, inputs: torch.Tensor) -> Output:
        """Probabilities (and drift features) for one request's preprocessed (n, C, H, W) inputs;
        `Overloaded` if the queue cannot take them."""
        if self.queued + len(inputs) > self.max_queue:
            raise Overloaded(f"{self.queued} images are waiting for the model (at most {self.max_queue})")
        loop = asyncio.get_running_loop()
        slices = [_Request(part, loop.create_future()) for part in inputs.split(self.max_batch)]
        self.queued += len(inputs)
        for request in slices:
            self._queue.put_nowait(request)
        if len(slices) == 1:
            return await slices[0].future
        outputs = await asyncio.gather(*(request.future for request in slices))
        return Output(
            torch.cat([o.probabilities for o in outputs]),
            torch.cat([o.embeddings for o in outputs]),
            torch.cat([o.input_stats for o in outputs]),
        )

    def _take(self, request: _Request) -> _Request:
        self.queued -= len(request.inputs)
        return request

    async def _collect(self) -> list[_Request]:
        loop = asyncio.get_running_loop()
        first, self._next = self._next or await self._queue.get(), None
        batch = [self._take(first)]
        size = len(first.inputs)
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
            if size + len(request.inputs) > self.max_batch:
                self._next = request  # it opens the next batch
                break
            batch.append(self._take(request))
            size += len(request.inputs)
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            try:
                await self._run(batch)
            except Exception as error:
                if len(batch) == 1:
                    _fail(batch[0], error)
                    continue
                # Which request broke the batch is unknown: run each alone, so only it fails.
                for request in batch:
                    try:
                        await self._run([request])
                    except Exception as alone:  # a model failure fails this request, not the server
                        _fail(request, alone)

    async def _run(self, batch: list[_Request]) -> None:
        x = torch.cat([request.inputs for request in batch]) if len(batch) > 1 else batch[0].inputs
        probabilities, sampled, embeddings, stats = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._forward, x
        )
        self.on_batch(len(x))
        start = 0
        for request in batch:
            n = len(request.inputs)
            mine = (sampled >= start) & (sampled < start + n)  # this request's sampled images
            if not request.future.done():  # a client that went away cancelled its future
                request.future.set_result(
                    Output(probabilities[start : start + n], embeddings[mine], stats[mine])
                )
            start += n

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Probabilities (B, classes), and the batch positions (e,) of the images sampled for drift
        with their embeddings (e, F) and input statistics (e, 2)."""
        model = self.run.model
        device = model_device(model)
        with torch.inference_mode(), autocast(device, self.run.precision):
            x = x.to(device)  # (B, C, H, W) float
            # the run's test-time augmentation (train.tta in config.json): 1, 2 or 6 views per image
            probabilities = torch.softmax(tta_logits(model, x, self.run.tta), dim=1).cpu()  # (B, classes)
            # Drift needs the penultimate features; a second partial pass on a few images per batch
            # keeps its cost bounded under load (drift_per_batch / max_batch of the model's work). They
            # are drawn at random from the whole batch: the first few of it left every later image of a
            # large request unseen by drift.
            sampled = torch.randperm(len(x), generator=self._sampling)[: self.drift_per_batch].sort().values
            if not len(sampled):  # drift off (no reference, or drift_per_batch 0): nothing to sample
                return probabilities, sampled, torch.empty(0, 0), torch.empty(0, 2)
            sample = x[sampled.to(device)]
            return probabilities, sampled, model.embed(sample).float().cpu(), input_statistics(sample).cpu()


def _fail(request: _Request, error: Exception) -> None:
    if not request.future.done():
        request.future.set_exception(error)
