"""`train.cache_frozen`: the output of the backbone rows that never train, computed once per training.

When a backbone's first rows stay frozen, and in inference mode, for the whole training (fine-tuning
unfreezes only the last ones), each image's output of those rows is the same at every epoch; only a
flip changes it. So before the first epoch both views of every training image (the image and, with
flips, its mirror image) go through those rows once, and the outputs stay in memory. Each step then
gathers its batch's views, drawn in the order and with the flips `iterate_batches` would draw, and
runs the network from the first row not cached (CapasNet.forward's `start_row`). The validation
images' output of those rows is kept too (computed as evaluation computes it: uncompiled, in its
batches), and each epoch's validation runs from there. BatchNorm recalibration and the test run
the whole network on images, as without the cache.

capas.train.features is the other cache: the whole backbone frozen, no augmentation and no
fine-tuning, kept on disk across runs. This one covers fine-tuning and flips, and lives for one
training.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from capas.data import ArrayDataset, Preprocess, iterate_batches
from capas.data.batches import flips
from capas.errors import CapasError
from capas.inference import Evaluation, autocast, eval_batch_size, evaluate, synchronize
from capas.spec import TrainConfig
from capas.spec.train import Augment


def frozen_rows(model: torch.nn.Module, cfg: TrainConfig) -> int:
    """How many leading backbone rows stay frozen for the whole training, from the model's frozen
    count before training starts; a CapasError says why the cache cannot apply."""

    def refuse(why: str) -> CapasError:
        return CapasError(f"train.cache_frozen: {why}; or set cache_frozen: false")

    if getattr(model, "backbone", None) is None:
        raise refuse("needs a model with a backbone (backbone: in the spec) whose first rows stay frozen")
    if not model.spec.backbone.bn_frozen:
        raise refuse(
            "needs the frozen rows in inference mode (backbone.bn_frozen: true); in training mode their "
            "BatchNorm layers normalise each batch with its own statistics, so their output changes"
        )
    rows = model.frozen
    if cfg.finetune is not None:
        rows = 0 if cfg.finetune.unfreeze == "all" else max(0, rows - cfg.finetune.unfreeze)
    if rows == 0:
        raise refuse(
            f"no backbone row stays frozen for the whole training (backbone.frozen: {model.frozen}"
            + (f", train.finetune.unfreeze: {cfg.finetune.unfreeze}" if cfg.finetune else "")
            + ")"
        )
    if cfg.augment.crop_padding or cfg.augment.cutout:
        raise refuse(
            "flips are the only augmentation it can cache (augment.crop_padding and augment.cutout "
            "change the images at every epoch)"
        )
    if cfg.progressive_resizing is not None:
        raise refuse("train.progressive_resizing changes the images' size at every step")
    return rows


@dataclass
class FrozenViews:
    """The first `rows` backbone rows' output for every training image: `values` (N, V, C, h, w),
    view 1 the mirror image's when V = 2."""

    rows: int
    values: torch.Tensor
    labels: torch.Tensor
    seconds: float

    def __len__(self) -> int:
        return len(self.labels)

    def evaluate(self, model: torch.nn.Module, device: torch.device, precision: str) -> Evaluation:
        """`evaluate` of the model from the first row not cached, on the first view of every image."""
        # here, not at the top: capas.train.features imports the loop, which imports this module
        from capas.train.features import Features, as_is

        data = Features(self.values[:, 0], self.labels, ())
        return evaluate(_FromRow(model, self.rows), data, as_is, device, precision=precision)

    def record(self) -> dict:
        """What the run records about the cache (test.json)."""
        return {
            "rows": self.rows,
            "images": len(self),
            "views": self.values.shape[1],
            "gigabytes": round(self.values.numel() * self.values.element_size() / 1e9, 3),
            "seconds": self.seconds,
        }

    def batches(
        self,
        batch_size: int,
        augment: Augment,
        generator: torch.Generator,
        device: torch.device,
        channels_last: bool,
        epoch: int,
        seed: int,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A shuffled epoch, as iterate_batches(shuffle=True) draws it: the same order and flips."""
        order = torch.randperm(len(self), generator=generator, device=generator.device).to(self.values.device)
        stop = len(self) - len(self) % batch_size if drop_last else len(self)
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            flip = flips(augment, len(index), generator, index=index, epoch=epoch, seed=seed)
            view = torch.zeros_like(index) if flip is None else flip.to(index.device).long()
            x = self.values[index, view].to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[index].to(device, non_blocking=True)


class _FromRow(torch.nn.Module):
    """The model run from backbone row `rows` on: what evaluate calls on cached views."""

    def __init__(self, model: torch.nn.Module, rows: int):
        super().__init__()
        self.model, self.rows = model, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, start_row=self.rows)


@torch.no_grad()
def compute(
    model: torch.nn.Module,
    rows: int,
    data: ArrayDataset,
    preprocess: Preprocess,
    cfg: TrainConfig,
    device: torch.device,
    *,
    mirrored: bool,
    compiled: bool,
) -> FrozenViews:
    """Every image (and its mirror image when `mirrored`) through the first `rows` rows
    (CapasNet.rows_output; `compiled`: with freezing while the model's compile_frozen is on), in the
    training's precision and batches of evaluation's size. Kept on a CUDA device when they take at
    most a quarter of its free memory, else in host memory, where more than half of what is
    available is refused."""
    started = time.perf_counter()
    views = 2 if mirrored else 1
    values = None
    batch_size = eval_batch_size(preprocess, device)
    done = 0
    batches = iterate_batches(
        data, batch_size, preprocess=preprocess, device=device, channels_last=cfg.channels_last
    )
    for x, _ in batches:
        with autocast(device, cfg.precision):
            outputs = [model.rows_output(x, rows, compiled)]
            if views == 2:
                flipped = x.flip(3)
                if cfg.channels_last:
                    flipped = flipped.contiguous(memory_format=torch.channels_last)
                outputs.append(model.rows_output(flipped, rows, compiled))
        if values is None:
            values = _allocate((len(data), views, *outputs[0].shape[1:]), outputs[0].dtype, device, rows)
        for view, out in enumerate(outputs):
            values[done : done + len(x), view] = out
        done += len(x)
    labels = data.labels.to(values.device)
    synchronize(device)  # views kept on a GPU may still be computing
    return FrozenViews(rows, values, labels, time.perf_counter() - started)


def _allocate(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, rows: int) -> torch.Tensor:
    size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda" and size <= torch.cuda.mem_get_info(device)[0] // 4:
        return torch.empty(shape, dtype=dtype, device=device)
    available = _available_memory()
    if available is not None and size > available // 2:
        raise CapasError(
            f"train.cache_frozen: the first {rows} backbone rows' output takes {_bytes(size)} for "
            f"{shape[0]:,} images × {shape[1]} views, more than half the memory available "
            f"({_bytes(available)}); freeze fewer rows, use fewer images, or set cache_frozen: false"
        )
    return torch.empty(shape, dtype=dtype)


def _bytes(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
