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
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
from rich.console import Console
from rich.table import Table
from train_throughput import CIFAR  # this script's folder is on sys.path

import capas.train.loop
from capas.cpu import describe
from capas.data import make_splits
from capas.models import build_model, preprocess_for
from capas.models.init import WHITENING_IMAGES, fit_whitening, whitening_layers
from capas.runs import environment
from capas.spec import TrainConfig, load_document, load_spec
from capas.spec.io import parse_config
from capas.train import fit
from capas.train.reproducible import reproducible

EXAMPLES = Path(__file__).parent.parent / "examples"
NETWORKS = {
    "fashion-mnist-wide, bfloat16, batch 512": (
        EXAMPLES / "recipes" / "fashion-mnist-wide.yaml",
        load_document(EXAMPLES / "recipes" / "fashion-mnist-wide.train.yaml")["train"],
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


def run(spec_path: Path, train: dict, splits, way: str) -> float:
    spec = load_spec(spec_path)
    cfg = parse_config(TrainConfig, {**train, "epochs": 2}, "training config")
    model = build_model(spec, seed=0)
    preprocess = preprocess_for(spec)
    if whitening_layers(model):
        fit_whitening(model, (preprocess(part) for part in splits.train.images[:WHITENING_IMAGES].split(256)))
    patches = contextlib.ExitStack()
    if way in ("no filling only", "neither (before)"):
        patches.enter_context(mock.patch.object(capas.train.loop, "kept_heap", contextlib.nullcontext))
    if way in ("heap kept only", "neither (before)"):
        patches.enter_context(mock.patch.object(capas.train.loop, "reproducible", filling))
    with patches:
        result = fit(model, splits.train, splits.val, preprocess, cfg)
    return result.history[1]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=16, help="training batches per epoch")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 140)
    speeds = {(net, way): [] for net in NETWORKS for way in WAYS}
    for _ in range(args.repeats):
        for net, (spec_path, train, data) in NETWORKS.items():
            images = args.batches * train["batch_size"]
            splits = make_splits(data, limit=images + 256, val_fraction=256 / (images + 256))
            for way in WAYS:
                speed = run(spec_path, train, splits, way)
                speeds[net, way].append(speed)
                console.print(f"{net} · {way}: {speed:,.0f} images/s", highlight=False)
    table = Table(title=f"fit on a CPU, {args.batches} batches an epoch, second epoch")
    for column in ("network", "way", "images/s (median)", "min–max", "× neither"):
        table.add_column(column, justify="left" if column in ("network", "way") else "right")
    for net in NETWORKS:
        before = statistics.median(speeds[net, WAYS[-1]])
        for way in WAYS:
            values = speeds[net, way]
            median = statistics.median(values)
            table.add_row(
                net, way, f"{median:,.0f}", f"{min(values):,.0f}–{max(values):,.0f}", f"{median / before:.2f}"
            )
    console.print(table)
    env = environment()
    console.print(
        f"machine: {env['processor']}, {env['cpu_count']} threads, torch {env['torch']}, python "
        f"{env['python']}; {describe(env['cpu_features'])}; median of {args.repeats} repeats",
        highlight=False,
    )


if __name__ == "__main__":
    main()
