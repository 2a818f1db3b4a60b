"""Transfer learning on CIFAR-10: accuracy against wall time, side by side in one process.

(a) frozen EfficientNet-Lite0 (ImageNet) features + a trained top, features included in the time,
    at each input resolution; and the same run again with the feature cache warm (the speedup);
(b) one epoch of the top on the frozen backbone, then fine-tuning the last blocks (6a..7a and top)
    at a tenth of the rate for `--finetune-epochs` (no feature cache: the backbone runs every epoch);
(c) seed 000's model (examples/seed000-flatten.yaml) from scratch for (a)'s wall time.
(b) and (c) run at the first resolution only: on a 2-core CPU each is many minutes.
Each point is one end-to-end run of several minutes (`--repeats` for medians where time allows).

Accuracy on a stratified held-out 20% of the CIFAR-10 folder (10,000 images of 50,000).
    python benchmarks/transfer.py            # the full benchmark (long on a CPU)
    python benchmarks/transfer.py --quick    # 2,000 training images, one resolution, one repeat
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from capas.data import make_splits
from capas.data.download import cache_root
from capas.runs import environment
from capas.spec import DataConfig, ModelSpec, TrainConfig, load_spec
from capas.train import train

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg" / "train"


def top_spec(size: int, frozen: str | int = "all") -> ModelSpec:
    return ModelSpec.from_dict(
        {
            "name": f"efficientnet-lite0-{size}",
            "input_shape": [size, size, 3],
            "backbone": {"name": "efficientnet_lite0", "weights": "imagenet", "frozen": frozen},
            "layers": [
                "GlobalAveragePooling2D",
                {"Dropout": {"rate": 0.2}},
                {"Dense": {"units": 10, "activation": "softmax"}},
            ],
        }
    )


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
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the top in (a)")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="epochs of (b) after its first")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    limit = 2000 if args.quick else None
    resolutions = [96] if args.quick else [int(v) for v in args.resolutions.split(",")]
    repeats = 1 if args.quick else args.repeats
    data = DataConfig(name=args.data, test_fraction=0.2, limit=limit)
    top_cfg = TrainConfig(epochs=args.epochs, batch_size=128, optimizer={"name": "adam", "lr": 1e-3})
    rows = []
    # decode the image folder once, outside every timing (it is cached under $CAPAS_CACHE)
    make_splits(data.name, val_fraction=data.val_fraction, test_fraction=data.test_fraction, limit=limit)
    features = cache_root() / "features"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in resolutions:
            compare = size == resolutions[0]
            cold, warm, tuned, scratch = [], [], [], []
            for repeat in range(repeats):
                shutil.rmtree(features, ignore_errors=True)  # a cold feature cache for each repeat
                cold.append(timed(top_spec(size), data, top_cfg, tmp / f"a-{size}-{repeat}"))
                warm.append(timed(top_spec(size), data, top_cfg, tmp / f"a2-{size}-{repeat}"))
                if not compare:
                    continue
                fine_cfg = TrainConfig.model_validate(
                    {
                        **top_cfg.model_dump(),
                        "epochs": 1 + args.finetune_epochs,
                        "finetune": {"after_epochs": 1, "unfreeze": 6, "backbone_lr_scale": 0.1},
                    }
                )
                tuned.append(timed(top_spec(size), data, fine_cfg, tmp / f"b-{size}-{repeat}"))
                scratch_cfg = TrainConfig(epochs=1000, batch_size=128, max_seconds=cold[-1][0])
                scratch.append(
                    timed(
                        load_spec(ROOT / "examples" / "seed000-flatten.yaml"),
                        data,
                        scratch_cfg,
                        tmp / f"c-{size}-{repeat}",
                    )
                )
            measured = [("(a) frozen features + top", cold), ("(a) again, feature cache warm", warm)]
            if compare:
                measured += [
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
            rows[first + 1]["speedup"] = rows[first]["seconds"] / rows[first + 1]["seconds"]

    table = Table(title=f"transfer learning on {args.data} (median of {repeats})")
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
    console = Console()
    console.print(table)
    console.print(
        json.dumps({"environment": environment(), "quick": args.quick, "epochs": args.epochs, "rows": rows})
    )


if __name__ == "__main__":
    main()
