"""Study runs as Ray tasks, on a local Ray instance or a cluster (`capas study FILE --executor ray`).

Each run is one Ray task with its own CPU/GPU request. Ray retries a task whose worker process dies
(killed, out of memory, node lost) up to `max_retries` times; an exception raised by the run itself
is not retried, it is recorded as the run's failure as with the local pool.

Where run directories live. The driver owns the study directory (study.sqlite is written by the
driver only). Before submitting a run, the driver writes a probe file with a random token into the
run's directory; the worker reads it:
- it sees the token (same machine, or the study directory on shared storage such as NFS mounted at
  the same path on every node): the worker trains straight into the run directory, and a retried
  run resumes from that directory's epoch checkpoint;
- it does not (another node with its own disk): the worker trains into a scratch folder of its
  node and returns the finished run directory's files (JSON, text, safetensors: a few MB for the
  models capas studies) inside its result; the driver writes them into the run directory. A retry
  on the same node resumes from the scratch checkpoint, on another node it starts the run over.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import secrets
import shutil
import socket
import tempfile
import warnings
from concurrent.futures import Future
from pathlib import Path

import capas
from capas import atomic
from capas.cpu import available_cores
from capas.errors import CapasError
from capas.runs import staging
from capas.study.executors import Executor, execute_run, ray_slots

try:
    import ray
    from ray.exceptions import RayError, RayTaskError
    from ray.util.queue import Empty, Queue
except ImportError:  # the optional extra; RayExecutor says how to install it
    ray = None

# beside each run directory while its task is out: tells a worker that it sees the driver's disk (not
# inside: training refuses a folder that holds anything but a run, which it replaces whole)
PROBE = ".capas-driver"


def probe_path(out: Path) -> Path:
    """runs/<variant>/.seed-<k>.capas-driver for the run directory runs/<variant>/seed-<k>."""
    return out.with_name(f".{out.name}{PROBE}")


MAX_RETRIES = 2  # re-executions of a run whose worker process died
CONNECT_SECONDS = 10  # to reach a cluster's HEAD:PORT, and for its answer, before Ray is asked to join it
# A Ray head's port (its GCS) speaks gRPC, HTTP/2 in clear unless RAY_USE_TLS: an HTTP/2 server answers
# the client's connection preface with a SETTINGS frame (type 4, the 4th byte of a frame's header)
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


@functools.cache
def code_version() -> str:
    """capas' version and a hash of its source files, as this process imported them: a Ray worker imports
    the capas installed on its node, which training must share with the driver's (the version alone
    stays 0.1.0 while the code changes)."""
    root = Path(capas.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{capas.__version__}+{digest.hexdigest()[:12]}"


def _worker_code() -> str:
    """The Ray task that says which capas a worker runs: where it is and its `code_version`."""
    return f"{code_version()} ({Path(capas.__file__).parent} on {platform.node()})"


def _other_code(worker: str, driver: str) -> CapasError:
    return CapasError(
        f"a Ray worker runs capas {worker}, the driver {driver}: install the driver's capas on every node "
        "and restart the cluster (`ray stop`, `ray start`), whose workers import capas as it was"
    )


def _worker_run(task: dict, events: Queue, token: str, threads: int, code: str) -> dict:
    """The Ray task: train one run where the driver can see it, or in scratch space and ship the files;
    refused on a node whose capas is not the driver's `code` (`code_version`)."""
    if code != code_version():  # another release, or a cluster started before capas was changed
        raise _other_code(_worker_code(), code)
    import torch

    torch.set_num_threads(threads)  # the task's CPU request: runs packed on a node do not oversubscribe it
    out = Path(task["out"])
    probe = probe_path(out)
    if probe.is_file() and probe.read_text() == token:
        result = execute_run(task, events.put)
        result["worker"]["storage"] = "shared"
        return result
    # one folder per user (Windows' temp folder is the user's own): a /tmp/capas-ray that one user made
    # (0755) refused every other user's runs on the node; a fixed path: a retry here resumes the run
    user = os.getuid() if hasattr(os, "getuid") else "user"
    scratch = Path(tempfile.gettempdir()) / f"capas-ray-{user}" / token / task["id"]
    result = execute_run({**task, "out": str(scratch)}, events.put)
    result["worker"]["storage"] = "shipped"
    result["files"] = _files(scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    # what a run makes beside its directory after training (a compressed run), shipped by name
    result["beside"] = {}
    for key in task["extras"]:
        made = result.get(key)
        if (
            isinstance(made, dict)
            and isinstance(made.get("run"), str)
            and Path(made["run"]).parent == scratch.parent
        ):
            beside = Path(made["run"])
            result["beside"][key] = {"name": beside.name, "files": _files(beside)}
            shutil.rmtree(beside, ignore_errors=True)
    with contextlib.suppress(OSError):  # the scratch folders this run made, once empty
        scratch.parent.rmdir()
        scratch.parent.parent.rmdir()
    return result


def _files(folder: Path) -> dict[str, bytes]:
    """A run directory's files by their path inside it (JSON, text, safetensors, ONNX: a few MB)."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


class _WorkerTraceback(Exception):
    """The traceback of a run's exception in its worker, chained to it as concurrent.futures' process
    pool chains its workers' (`_RemoteTraceback`)."""

    def __str__(self) -> str:
        return f"\n{self.args[0]}"


def _deliver(ray_future: Future, future: Future, out: Path) -> None:
    """Driver side of a finished task: write shipped files into the run directory, then resolve `future`."""
    try:
        result = ray_future.result()
    except RayTaskError as error:  # the run raised: pass on its own exception, not Ray's wrapper
        if isinstance(error.cause, Exception):
            # with the worker's frames, which the study records (as the local pool's errors carry them)
            error.cause.__cause__ = _WorkerTraceback(str(error))  # Ray's text: the worker's frames
            future.set_exception(error.cause)
        else:
            future.set_exception(error)
        return
    except BaseException as error:  # the worker died more often than retried, or the task was cancelled
        future.set_exception(error)
        return
    try:
        for name, data in result.pop("files", {}).items():
            atomic.write_with(out / name, lambda tmp, data=data: tmp.write_bytes(data))
        for key, shipped in result.pop("beside", {}).items():
            beside = out.with_name(shipped["name"])
            with staging(beside) as tmp:  # whole or not at all, replacing one there (as compress would)
                for name, data in shipped["files"].items():
                    atomic.write_with(tmp / name, lambda part, data=data: part.write_bytes(data))
            result[key]["run"] = str(beside)
        probe_path(out).unlink(missing_ok=True)
    except (OSError, CapasError) as error:  # CapasError: a full disk
        future.set_exception(CapasError(f"{out}: cannot write the run's files sent by its worker ({error})"))
        return
    future.set_result(result)


def check_options(address: str | None, cpus_per_run: float, gpus_per_run: float) -> None:
    """The executor's options, checked before a study makes its folder: resources, then the address."""
    if cpus_per_run <= 0 or gpus_per_run < 0:
        raise CapasError(
            f"--cpus-per-run must be positive and --gpus-per-run not negative, got {cpus_per_run} and {gpus_per_run}"
        )
    if address is not None:
        check_reachable(address)


def check_reachable(address: str) -> None:
    """Refuse a HEAD:PORT that nothing answers on, or something other than a Ray head (a web server):
    Ray itself retries such an address for minutes, or for good, logging a warning every few seconds."""
    host, sep, port = address.split("://")[-1].rpartition(":")
    if not sep:
        return  # 'auto' and a bare host, which Ray resolves itself
    if not port.isdigit() or not 0 < int(port) < 65536:  # Ray retried '6379 ' and '-5' for minutes
        raise CapasError(
            f"--address {address!r}: the port {port!r} is not a port number (1 to 65535); give HEAD:PORT "
            "as `ray start --head` printed it, or leave out --address for a local Ray instance"
        )
    try:
        connection = socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS)
    except OSError as error:
        raise CapasError(
            f"cannot reach the Ray cluster at {address} ({error}): start it there with "
            f"`ray start --head --port={port}`, or leave out --address for a local Ray instance"
        ) from None
    with connection:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return  # its handshake is TLS's, not checked here
        try:
            connection.sendall(HTTP2_PREFACE)
            answer = connection.recv(4, socket.MSG_WAITALL)
        except OSError:  # no answer within CONNECT_SECONDS, or the connection closed
            answer = b""
    if answer[3:4] != b"\x04":
        raise CapasError(
            f"{address} answers, but not as a Ray cluster's head (its port speaks gRPC): give the address "
            "`ray start --head` printed, or leave out --address for a local Ray instance"
        )


