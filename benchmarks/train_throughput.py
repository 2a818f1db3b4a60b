"""Training throughput of the 300,042-parameter seed-000 model at batch 128: capas against plain PyTorch.

The plain loops are what a user writes by hand: the same architecture as nn.Sequential, float
tensors already in memory, zero_grad/backward/step. capas' `fit` starts from uint8 images and does
its own batching and scaling. Repeats are interleaved so that a busy machine slows all alike; the
table shows medians. Achieved FLOP/s counts 3 × the forward multiply-adds (forward + backward) × 2
FLOPs, as a fraction of a measured fp32 matmul peak.

    python benchmarks/train_throughput.py [--batches 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from capas.data import ArrayDataset, default_preprocess, make_splits
from capas.models import build_model
from capas.runs import environment
from capas.spec import TrainConfig, load_spec
from capas.spec.summary import summarize
from capas.train import fit

SPEC = Path(__file__).parent.parent / "examples" / "seed000-gap.yaml"
CIFAR = Path(__file__).parent.parent.parent / "shared" / "datasets" / "cifar10-jpeg" / "train"
BATCH = 128


def plain_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 128, 3), nn.ReLU(), nn.Conv2d(128, 128, 3), nn.ReLU(), nn.Conv2d(128, 128, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )  # fmt: skip


def plain_loop(images: torch.Tensor, labels: torch.Tensor, channels_last: bool) -> float:
    """Images/s of a hand-written eager loop over float images already scaled to 0–1."""
    model = plain_model()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for i in range(0, len(images), BATCH):
        x, y = images[i : i + BATCH], labels[i : i + BATCH]
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return len(images) / (time.perf_counter() - start)


def capas_fit(train: ArrayDataset, val: ArrayDataset) -> float:
    spec = load_spec(SPEC)
    result = fit(build_model(spec, seed=0), train, val, default_preprocess(spec.input_shape),
                 TrainConfig(epochs=1, batch_size=BATCH, device="cpu"))  # fmt: skip
    return result.images_per_second


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Measured fp32 matmul FLOP/s (the best of a few repeats)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10, help="training batches of 128 per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    data = f"folder:{CIFAR}" if CIFAR.is_dir() else "cifar10"
    splits = make_splits(data, limit=args.batches * BATCH, val_fraction=0.02)
    train, val = splits.train, splits.val
    floats = train.images.float() / 255  # the plain loops get their input ready-made
    labels = train.labels

    runs: dict[str, list[float]] = {
        "plain PyTorch (NCHW)": [],
        "plain PyTorch (channels-last)": [],
        "capas fit": [],
    }
    capas_fit(train.subset(torch.arange(BATCH)), val)  # warm-up: first-call allocations, thread pools
    for _ in range(args.repeats):
        runs["plain PyTorch (NCHW)"].append(plain_loop(floats, labels, channels_last=False))
        runs["plain PyTorch (channels-last)"].append(plain_loop(floats, labels, channels_last=True))
        runs["capas fit"].append(capas_fit(train, val))

    macs = summarize(load_spec(SPEC)).macs
    peak = matmul_peak()
    env = environment()
    table = Table(title=f"Training throughput, seed-000 GAP model (300,042 params), batch {BATCH}, CPU")
    for column in ("loop", "images/s (median)", "min–max", "GFLOP/s", "of matmul peak"):
        table.add_column(column, justify="right" if column != "loop" else "left")
    for name, values in runs.items():
        median = statistics.median(values)
        flops = median * macs * 3 * 2
        table.add_row(name, f"{median:.1f}", f"{min(values):.1f}–{max(values):.1f}", f"{flops / 1e9:.1f}",
                      f"{flops / peak:.0%}")  # fmt: skip
    console = Console()
    console.print(table)
    console.print(
        f"{args.repeats} repeats × {len(train)} images; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; "
        f"torch {env['torch']}, {torch.get_num_threads()} threads, {env['processor']}, Python {env['python']}"
    )


if __name__ == "__main__":
    main()
