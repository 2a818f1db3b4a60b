"""Where a study's runs execute: in this process one at a time, or in a local pool of worker processes.

The contract every executor keeps (a Ray executor implements the same three methods):
- the driver submits JSON-able run tasks (`RunTask.to_dict()`) and gets a `concurrent.futures.Future`
  of a JSON-able result (`execute_run`'s return value);
- a worker trains and writes only its own run directory (`task["out"]`); it never opens the study
  database: only the driver writes that;
- progress comes back as small JSON-able events, collected by the driver with `events()`:
  {"run": id, "event": "start", "total": steps, "done": steps}, {"run": id, "event": "steps", "n": k},
  {"run": id, "event": "epoch", "metrics": {...}}.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import multiprocessing.sharedctypes
import os
import platform
import queue
import signal
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from capas.cpu import available_cores
from capas.spec import DataConfig, ModelSpec, TrainConfig
from capas.study.spec import KINDS
from capas.train import CHECKPOINT, Callback, train

Send = Callable[[dict], None]
EVENT_INTERVAL = 0.5  # seconds between step events from one run: enough for a live bar, cheap on the queue


@dataclass(frozen=True)
class RunTask:
    """One run as the driver hands it to a worker: everything JSON, nothing pickled but plain data."""

    id: str
    variant: str
    seed: int
    spec: dict
    train: dict
    data: dict
    extras: dict
    out: str

    def to_dict(self) -> dict:
        return asdict(self)


class RunCancelled(Exception):
    """Raised inside a run that the driver stopped (Ctrl-C while running in-process)."""


class _Reporter(Callback):
    """Sends a run's progress to the driver, at most every EVENT_INTERVAL seconds for steps."""

    def __init__(self, run_id: str, send: Send):
        self.run_id, self.send = run_id, send
        self.steps, self.last = 0, time.monotonic()

    def on_fit_start(self, epochs: int, steps_per_epoch: int, start_epoch: int) -> None:
        self.send(
            {
                "run": self.run_id,
                "event": "start",
                "total": epochs * steps_per_epoch,
                "done": start_epoch * steps_per_epoch,
            }
        )

    def on_batch_end(self, images: int, loss: torch.Tensor, correct: torch.Tensor) -> None:
        self.steps += 1
        if time.monotonic() - self.last >= EVENT_INTERVAL:
            self._flush()

    def on_epoch_end(self, metrics: dict) -> None:
        self._flush()
        self.send({"run": self.run_id, "event": "epoch", "metrics": metrics})

    def _flush(self) -> None:
        if self.steps:
            self.send({"run": self.run_id, "event": "steps", "n": self.steps})
        self.steps, self.last = 0, time.monotonic()


def execute_run(task: dict, send: Send | None = None) -> dict:
    """The worker's job: train one run into its directory (resuming a checkpoint) and return its results.

    A run directory that is already complete (test.json written and the checkpoint gone: the
    driver was killed before it could record the result) is read back instead of trained again.
    """
    out = Path(task["out"])
    started = time.perf_counter()
    if not ((out / "test.json").is_file() and not (out / CHECKPOINT).exists()):
        train(
            ModelSpec.from_dict(task["spec"], source=f"run {task['id']}"),
            DataConfig.model_validate(task["data"]),
            TrainConfig.model_validate(task["train"]),
            out,
            callbacks=[_Reporter(task["id"], send)] if send else [],
        )
    result = json.loads((out / "test.json").read_text())
    result["history"] = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line
    ]
    for key, args in task["extras"].items():
        after = KINDS[key].after_train
        if after is not None:
            result[key] = after(out, args)
    config = json.loads((out / "config.json").read_text())
    result["worker"] = {  # this process, which trained the run or read it back
        "host": platform.node(),
        "pid": os.getpid(),
        "seconds": time.perf_counter() - started,
    }
    if (env := config.get("environment")) is not None:  # where it trained: the report's machine line
        result["worker"] |= {
            "gpu": env["cuda"] if config["device"].startswith("cuda") else None,
            **{key: env[key] for key in ("processor", "threads", "torch", "capas", "python")},
        }
    return result


class Executor(ABC):
    """Runs tasks somewhere and reports progress; see the module docstring for the contract."""

    name: str
    workers: int

    @abstractmethod
    def submit(self, task: dict) -> Future:
        """Start (or queue) one run task; the future's result is `execute_run`'s dict."""

    @abstractmethod
    def events(self) -> list[dict]:
        """Progress events received since the last call, without waiting."""

    @abstractmethod
    def close(self, cancel: bool = False) -> None:
        """Wait for submitted runs (or, with cancel, drop the queued ones) and release the workers."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        self.close(cancel=exc_type is not None)


def _drain(source: queue.Queue | multiprocessing.queues.Queue) -> list[dict]:
    events = []
    while True:
        try:
            events.append(source.get_nowait())
        except queue.Empty:
            return events


class SequentialExecutor(Executor):
    """One run at a time in a thread of this process, with all of torch's threads."""

    name = "sequential"

    def __init__(self, workers: int = 1):
        self.workers = 1
        self.queue: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        # a thread, not the caller: the driver keeps drawing progress while a run trains
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capas-run")

    def _send(self, event: dict) -> None:
        # A thread cannot be killed: on Ctrl-C the run stops at its next progress event (within
        # EVENT_INTERVAL); its last epoch checkpoint is where the rerun resumes.
        if self.stopping.is_set():
            raise RunCancelled(event["run"])
        self.queue.put(event)

    def submit(self, task: dict) -> Future:
        return self.pool.submit(execute_run, task, self._send)

    def events(self) -> list[dict]:
        return _drain(self.queue)

    def close(self, cancel: bool = False) -> None:
        if cancel:
            self.stopping.set()
        self.pool.shutdown(wait=True, cancel_futures=cancel)