def require_ray() -> None:
    """A clear error, before any work, when the optional Ray extra is not installed."""
    if ray is None:
        raise CapasError("--executor ray needs Ray, an optional extra: pip install 'capas[ray]'")


class RayExecutor(Executor):
    """Runs as Ray tasks: on a new local Ray instance (no address) or on the cluster at `address`.

    A Ray instance already started in this process (`ray.init` by the caller) is used as it is and
    left running at `close`; one this executor starts, it shuts down.
    """

    name = "ray"

    def __init__(
        self,
        workers: int | None = None,
        *,
        address: str | None = None,
        cpus_per_run: float = 1,
        gpus_per_run: float = 0,
        max_retries: int = MAX_RETRIES,
    ):
        require_ray()
        check_options(None, cpus_per_run, gpus_per_run)  # the address: only when joining, below
        self.owned = not ray.is_initialized()
        if self.owned:
            try:
                if address is None:
                    # a new local instance with `workers` CPUs (default: all of this machine's); "local":
                    # not the cluster that a `ray start` on this machine recorded in /tmp/ray, which
                    # ray.init joins by default (and then refuses num_cpus)
                    ray.init(
                        address="local",
                        num_cpus=workers or available_cores(),
                        include_dashboard=False,
                        log_to_driver=False,
                    )
                else:
                    check_reachable(address)
                    ray.init(address=address, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as error:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise CapasError(f"cannot start or join {where}: {error}") from None
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 1), resources.get("GPU", 0)
        self.workers = ray_slots(cpus, gpus, cpus_per_run, gpus_per_run)
        if self.workers == 0:
            if self.owned:
                ray.shutdown()
            raise CapasError(
                f"no run fits on the Ray cluster ({cpus:g} CPUs, {gpus:g} GPUs): each asks for "
                f"{cpus_per_run:g} CPUs (--cpus-per-run) and {gpus_per_run:g} GPUs (--gpus-per-run)"
            )
        if not (self.owned and address is None):  # a local instance it starts runs this process' capas
            self._check_code()
        self.threads = max(1, int(cpus_per_run))
        self.cpus_per_run, self.warned = cpus_per_run, False
        self.token = secrets.token_hex(8)
        # a queue actor that holds no CPU: progress events from every worker, drained by the driver
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.remote = ray.remote(_worker_run).options(
            num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=max_retries, retry_exceptions=False
        )
        self.refs: list = []

    def _check_code(self) -> None:
        """One worker's capas, before any run; each run checks its own node's (a cluster's nodes may differ)."""
        try:
            worker = ray.get(ray.remote(_worker_code).options(num_cpus=0).remote())
        except RayError as error:  # a capas without _worker_code: older than this one
            worker = f"that cannot say which it is ({type(error).__name__}: an older one)"
        if not worker.startswith(f"{code_version()} "):
            if self.owned:
                ray.shutdown()
            raise _other_code(worker, code_version())

    def submit(self, task: dict) -> Future:
        threads = task["train"].get("threads") or 1
        if threads < self.cpus_per_run and not self.warned:  # train.threads, not the request, sets torch's
            self.warned = True
            warnings.warn(
                f"run {task['id']} trains with {threads} thread{'s' if threads != 1 else ''} (train.threads) on the "
                f"{self.cpus_per_run:g} CPUs each run asks Ray for (--cpus-per-run): set base.train.threads: "
                f"{int(self.cpus_per_run)} in the study file to use them, or ask for fewer",
                stacklevel=2,
            )
        out = Path(task["out"])
        atomic.write_text(probe_path(out), self.token)
        ref = self.remote.remote(task, self.queue, self.token, self.threads, code_version())
        self.refs.append(ref)
        future: Future = Future()
        ref.future().add_done_callback(lambda done: _deliver(done, future, out))
        return future

    def events(self) -> list[dict]:
        try:
            return self.queue.get_nowait_batch(self.queue.qsize())
        except Empty:
            return []
        except RayError as error:  # the queue actor died with its node: `ray stop`, a lost head
            first = str(error).strip().splitlines()[0]
            raise CapasError(
                f"lost the Ray cluster while runs were out ({type(error).__name__}: {first}); finished "
                "runs are kept, rerun the same command on a running cluster to resume the others"
            ) from None

    def close(self, cancel: bool = False) -> None:
        if cancel:
            for ref in self.refs:
                ray.cancel(ref, force=True)  # kills the workers; their runs resume from checkpoints on rerun
        elif self.refs:
            ray.wait(self.refs, num_returns=len(self.refs))
        self.queue.shutdown(force=True)
        if self.owned:
            ray.shutdown()
