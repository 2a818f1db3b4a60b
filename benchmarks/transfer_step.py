"""The CIFAR-10 transfer preset's training step on the CPU, eager against compiled, side by side.

The network of examples/recipes/cifar10-transfer.yaml (EfficientNet-Lite0 with ImageNet weights at
160×160, GlobalAveragePooling2D → Dropout → Dense(10)) trains through capas' `fit` in bfloat16 at
batch 128 on real CIFAR-10 images, in its two phases: the top over the frozen backbone, and the
last `--unfreeze` rows fine-tuned with the rest frozen. Each phase in six ways:

- "bfloat16 depthwise backward": PyTorch's own bfloat16 backward of the depthwise convolutions
  (capas.train.depthwise turned off in this process, for the comparison only);
- "eager": capas' default, depthwise gradients in float32;
- "compile: frozen": the frozen rows compiled as an inference graph with Inductor's freezing;
- "compile: true": that and the training step compiled (with PyTorch's bfloat16 depthwise backward);
- "compile: frozen + cache_frozen": compile: frozen, and the rows that the fine-tuning phase keeps
  frozen (all but the last `--unfreeze`) computed once per image and mirror image before the first
  epoch (alternating flips, as the preset), so that each step runs from the next row; the one-time
  cost is its own column (the preset's way);
- "compile: frozen + cache_frozen, oneDNN's depthwise weight gradients": the same without
  capas.train.depthwise.WeightGradKernel (which `compile: frozen` uses on a CPU with AVX-512; turned
  off in this process, for the comparison only).

Each run trains 2 epochs of `--batches` batches and times the second (the first compiles); images/s
are medians over `--repeats` interleaved repeats, the first epoch's seconds printed apart. `--ways`
runs some of them, by their short names (own-bfloat16, eager, frozen, true, cached, cached-onednn).

    python benchmarks/transfer_step.py [--batches 8] [--repeats 3] [--unfreeze 4] [--ways cached cached-onednn]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path
from unittest import mock

from rich.console import Console
from rich.table import Table

import capas.train.depthwise
from capas.data import make_splits
from capas.models import build_model, preprocess_for
from capas.runs import machine_line
from capas.spec import ModelSpec, TrainConfig, load_spec
from capas.train import fit

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg" / "train"
SPEC = ROOT / "examples" / "recipes" / "cifar10-transfer.yaml"
BATCH = 128
CACHED = "compile: frozen + cache_frozen"
CACHED_ONEDNN = "compile: frozen + cache_frozen, oneDNN's depthwise weight gradients"
TOP_PHASE = "top over the frozen backbone"
SHORT = {
    "own-bfloat16": "bfloat16 depthwise backward",
    "eager": "eager",
    "frozen": "compile: frozen",
    "true": "compile: true",
    "cached": CACHED,
    "cached-onednn": CACHED_ONEDNN,
}
WAYS = tuple(SHORT.values())


def spec_for(frozen: int | str) -> ModelSpec:
    document = load_spec(SPEC).to_dict()
    document["backbone"]["frozen"] = frozen
    return ModelSpec.from_dict(document)


def config(way: str, unfreeze: int | None) -> TrainConfig:
    """The training of one way; `unfreeze`: the rows fine-tuning would unfreeze later (the cache
    leaves them out)."""
    compile_setting = {
        "compile: frozen": "frozen",
        "compile: true": True,
        CACHED: "frozen",
        CACHED_ONEDNN: "frozen",
    }
    cached, epochs = {}, 2
    if way in (CACHED, CACHED_ONEDNN):
        cached = {"cache_frozen": True, "augment": {"hflip": "alternate"}}
        if unfreeze is not None:  # a switch after the 2 epochs timed: it decides which rows stay frozen
            cached["finetune"] = {"after_epochs": 2, "unfreeze": unfreeze}
            epochs = 3  # a switch must come before the last epoch
    return TrainConfig(
        epochs=epochs,
        batch_size=BATCH,
        optimizer={"name": "adamw", "lr": 1e-3},
        precision="bfloat16",
        compile=compile_setting.get(way, False),
        device="cpu",
        **cached,
    )


def run(spec: ModelSpec, splits, way: str, unfreeze: int | None) -> tuple[float, float, float | None]:
    """(images/s of the second epoch, seconds of the first, seconds of the cache) for one fresh model
    trained one way (`config`)."""
    cfg = config(way, unfreeze)
    patch = contextlib.nullcontext()
    if way == "bfloat16 depthwise backward":  # the mode off, for this comparison only
        patch = mock.patch.object(capas.train.depthwise, "backward", lambda *args: contextlib.nullcontext())
    elif way == CACHED_ONEDNN:  # capas' kernel off, for this comparison only
        patch = mock.patch.object(capas.train.depthwise, "shift_pays", lambda *args: False)
    with patch:
        result = fit(build_model(spec, seed=0), splits.train, splits.val, preprocess_for(spec), cfg)
    first, second = result.history[:2]
    return second["images_per_s"], first["seconds"], (result.frozen_cache or {}).get("seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8, help="training batches of 128 per epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--unfreeze", type=int, default=4, help="rows fine-tuned in the second phase")
    parser.add_argument("--data", default=f"folder:{CIFAR}")
    parser.add_argument("--ways", nargs="+", choices=SHORT, default=list(SHORT), help="the ways to run")
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 140)
    ways = [SHORT[name] for name in args.ways]

    splits = make_splits(args.data, limit=round(args.batches * BATCH / 0.98), val_fraction=0.02)
    rows = len(build_model(spec_for("all"), seed=0, pretrained=False).backbone)
    phases = {
        TOP_PHASE: spec_for("all"),
        f"last {args.unfreeze} rows fine-tuned": spec_for(rows - args.unfreeze),
    }
    speeds: dict[tuple[str, str], list[float]] = {(p, w): [] for p in phases for w in ways}
    firsts: dict[tuple[str, str], list[float]] = {(p, w): [] for p in phases for w in ways}
    caches: dict[tuple[str, str], list[float]] = {(p, w): [] for p in phases for w in ways}
    for _ in range(args.repeats):
        for phase, spec in phases.items():
            for way in ways:
                unfreeze = args.unfreeze if phase == TOP_PHASE else None
                speed, first, cache = run(spec, splits, way, unfreeze)
                speeds[phase, way].append(speed)
                firsts[phase, way].append(first)
                once = "" if cache is None else f", cache {cache:.1f} s once"
                if cache is not None:
                    caches[phase, way].append(cache)
                console.print(
                    f"{phase} · {way}: {speed:.1f} images/s (first epoch {first:.1f} s{once})",
                    highlight=False,
                )

    table = Table(
        title=f"cifar10-transfer training step, bfloat16, batch {BATCH}, {len(splits.train)} images/epoch"
    )
    base = "eager" if "eager" in ways else ways[0]  # what the speed-ups divide by
    columns = (
        "phase",
        "way",
        "images/s (median)",
        "min–max",
        f"× {base}",
        "first epoch s (median)",
        "cache s, once",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("phase", "way") else "right")
    for phase in phases:
        eager = statistics.median(speeds[phase, base])
        for way in ways:
            values = speeds[phase, way]
            median = statistics.median(values)
            table.add_row(
                phase,
                way,
                f"{median:.1f}",
                f"{min(values):.1f}–{max(values):.1f}",
                f"{median / eager:.2f}",
                f"{statistics.median(firsts[phase, way]):.1f}",
                f"{statistics.median(caches[phase, way]):.1f}" if caches.get((phase, way)) else "",
            )
    console.print(table)
    console.print(f"{machine_line()}; median of {args.repeats} repeats", highlight=False)


if __name__ == "__main__":
    main()
