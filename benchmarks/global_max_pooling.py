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

import contextlib
from pathlib import Path
from unittest import mock

import torch
from cpu_memory import compare  # this script's folder is on sys.path
from train_throughput import CIFAR

from capas.models.modules import _GlobalPool
from capas.spec import load_document

EXAMPLES = Path(__file__).parent.parent / "examples"
SEED000 = {"batch_size": 128, "optimizer": {"name": "adam", "lr": 0.001}}
NETWORKS = {
    "seed-000 GMP, float32, batch 128": (EXAMPLES / "seed000-gmp.yaml", SEED000, f"folder:{CIFAR}"),
    "seed-000 GMP, bfloat16, batch 128": (
        EXAMPLES / "seed000-gmp.yaml", {**SEED000, "precision": "bfloat16"}, f"folder:{CIFAR}"
    ),
    "fashion-mnist-fast, bfloat16, batch 512": (
        EXAMPLES / "recipes" / "fashion-mnist-fast.yaml",
        # the recipe says `precision: auto`, float32 on a CPU without native bfloat16: the row is bfloat16's
        {**load_document(EXAMPLES / "recipes" / "fashion-mnist-fast.train.yaml")["train"], "precision": "bfloat16"},
        "fashion-mnist",
    ),
}  # fmt: skip
WAYS = ("capas (adaptive_max_pool2d)", "before (flatten + max)")


def flatten_max(self: _GlobalPool, x: torch.Tensor) -> torch.Tensor:
    """GlobalMaxPooling2D as capas computed it before, on every device."""
    return x.flatten(2).max(dim=2).values


def patches(way: str) -> contextlib.AbstractContextManager:
    return (
        mock.patch.object(_GlobalPool, "forward", flatten_max) if way == WAYS[1] else contextlib.nullcontext()
    )


if __name__ == "__main__":
    compare(NETWORKS, WAYS, patches, "GlobalMaxPooling2D", __doc__.splitlines()[0])
