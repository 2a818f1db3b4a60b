"""What capas' CPU formulation of GlobalMaxPooling2D buys `fit`, side by side in one process.

On a CPU capas' GlobalMaxPooling2D is `adaptive_max_pool2d(x, 1)`, whose gradient keeps a
channels-last input's layout; before, it was `x.flatten(2).max(dim=2)` everywhere (as it still is on
CUDA), which copies a channels-last input to NCHW and hands the layer before it an NCHW gradient.
This trains the same networks both ways, repeats interleaved, the old forward put back in
capas.models.modules for its runs. Each fit trains 2 epochs from a fresh model; the table shows the
second epoch's images/s (the first holds oneDNN's warm-up), median over the repeats. Networks: the
seed-000 model with GlobalMaxPooling2D (examples/seed000-gmp.yaml) on CIFAR-10 images at batch 128
with Adam, in float32 and bfloat16, and the fashion-mnist-fast recipe with its own settings.

    python benchmarks/global_max_pooling.py [--batches 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch
from rich.console import Console
from rich.table import Table
from train_throughput import CIFAR  # this script's folder is on sys.path

from capas.cpu import describe
from capas.data import make_splits
from capas.models import build_model, preprocess_for
from capas.models.init import WHITENING_IMAGES, fit_whitening, whitening_layers
from capas.models.modules import _GlobalPool
from capas.runs import environment
from capas.spec import TrainConfig, load_document, load_spec
from capas.spec.io import parse_config
from capas.train import fit

EXAMPLES = Path(__file__).parent.parent / "examples"
SEED000 = {"batch_size": 128, "optimizer": {"name": "adam", "lr": 0.001}}
NETWORKS = {
    "seed-000 GMP, float32, batch 128": (EXAMPLES / "seed000-gmp.yaml", SEED000, f"folder:{CIFAR}"),
    "seed-000 GMP, bfloat16, batch 128": (
        EXAMPLES / "seed000-gmp.yaml", {**SEED000, "precision": "bfloat16"}, f"folder:{CIFAR}"
    ),
    "fashion-mnist-fast, bfloat16, batch 512": (
        EXAMPLES / "recipes" / "fashion-mnist-fast.yaml",
        load_document(EXAMPLES / "recipes" / "fashion-mnist-fast.train.yaml")["train"],
        "fashion-mnist",
    ),
}  # fmt: skip
WAYS = ("capas (adaptive_max_pool2d)", "flatten + max (before)")


def flatten_max(self: _GlobalPool, x: torch.Tensor) -> torch.Tensor:
    """GlobalMaxPooling2D as capas computed it before, on every device."""
    return x.flatten(2).max(dim=2).values


def run(spec_path: Path, train: dict, splits, way: str) -> float:
    spec = load_spec(spec_path)
    cfg = parse_config(TrainConfig, {**train, "epochs": 2}, "training config")
    model = build_model(spec, seed=0)
    preprocess = preprocess_for(spec)
    if whitening_layers(model):
        fit_whitening(model, (preprocess(part) for part in splits.train.images[:WHITENING_IMAGES].split(256)))
    before = (
        mock.patch.object(_GlobalPool, "forward", flatten_max) if way == WAYS[1] else contextlib.nullcontext()
    )
    with before:
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
    for column in ("network", "GlobalMaxPooling2D", "images/s (median)", "min–max", "× before"):
        table.add_column(column, justify="left" if column in ("network", "GlobalMaxPooling2D") else "right")
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
