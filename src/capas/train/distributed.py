"""One run across several processes: DistributedDataParallel, launched by `capas train --nproc N` or torchrun.

Every rank draws the same shuffled order and the same augmentation from the same generator, preprocesses
the whole global batch (cheap whole-batch tensor operations) and keeps its contiguous slice of it; DDP
averages the gradients. The layers' own draws (Dropout masks) come from a stream per rank. The loss of each slice is scaled so that the averaged gradient is the mean over
the global batch, as in one process with the same `batch_size`: results match a single process up to
float rounding (BatchNorm apart, below). Validation and test are sharded and reduced, so every rank makes the same early-stopping
decision. Only rank 0 writes the run directory and checkpoints, and shows the progress bar.

BatchNorm normalizes each rank's slice with that slice's statistics, on GPUs as on the CPU (Keras'
BatchNormalization under a distribution strategy, `synchronized=False`; PyTorch's DDP without
SyncBatchNorm), and DDP copies rank 0's running statistics to the other ranks before each forward pass.
A resumed run reads the checkpoint on every rank: on several machines, put the run directory on shared storage.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from capas.data import ArrayDataset, Preprocess
from capas.errors import CapasError
from capas.inference import Evaluation, evaluate, resolve_device
from capas.spec import DataConfig, ModelSpec, TrainConfig
from capas.spec.io import revalidated
from capas.train.loop import Callback

# The exit status of a training process that found itself importing a script which calls launch() without
# the `__main__` guard (an unusual one, so the launching process can tell this case from a failure)
UNGUARDED = 86


@dataclass(frozen=True)
class Distributed:
    """This process' place in the group: what `fit` and `train` need to shard, reduce and write once."""

    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The DDP module to train through `model`'s own layers. Its BatchNorm layers stay capas' on
        GPUs too: PyTorch's SyncBatchNorm would replace them with layers that average the unbiased
        variance, give a `scale: false` layer's bias no gradient, and train the frozen ones."""
        device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch (the last batch of an epoch may split unevenly)."""
        n = len(batch)
        return batch[n * self.rank // self.world : n * (self.rank + 1) // self.world]

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        torch_dist.barrier()

    def sum(self, *tensors: torch.Tensor) -> None:
        """Sum each tensor over the ranks, in place."""
        for tensor in tensors:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)

    def evaluate(
        self,
        model: nn.Module,
        data: ArrayDataset,
        preprocess: Preprocess,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        precision: str = "float32",
        tta: str = "none",
    ) -> Evaluation:
        """`evaluate` on a 1/world slice per rank, gathered: every rank gets the whole dataset's result.
        Every rank evaluates rank 0's model, the one it saves: on the CPU each rank's BatchNorm
        statistics moved with its own share of the batches, so they are broadcast first."""
        for buffer in model.buffers():
            torch_dist.broadcast(buffer, 0)
        n = len(data)
        bounds = [n * r // self.world for r in range(self.world + 1)]
        first, end = bounds[self.rank], bounds[self.rank + 1]
        largest = max(b - a for a, b in itertools.pairwise(bounds))
        # gloo and nccl gather equal sizes: pad each slice's (prediction, label) pairs to the largest
        mine = torch.full((largest, 2), -1, dtype=torch.int64)
        loss = torch.zeros(1, dtype=torch.float64)
        if end > first:  # with fewer images than processes, some ranks have none
            part = evaluate(
                model,
                data.subset(torch.arange(first, end)),
                preprocess,
                device,
                channels_last,
                precision,
                tta,
            )
            mine[: len(part.labels)] = torch.stack([part.predictions, part.labels], 1)
            loss += part.loss * len(part.labels)
        backend_device = resolve_device("cuda") if torch_dist.get_backend() == "nccl" else torch.device("cpu")
        mine, loss = mine.to(backend_device), loss.to(backend_device)
        slices = [torch.empty_like(mine) for _ in range(self.world)]
        torch_dist.all_gather(slices, mine)
        torch_dist.all_reduce(loss)
        pairs = torch.cat(
            [s[: b - a] for s, (a, b) in zip(slices, itertools.pairwise(bounds), strict=True)]
        ).cpu()
        predictions, labels = pairs[:, 0], pairs[:, 1]
        return Evaluation(loss.item() / n, predictions, labels)


def launched() -> bool:
    """Whether this process was started by torchrun (or `--nproc`) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def env_rank() -> int:
    """This process' rank when launched by torchrun, else 0."""
    return int(os.environ["RANK"]) if launched() else 0


def check(cfg: TrainConfig, world: int) -> None:
    """Settings that cannot be shared over `world` processes, refused before any process starts."""
    if cfg.batch_size % world:
        raise CapasError(
            f"train.batch_size {cfg.batch_size} does not split over {world} processes: "
            f"choose a multiple of {world} (each process takes batch_size / {world} images of every batch)"
        )
    if cfg.max_seconds is not None:
        raise CapasError(
            "train.max_seconds is not supported over several processes: use epochs or max_samples"
        )
    if cfg.cache_frozen:
        raise CapasError("train.cache_frozen trains in one process; set cache_frozen: false with several")


