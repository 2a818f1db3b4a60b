"""Transfer learning on CIFAR-10: accuracy against wall time, side by side in one process.

First, the frozen backbone's throughput (EfficientNet-Lite0, ImageNet weights, eval mode) at each
resolution: float32 and bfloat16 autocast, in batches of 512 and of `eval_batch_size`'s choice for
the CPU (median of `--repeats` timed passes after a warm-up pass). Then, in `--precision`:
(a) frozen EfficientNet-Lite0 (ImageNet) features + a trained top, features included in the time,
    at each input resolution; at the first, the same run again with the feature cache warm (the speedup).
    The top: average pooling of the last feature map to a 2×2 grid (cached with the backbone),
    BatchNormalization, Dropout, Dense 1024 (ReLU), BatchNormalization, Dropout, Dense 10; AdamW with
    one-cycle rates and label smoothing;
(b) one epoch of the top on the frozen backbone, then fine-tuning the last blocks (6a..7a and top)
    at a tenth of the rate for `--finetune-epochs` (no feature cache: the backbone runs every epoch);
(c) seed 000's model (examples/seed000-flatten.yaml) from scratch for (a)'s wall time.
The warm run, (b) and (c) run at the first resolution only: on a 2-core CPU each is minutes.
Each point is one end-to-end run of several minutes (`--repeats` for medians where time allows).

Accuracy on a stratified held-out 20% of the CIFAR-10 folder (10,000 images of 50,000).
    python benchmarks/transfer.py            # the full benchmark (long on a CPU)
    python benchmarks/transfer.py --quick    # 2,000 training images, one resolution, one repeat
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from capas.data import make_splits
from capas.data.download import cache_root
from capas.inference import EVAL_BATCH, autocast, eval_batch_size
from capas.models import build_backbone, preprocess_for
from capas.runs import environment
from capas.spec import DataConfig, ModelSpec, TrainConfig, load_spec
from capas.train import train

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg" / "train"


def top_spec(size: int, frozen: str | int = "all") -> ModelSpec:
    grid = size // 32  # EfficientNet-Lite0's last map is size/32 across; pooled to 2×2 below
    return ModelSpec.from_dict(
        {
            "name": f"efficientnet-lite0-{size}",
            "input_shape": [size, size, 3],
            "backbone": {"name": "efficientnet_lite0", "weights": "imagenet", "frozen": frozen},
            "layers": [
                {"AveragePooling2D": {"pool_size": grid - grid // 2, "strides": grid // 2}},
                "Flatten",
                "BatchNormalization",
                {"Dropout": {"rate": 0.3}},
                {"Dense": {"units": 1024, "activation": "relu"}},
                "BatchNormalization",
                {"Dropout": {"rate": 0.5}},
                {"Dense": {"units": 10, "activation": "softmax"}},
            ],
        }
    )


def throughput(sizes: list[int], repeats: int) -> list[dict]:
    """Images/s of the frozen backbone, per resolution, precision and batch size (median of repeats)."""
    rows = []
    for size in sizes:
        spec = top_spec(size)
        preprocess = preprocess_for(spec)
        backbone = build_backbone(spec.backbone).eval().to(memory_format=torch.channels_last)
        for precision in ("float32", "bfloat16"):
            for batch in (EVAL_BATCH, eval_batch_size(preprocess, "cpu")):
                x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
                passes = max(1, 256 // batch)
                seconds = []
                with torch.inference_mode(), autocast("cpu", precision):
                    for repeat in range(repeats + 1):
                        started = time.perf_counter()
                        for _ in range(passes):
                            backbone(x)
                        if repeat:  # the first pass warms oneDNN's kernels up
                            seconds.append(time.perf_counter() - started)
                rows.append(
                    {
                        "resolution": size,
                        "precision": precision,
                        "batch": batch,
                        "images_per_s": batch * passes / statistics.median(seconds),
                    }
                )
    return rows


def timed(spec: ModelSpec, data: DataConfig, cfg: TrainConfig, out: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    result = train(spec, data, cfg, out)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="2,000 training images, resolution 96, one repeat"
    )
    parser.add_argument("--data", default=f"folder:{CIFAR}")
    parser.add_argument("--resolutions", default="96,128,160,224")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the top in (a)")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="epochs of (b) after its first")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    limit = 2000 if args.quick else None
    resolutions = [96] if args.quick else [int(v) for v in args.resolutions.split(",")]
    repeats = 1 if args.quick else args.repeats
    data = DataConfig(name=args.data, test_fraction=0.2, limit=limit)
    top_cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=128,
        optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 1e-2},
        schedule={"name": "onecycle"},
        label_smoothing=0.1,
        precision=args.precision,
    )
    speed = throughput(resolutions, max(3, repeats))
    rows = []
    # decode the image folder once, outside every timing (it is cached under $CAPAS_CACHE)
    make_splits(data.name, val_fraction=data.val_fraction, test_fraction=data.test_fraction, limit=limit)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # the runs' features go to a cache of their own, emptied before each repeat; the user's cache
        # (its decoded folders and downloads lent by links) keeps its features
        own, features = tmp / "cache", tmp / "cache" / "features"
        own.mkdir()
        for entry in cache_root().iterdir() if cache_root().is_dir() else ():
            if entry.name != "features":
                (own / entry.name).symlink_to(entry)
        os.environ["CAPAS_CACHE"] = str(own)
        for size in resolutions:
            compare = size == resolutions[0]
            cold, warm, tuned, scratch = [], [], [], []
            for repeat in range(repeats):
                shutil.rmtree(features, ignore_errors=True)  # a cold feature cache for each repeat
                cold.append(timed(top_spec(size), data, top_cfg, tmp / f"a-{size}-{repeat}"))
                if not compare:
                    continue
                warm.append(timed(top_spec(size), data, top_cfg, tmp / f"a2-{size}-{repeat}"))
                fine_cfg = TrainConfig.model_validate(
                    {
                        **top_cfg.model_dump(),
                        "epochs": 1 + args.finetune_epochs,
                        "finetune": {"after_epochs": 1, "unfreeze": 6, "backbone_lr_scale": 0.1},
                    }
                )
                tuned.append(timed(top_spec(size), data, fine_cfg, tmp / f"b-{size}-{repeat}"))
                scratch_cfg = TrainConfig(
                    epochs=1000, batch_size=128, max_seconds=cold[-1][0], precision=args.precision
                )
                scratch.append(
                    timed(
                        load_spec(ROOT / "examples" / "seed000-flatten.yaml"),
                        data,
                        scratch_cfg,
                        tmp / f"c-{size}-{repeat}",
                    )
                )
            measured = [("(a) frozen features + top", cold)]
            if compare:
                measured += [
                    ("(a) again, feature cache warm", warm),
                    (f"(b) 1 epoch top, then {args.finetune_epochs} fine-tuning blocks 6-7", tuned),
                    ("(c) seed 000 from scratch, (a)'s time", scratch),
                ]
            first = len(rows)
            for label, runs in measured:
                rows.append(
                    {
                        "run": label,
                        "resolution": size,
                        "accuracy": statistics.median(r["test_accuracy"] for _, r in runs),
                        "seconds": statistics.median(s for s, _ in runs),
                        "test_images": sum(map(sum, runs[0][1]["confusion_matrix"])),
                    }
                )
            if compare:
                rows[first + 1]["speedup"] = rows[first]["seconds"] / rows[first + 1]["seconds"]

    console = Console()
    table = Table(
        title=f"EfficientNet-Lite0 forward pass, eval mode, {torch.get_num_threads()} threads (images/s)"
    )
    for column in ("input", "precision", "batch", "images/s"):
        table.add_column(column)
    for row in speed:
        table.add_row(
            f"{row['resolution']}²", row["precision"], str(row["batch"]), f"{row['images_per_s']:.1f}"
        )
    console.print(table)
    table = Table(title=f"transfer learning on {args.data}, {args.precision} (median of {repeats})")
    for column in ("run", "input", "test accuracy", "wall s", "test images"):
        table.add_column(column)
    for row in rows:
        extra = f" ({row['speedup']:.1f}× faster)" if "speedup" in row else ""
        table.add_row(
            row["run"],
            f"{row['resolution']}²",
            f"{row['accuracy']:.4f}",
            f"{row['seconds']:.1f}{extra}",
            str(row["test_images"]),
        )
    console.print(table)
    console.print(
        json.dumps(
            {
                "environment": environment(),
                "quick": args.quick,
                "epochs": args.epochs,
                "precision": args.precision,
                "throughput": speed,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
