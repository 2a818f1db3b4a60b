"""Compression targets, measured: int8 ≥3.5× smaller with ≤0.5 pp accuracy loss; 50% structured pruning plus
fine-tuning ≥1.6× faster at batch 1 with ≤1 pp loss. On the seed-000 model (GlobalAveragePooling2D, at 28×28×1)
and the Keras MNIST example, both trained on Fashion-MNIST.

    python benchmarks/compress.py            # 20,000 training images, 3 epochs, 2 fine-tuning epochs
    python benchmarks/compress.py --quick    # 2,000 images, 1 epoch, 1 fine-tuning epoch, fewer repeats

Each compressed model is timed side by side with its original in one process (models take turns per
repeat); the table gives medians over the repeats, with the machine and versions printed below it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from capas.deploy.compress import compress_run
from capas.deploy.measure import Repeats, vnni
from capas.runs import environment
from capas.spec import DataConfig, ModelSpec, TrainConfig, load_spec
from capas.train import train

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TARGETS = {"quantize-int8": (3.5, "size", 0.5), "prune-structured": (1.6, "batch 1 speed", 1.0)}


def models() -> dict[str, tuple[ModelSpec, dict]]:
    """The two seed models at 28×28×1, each with the optimizer its article uses."""
    gap = load_spec(EXAMPLES / "seed000-gap.yaml").to_dict()
    gap.update(name="seed000-gap-28", input_shape=[28, 28, 1])
    return {
        "seed000-gap": (
            ModelSpec.from_dict(gap),
            {"optimizer": {"name": "adam", "lr": 1e-3}, "batch_size": 128},
        ),
        "keras-mnist": (
            load_spec(EXAMPLES / "keras-mnist.yaml"),
            {"optimizer": {"name": "adadelta", "lr": 1.0}, "batch_size": 128},
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced size: a check that the benchmark runs")
    parser.add_argument(
        "--threads", type=int, help="CPU threads for PyTorch and ONNX Runtime (default: PyTorch's)"
    )
    parser.add_argument(
        "--work", type=Path, help="where the run directories go (default: a temporary folder)"
    )
    args = parser.parse_args()
    if args.threads:
        # One thread count for both runtimes; on a loaded machine, 1 avoids OpenMP barrier stalls that
        # dwarf the models' own cost.
        torch.set_num_threads(args.threads)
    limit, epochs, finetune = (2000, 1, 1) if args.quick else (20000, 3, 2)
    repeats = Repeats(batch1=50, batch64=10) if args.quick else Repeats(batch1=300, batch64=40)
    console = Console()
    work = args.work or Path(tempfile.mkdtemp(prefix="capas-compress-bench-"))
    summary = Table(
        "model", "method", "size", "batch 1 speed-up", "batch 64 speed-up", "Δ accuracy", "target", "met"
    )
    results = []
    for name, (spec, train_raw) in models().items():
        run = work / name
        console.print(f"training {name} on {limit} Fashion-MNIST images for {epochs} epoch(s)…")
        train(
            spec,
            DataConfig(name="fashion-mnist", limit=limit),
            TrainConfig(epochs=epochs, device="cpu", **train_raw),
            run,
        )
        for method, kwargs in (("quantize-int8", {"quantize": "int8"}), ("prune-structured", {"prune": 0.5})):
            out, comparison = compress_run(
                run, out=work / f"{name}-{method}", finetune_epochs=finetune, repeats=repeats, **kwargs
            )
            table = Table(*comparison.header(), title=f"{name}: {method}", title_justify="left")
            for row in comparison.rows():
                table.add_row(*row)
            console.print(table)
            for line in comparison.notes + [f"warning: {w}" for w in comparison.warnings]:
                console.print(f"  {line}", highlight=False)
            first, last = comparison.measurements[0], comparison.measurements[-1]
            size, speed1 = first.bytes / last.bytes, first.batch1_ms[0] / last.batch1_ms[0]
            speed64, delta = first.batch64_ms[0] / last.batch64_ms[0], (last.accuracy - first.accuracy) * 100
            bound, what, loss = TARGETS[method]
            reached = (size if what == "size" else speed1) >= bound and delta >= -loss
            summary.add_row(
                name,
                method,
                f"{size:.2f}×",
                f"{speed1:.2f}×",
                f"{speed64:.2f}×",
                f"{delta:+.2f} pp",
                f"{what} ≥{bound}×, loss ≤{loss} pp",
                "yes" if reached else "no",
            )
            results.append(
                {
                    "model": name,
                    "method": method,
                    "size": size,
                    "speedup_batch1": speed1,
                    "speedup_batch64": speed64,
                    "delta_pp": delta,
                    "met": reached,
                    "run": str(out),
                }
            )
    console.print(summary)
    env = {
        **environment(),
        "vnni": vnni(),
        "limit": limit,
        "epochs": epochs,
        "finetune_epochs": finetune,
        "repeats": vars(repeats),
    }
    console.print(json.dumps(env), highlight=False, soft_wrap=True)
    (work / "compress-benchmark.json").write_text(
        json.dumps({"results": results, "environment": env}, indent=2)
    )
    console.print(f"run directories and compress-benchmark.json in {work}", highlight=False)


if __name__ == "__main__":
    main()
