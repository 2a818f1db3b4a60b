"""Time to accuracy on Fashion-MNIST: the fast recipe against Keras' mnist_cnn recipe, side by side.

The reference is capas running Keras' own recipe (examples/keras-mnist.yaml: 12 epochs of
Adadelta at 1.0, batch 128, float32); `benchmarks/keras_mnist_cnn.py` runs Keras itself where a
Keras backend is installed. The fast recipe is examples/recipes/fashion-mnist-fast.yaml with its
training config, over several seeds. Wall time runs from the spec to the test result: loading the
data, the whitening, every epoch with its validation, and the test with its test-time augmentation.
Accuracy is on the 10,000 test images. Runs are sequential, in one process.

    python benchmarks/fast_recipes.py [--seeds 3] [--reference-epochs 12] [--no-reference]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from capas.cpu import describe
from capas.runs import environment
from capas.spec import DataConfig, TrainConfig, load_document, load_spec
from capas.train import train

EXAMPLES = Path(__file__).parent.parent / "examples"
FAST_SPEC = EXAMPLES / "recipes" / "fashion-mnist-fast.yaml"
FAST_CONFIG = EXAMPLES / "recipes" / "fashion-mnist-fast.train.yaml"
KERAS_SPEC = EXAMPLES / "keras-mnist.yaml"
TARGET = 0.925  # the Fashion-MNIST target accuracy


def timed_run(spec: Path, data: DataConfig, cfg: TrainConfig, out: Path) -> dict:
    started = time.perf_counter()
    results = train(load_spec(spec), data, cfg, out)
    results = {**results, "wall": time.perf_counter() - started}
    # one line per run as it ends, so that an interrupted benchmark still shows what it measured
    print(
        f"{spec.stem} seed {cfg.seed}: test accuracy {100 * results['test_accuracy']:.2f}%, "
        f"wall {results['wall']:.1f} s, training {results['train_seconds']:.1f} s",
        flush=True,
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--reference-epochs", type=int, default=12)
    parser.add_argument("--no-reference", action="store_true", help="skip Keras' recipe")
    parser.add_argument("--epochs", type=int, default=None, help="override the fast recipe's epochs")
    args = parser.parse_args()

    document = load_document(FAST_CONFIG)
    fast_cfg = TrainConfig.model_validate(document["train"])
    if args.epochs:
        fast_cfg = fast_cfg.model_copy(update={"epochs": args.epochs})
    data = DataConfig.model_validate(document["data"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="capas-fast-") as tmp:
        # the fast recipe first: its figures come out even if the long reference is cut short
        for seed in range(args.seeds):
            cfg = fast_cfg.model_copy(update={"seed": seed})
            result = timed_run(FAST_SPEC, data, cfg, Path(tmp) / f"fast-{seed}")
            rows.append(("fast recipe", seed, result))
        if not args.no_reference:
            keras_cfg = TrainConfig(
                epochs=args.reference_epochs, batch_size=128, optimizer={"name": "adadelta", "lr": 1.0}
            )
            result = timed_run(KERAS_SPEC, data, keras_cfg, Path(tmp) / "keras")
            rows.append(("Keras' mnist_cnn recipe (capas)", 0, result))

    table = Table(title="Fashion-MNIST: test accuracy and wall time (spec to test result)")
    for column in ("recipe", "seed", "epochs", "test accuracy", "wall s", "training s", "train img/s"):
        table.add_column(column, justify="left" if column == "recipe" else "right")
    for name, seed, r in rows:
        table.add_row(
            name,
            str(seed),
            str(r["epochs_run"]),
            f"{100 * r['test_accuracy']:.2f}%",
            f"{r['wall']:.1f}",
            f"{r['train_seconds']:.1f}",
            f"{r['images_per_s']:,.0f}",
        )
    console = Console()
    console.print(table)
    fast = [r for name, _, r in rows if name == "fast recipe"]
    accuracy = [100 * r["test_accuracy"] for r in fast]
    wall = [r["wall"] for r in fast]
    spread = f"{min(accuracy):.2f}–{max(accuracy):.2f}"
    console.print(
        f"fast recipe over {len(fast)} seeds: test accuracy median {statistics.median(accuracy):.2f}% "
        f"(mean {statistics.mean(accuracy):.2f}%, min–max {spread}), "
        f"{sum(a >= 100 * TARGET for a in accuracy)}/{len(fast)} at or above {100 * TARGET:.1f}%; "
        f"wall time median {statistics.median(wall):.1f} s (min–max {min(wall):.1f}–{max(wall):.1f})",
        highlight=False,
    )
    if not args.no_reference:
        reference = rows[-1][2]["wall"]
        console.print(
            f"Keras' recipe in capas: {reference:.1f} s; the fast recipe takes "
            f"{statistics.median(wall) / reference:.3f} of it (target: at most 1/5 = 0.200 of Keras' own time)",
            highlight=False,
        )
    env = environment()
    console.print(
        f"machine: {env['processor']}, {env['cpu_count']} threads, torch {env['torch']}, "
        f"python {env['python']}; {describe(env['cpu_features'])}; cuda: {env['cuda']}; "
        f"interop threads {torch.get_num_interop_threads()}",
        highlight=False,
    )


if __name__ == "__main__":
    main()
