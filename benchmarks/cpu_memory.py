"""What keeping the heap and not pre-filling new tensors buy `fit` on a CPU, side by side in one process.

capas' `fit` keeps freed memory in glibc's heap while it trains on a CPU (capas.cpu.kept_heap) and
turns off deterministic mode's filling of new tensors (capas.train.reproducible). This trains the
same networks four ways, repeats interleaved: as capas does; with only one of the two; and with
neither (how `fit` trained before), the two replaced in capas.train.loop for that run. Each fit
trains 2 epochs of the recipe's own training settings (augmentation, lookahead, precision) from a
fresh model; the table shows the second epoch's images/s (the first holds oneDNN's warm-up), median
over the repeats. Networks: the fashion-mnist-wide recipe (bfloat16, batch 512) and the seed-000
model on CIFAR-10 images as benchmarks/train_throughput.py trains it (float32, Adam, batch 128).

    python benchmarks/cpu_memory.py [--batches 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch
from rich.console import Console
from rich.table import Table
from train_throughput import CIFAR  # this script's folder is on sys.path

import capas.train.loop
from capas.data import make_splits
from capas.models import build_model, preprocess_for
from capas.models.init import WHITENING_IMAGES, fit_whitening, whitening_layers
from capas.runs import machine_line
from capas.spec import TrainConfig, load_document, load_spec
from capas.spec.io import parse_config
from capas.train import fit
from capas.train.reproducible import reproducible

EXAMPLES = Path(__file__).parent.parent / "examples"
NETWORKS = {
    "fashion-mnist-wide, bfloat16, batch 512": (
        EXAMPLES / "recipes" / "fashion-mnist-wide.yaml",
        # the recipe says `precision: auto`, float32 on a CPU without native bfloat16: the row is bfloat16's
        {
            **load_document(EXAMPLES / "recipes" / "fashion-mnist-wide.train.yaml")["train"],
            "precision": "bfloat16",
        },
        "fashion-mnist",
    ),
    "seed-000, float32, batch 128": (
        EXAMPLES / "seed000-gap.yaml",
        {"batch_size": 128, "optimizer": {"name": "adam", "lr": 0.001}},
        f"folder:{CIFAR}",
    ),
}
WAYS = ("capas (heap kept, no filling)", "heap kept only", "no filling only", "neither (before)")


@contextlib.contextmanager
def filling(cfg: TrainConfig) -> Iterator[None]:
    """capas' reproducible() with deterministic mode's filling of new tensors back on."""
    with reproducible(cfg):
        torch.utils.deterministic.fill_uninitialized_memory = cfg.deterministic
        yield


def second_epoch(spec_path: Path, train: dict, splits, patches: contextlib.AbstractContextManager) -> float:
    """Images/s of the second of two `fit` epochs of a fresh model, `patches` in force while it is
    built and trains."""
    spec = load_spec(spec_path)
    cfg = parse_config(TrainConfig, {**train, "epochs": 2}, "training config")
    with patches:
        model = build_model(spec, seed=0)
        preprocess = preprocess_for(spec)
        if whitening_layers(model):
            images = splits.train.images[:WHITENING_IMAGES]
            fit_whitening(model, (preprocess(part) for part in images.split(256)))
        result = fit(model, splits.train, splits.val, preprocess, cfg)
    return result.history[1]["images_per_s"]


def compare(
    networks: dict[str, tuple[Path, dict, str]],
    ways: tuple[str, ...],
    patches: Callable[[str], contextlib.AbstractContextManager],
    way_column: str,
    description: str,
) -> None:
    """Train each network each way (`patches(way)` in force), repeats interleaved, and print the
    medians with each way's ratio to the last one."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--batches", type=int, default=16, help="training batches per epoch")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 140)
    speeds = {(net, way): [] for net in networks for way in ways}
    for _ in range(args.repeats):
        for net, (spec_path, train, data) in networks.items():
            images = args.batches * train["batch_size"]
            splits = make_splits(data, limit=images + 256, val_fraction=256 / (images + 256))
            for way in ways:
                speed = second_epoch(spec_path, train, splits, patches(way))
                speeds[net, way].append(speed)
                console.print(f"{net} · {way}: {speed:,.0f} images/s", highlight=False)
    table = Table(title=f"fit on a CPU, {args.batches} batches an epoch, second epoch")
    for column in ("network", way_column, "images/s (median)", "min–max", f"× {ways[-1]}"):
        table.add_column(column, justify="left" if column in ("network", way_column) else "right")
    for net in networks:
        last = statistics.median(speeds[net, ways[-1]])
        for way in ways:
            values = speeds[net, way]
            median = statistics.median(values)
            table.add_row(
                net, way, f"{median:,.0f}", f"{min(values):,.0f}–{max(values):,.0f}", f"{median / last:.2f}"
            )
    console.print(table)
    console.print(f"{machine_line()}; median of {args.repeats} repeats", highlight=False)


def patches(way: str) -> contextlib.ExitStack:
    """capas' `fit` as it is, or with the kept heap or the unfilled tensors taken out."""
    stack = contextlib.ExitStack()
    if way in ("no filling only", "neither (before)"):
        stack.enter_context(mock.patch.object(capas.train.loop, "kept_heap", contextlib.nullcontext))
    if way in ("heap kept only", "neither (before)"):
        stack.enter_context(mock.patch.object(capas.train.loop, "reproducible", filling))
    return stack


def main() -> None:
    compare(NETWORKS, WAYS, patches, "way", __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