def check_gpus(processes: int, how: str) -> None:
    """One GPU per process on this machine: refuse `processes` more than the GPUs, before any touches one."""
    found = torch.cuda.device_count()
    if processes > found:
        raise CapasError(f"{how} with device cuda needs {processes} GPUs; {found} found")


@contextmanager
def process_group(device: str) -> Iterator[Distributed]:
    """Join the group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    cuda = resolve_device(device).type == "cuda"
    if cuda:
        # torchrun sets LOCAL_WORLD_SIZE (--nproc-per-node); `launch` has checked its own count already
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
        check_gpus(local_world, f"torchrun --nproc-per-node {local_world}")
        torch.cuda.set_device(local_rank)  # "cuda" is then this rank's GPU
    torch_dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield Distributed(rank, world, local_rank)
        # Leave together: rank 0 still writes the run directory after training, and a rank that tore
        # gloo down meanwhile was once killed by SIGABRT ("terminate called without an active exception").
        torch_dist.barrier()
    finally:
        torch_dist.destroy_process_group()


def train_ranked(
    spec: ModelSpec,
    data: DataConfig,
    cfg: TrainConfig,
    out: str | Path,
    *,
    callbacks: Sequence[Callback] = (),
    restart: bool = False,
) -> dict:
    """`train` as one rank of a group started by torchrun; `callbacks` run on rank 0 only."""
    from capas.train import train

    check(cfg, int(os.environ["WORLD_SIZE"]))
    with process_group(cfg.device) as dist:
        return train(
            spec,
            data,
            cfg,
            out,
            callbacks=list(callbacks) if dist.is_main else [],
            dist=dist,
            restart=restart,
        )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, threads: int, job: dict, progress: bool) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(threads)
    callbacks = []
    if progress and rank == 0:
        from rich.console import Console

        from capas.train.progress import RichProgress

        # on stdout, which the processes share with `capas train`: one process prints its epochs there
        callbacks.append(RichProgress(Console(emoji=False)))
    try:
        train_ranked(
            ModelSpec.from_dict(job["spec"]),
            DataConfig.model_validate(job["data"]),
            TrainConfig.model_validate(job["train"]),
            job["out"],
            callbacks=callbacks,
            restart=job["restart"],
        )
    except CapasError as error:
        raise SystemExit(f"error (rank {rank}): {error}") from None


def launch(
    spec: ModelSpec,
    data: DataConfig,
    cfg: TrainConfig,
    out: str | Path,
    nproc: int,
    *,
    progress: bool = True,
    restart: bool = False,
) -> dict:
    """Train one run over `nproc` processes on this machine (one per GPU with device cuda); returns rank 0's
    test results, read from the run directory it wrote."""
    from capas.train import check_out

    # multiprocessing's own test (spawn._check_not_importing_main): this process is a rank still importing
    # the main script, which called launch outside `if __name__ == "__main__":` (its start would fail).
    # It exits quietly with a status of its own, and the launching process says why, once.
    if getattr(mp.current_process(), "_inheriting", False):
        raise SystemExit(UNGUARDED)
    data, cfg = revalidated(data, "launch(): data"), revalidated(cfg, "launch(): cfg")
    check(cfg, nproc)
    check_out(Path(out))  # rank 0 checks it again, but only once every process has started
    if resolve_device(cfg.device).type == "cuda":
        check_gpus(nproc, f"--nproc {nproc}")
    cores = os.cpu_count() or 1
    job = {
        "spec": spec.to_dict(),
        "data": data.model_dump(mode="json"),
        "train": cfg.model_dump(mode="json"),
        "out": str(out),
        "restart": restart,
    }
    try:
        context = mp.start_processes(
            _rank_main,
            args=(nproc, free_port(), max(1, cores // nproc), job, progress),
            nprocs=nproc,
            join=False,
            start_method="spawn",  # fresh interpreters: no copied torch thread pools, CUDA contexts or locks
        )
        try:
            while not context.join():  # raises when a process fails, once it has stopped the others
                pass
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM sent to this process alone (a scheduler, kill)
            for process in context.processes:  # else they trained on and exit waited for them
                process.terminate()  # their checkpoints are whole: a rerun resumes
            raise
    except mp.ProcessExitedException as error:
        if error.exit_code == UNGUARDED:
            raise CapasError(
                "launch() ran again in each training process as it imported your script: call it under "
                '`if __name__ == "__main__":` (each process imports the main script again, as Python\'s '
                "multiprocessing requires)"
            ) from None
        raise CapasError(
            f"training process {error.error_index} exited with status {error.exit_code}"
        ) from None
    except mp.ProcessRaisedException as error:
        raise CapasError(f"a training process failed: {str(error).strip().splitlines()[-1]}") from None
    return json.loads((Path(out) / "test.json").read_text())