PR_SET_PDEATHSIG = 1  # prctl(2)
_events: multiprocessing.queues.Queue | None = None  # a pool worker's event queue, set by _init_worker


def _die_with(parent: int) -> None:
    """On Linux, ask for SIGKILL when the driver dies, however it dies: a worker left behind would
    keep training, holding its run directory's lock against the next `capas study`. (Elsewhere the
    pool's own shutdown is what stops workers.)"""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        return  # not allowed here (a sandbox): the pool's shutdown still stops the workers
    if os.getppid() != parent:  # the driver died before the request took effect
        os._exit(1)


def _init_worker(
    events: multiprocessing.queues.Queue,
    threads: int,
    started: multiprocessing.sharedctypes.Synchronized,
    parent: int,
) -> None:
    _die_with(parent)
    # Ctrl-C reaches the whole process group: the driver handles it (close(cancel=True) stops the
    # workers); a worker that took it as its run's exception went on to train the next queued run.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One process per run: torch threads per worker share the cores without oversubscribing them
    # (a run's train.threads, which studies always set, replaces this while it trains).
    global _events
    _events = events
    torch.set_num_threads(threads)
    with started.get_lock():
        index, started.value = started.value, started.value + 1
    if torch.cuda.device_count() > 1:
        # workers take the GPUs in turn: device "cuda" is then this worker's GPU
        torch.cuda.set_device(index % torch.cuda.device_count())


def _pool_run(task: dict) -> dict:
    return execute_run(task, _events.put)


def default_workers(
    runs: int, *, threads: int, cuda: bool, cores: int, gpus: int, runs_per_gpu: int = 1
) -> int:
    """How many runs a local study trains at once unless told: with CUDA, `runs_per_gpu` per GPU (more
    would only queue on the GPU and each holds a CUDA context); else as many as the cores hold at
    `threads` CPU threads each; never more than there are runs."""
    slots = gpus * runs_per_gpu if cuda and gpus > 0 else cores // max(1, threads)
    return max(1, min(slots, runs))


def ray_slots(cpus: float, gpus: float, cpus_per_run: float, gpus_per_run: float) -> int:
    """Runs that fit on a Ray cluster at once: the scarcer of its CPUs and (when runs ask for them) GPUs;
    0 when not even one fits."""
    slots = cpus // cpus_per_run
    if gpus_per_run > 0:
        slots = min(slots, gpus // gpus_per_run)
    return int(slots)


class PoolExecutor(Executor):
    """A local pool of spawned worker processes, each with cores // workers torch threads (until a run
    sets its own) and, with several GPUs, one of them in turn."""

    name = "pool"

    def __init__(self, workers: int | None = None):
        cores = available_cores()
        self.workers = workers or cores
        self.threads = max(1, cores // self.workers)
        # spawn: a fresh interpreter per worker (fork would copy the driver's torch thread pools and locks)
        context = multiprocessing.get_context("spawn")
        self.queue = context.Queue()
        self.pool = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=context,
            initializer=_init_worker,
            initargs=(self.queue, self.threads, context.Value("i", 0), os.getpid()),
        )

    def submit(self, task: dict) -> Future:
        return self.pool.submit(_pool_run, task)

    def events(self) -> list[dict]:
        return _drain(self.queue)

    def close(self, cancel: bool = False) -> None:
        if not cancel:
            self.pool.shutdown(wait=True)
            return
        # Runs already handed to a worker cannot be cancelled, only stopped: the workers are
        # terminated (each run resumes from its last epoch's checkpoint when the study is rerun).
        # Python 3.14's ProcessPoolExecutor.terminate_workers() does this; 3.11 keeps them private.
        processes = list((getattr(self.pool, "_processes", None) or {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(10)


def ray_executor(workers: int | None = None, **options) -> Executor:
    """A `RayExecutor` (imported only when asked for: Ray is an optional extra); options as its own."""
    from capas.study.ray_executor import RayExecutor

    return RayExecutor(workers, **options)


EXECUTORS: dict[str, Callable[[int | None], Executor]] = {
    "sequential": SequentialExecutor,
    "pool": PoolExecutor,
    "ray": ray_executor,
}
"""Executors by name (the benchmark compares them)."""


def make_executor(workers: int | None, runs: int, *, threads: int = 1, cuda: bool = False) -> Executor:
    """The local executor: `workers`, or `default_workers` for this machine; a single worker runs in-process."""
    workers = workers or default_workers(
        runs, threads=threads, cuda=cuda, cores=available_cores(), gpus=torch.cuda.device_count()
    )
    return EXECUTORS["sequential"](1) if workers == 1 else EXECUTORS["pool"](workers)
