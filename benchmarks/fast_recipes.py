"""Time to accuracy of the fast recipes (examples/recipes/), over several seeds, against their targets.

Each recipe is a spec and a training config, run as `capas train` runs them, one seed after another
in this process. Wall time runs from the spec to the test result: loading the data, the whitening,
every epoch with its validation, the test with its test-time augmentation (the decoded-image cache
of an image folder is warm after the first run; the first run says how long it took cold). The
summary gives mean ± standard deviation and min–max over the seeds, as airbench reports them, and
how many seeds met the issue's accuracy target within its time budget.

Several recipes run one after another, each over its seeds; the Fashion-MNIST ones share one
reference. Fashion-MNIST's budget is a fifth of Keras' own mnist_cnn recipe's time to 92.5% on this machine:
`--keras-python PYTHON` runs benchmarks/keras_mnist_cnn.py with an interpreter that has
tensorflow-cpu (a separate environment, see the README) in the same run; without it, capas runs
Keras' recipe itself (examples/keras-mnist.yaml), which is not Keras' time and is labelled so;
with both `--keras-python` and `--capas-keras-recipe`, both sides train Keras' recipe in the same
run, and their epochs are compared (the same network, optimizer and batch size; Keras on all 60,000
training images with a test pass each epoch, capas on the recipe's training split with a validation
pass).

    python benchmarks/fast_recipes.py fashion-mnist [--seeds 3] [--keras-python .tfvenv/bin/python]
    python benchmarks/fast_recipes.py fashion-mnist fashion-mnist-lean --keras-python .tfvenv/bin/python
    .tfvenv/bin/python benchmarks/fast_recipes.py fashion-mnist --keras-python .tfvenv/bin/python --capas-keras-recipe
    python benchmarks/fast_recipes.py fashion-mnist-wide [--seeds 3]
    python benchmarks/fast_recipes.py cifar10 [--seeds 3]
    python benchmarks/fast_recipes.py cifar10-muon [--seeds 3]
    python benchmarks/fast_recipes.py cifar10-45min [--seeds 3]
    python benchmarks/fast_recipes.py cifar10-transfer [--seeds 3]
    python benchmarks/fast_recipes.py cifar10 --device cuda [--seeds 3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from capas.runs import machine_line
from capas.spec import DataConfig, TrainConfig, load_document, load_spec
from capas.train import train

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"


@dataclass(frozen=True)
class Recipe:
    spec: Path
    config: Path
    target: float  # test accuracy
    budget: float | None  # seconds of wall time; None: a fifth of Keras' time (Fashion-MNIST)


RECIPES = {
    "fashion-mnist": Recipe(
        EXAMPLES / "recipes/fashion-mnist-fast.yaml",
        EXAMPLES / "recipes/fashion-mnist-fast.train.yaml",
        0.925,
        None,
    ),
    "fashion-mnist-lean": Recipe(
        EXAMPLES / "recipes/fashion-mnist-lean.yaml",
        EXAMPLES / "recipes/fashion-mnist-lean.train.yaml",
        0.925,
        None,
    ),
    "fashion-mnist-wide": Recipe(
        EXAMPLES / "recipes/fashion-mnist-wide.yaml",
        EXAMPLES / "recipes/fashion-mnist-wide.train.yaml",
        0.95,
        900.0,
    ),
    "cifar10": Recipe(
        EXAMPLES / "recipes/cifar10-airbench.yaml",
        EXAMPLES / "recipes/cifar10-airbench.train.yaml",
        0.90,
        900.0,
    ),
    "cifar10-muon": Recipe(
        EXAMPLES / "recipes/cifar10-airbench.yaml",
        EXAMPLES / "recipes/cifar10-airbench-muon.train.yaml",
        0.90,
        900.0,
    ),
    "cifar10-45min": Recipe(
        EXAMPLES / "recipes/cifar10-airbench.yaml",
        EXAMPLES / "recipes/cifar10-airbench-45min.train.yaml",
        0.94,
        2700.0,
    ),
    "cifar10-transfer": Recipe(
        EXAMPLES / "recipes/cifar10-transfer.yaml",
        EXAMPLES / "recipes/cifar10-transfer.train.yaml",
        0.90,
        900.0,
    ),
}


def timed_run(label: str, spec: Path, data: DataConfig, cfg: TrainConfig, out: Path) -> dict:
    started = time.perf_counter()
    results = train(load_spec(spec), data, cfg, out)
    results = {**results, "wall": time.perf_counter() - started}
    # one line per run as it ends, so that an interrupted benchmark still shows what it measured
    print(
        f"{label} seed {cfg.seed}: test accuracy {100 * results['test_accuracy']:.2f}%, "
        f"wall {results['wall']:.1f} s, training {results['train_seconds']:.1f} s",
        flush=True,
    )
    return results


def keras_reference(python: str, epochs: int) -> tuple[str, float, list[float]] | None:
    """Keras' own recipe in another interpreter: its training time to 92.5% (or to the end of its last
    epoch, if never reached), and the seconds each epoch took (with its test pass); None, its error
    printed, if it fails (the recipes' figures, measured first, still come out)."""
    script = Path(__file__).parent / "keras_mnist_cnn.py"
    done = subprocess.run(
        [python, str(script), "--epochs", str(epochs), "--json"], capture_output=True, text=True
    )
    print(done.stdout, end="", flush=True)
    if done.returncode != 0:
        print(
            f"Keras' recipe failed (exit status {done.returncode}):\n{done.stderr}",
            file=sys.stderr,
            flush=True,
        )
        return None
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ends = [0.0] + [row["seconds"] for row in result["epochs"]]
    epoch_seconds = [b - a for a, b in itertools.pairwise(ends)]
    name = f"Keras {result['keras']} ({result['backend']})"
    if result["reached_seconds"] is not None:
        return f"{name}, time to 92.5%", result["reached_seconds"], epoch_seconds
    return f"{name}, 92.5% not reached: all {epochs} epochs", ends[-1], epoch_seconds


def run_seeds(name: str, args: argparse.Namespace, tmp: Path) -> tuple[DataConfig, list[dict]]:
    """The named recipe's training config (with the command line's overrides) and one run per seed."""
    recipe = RECIPES[name]
    document = load_document(recipe.config)
    cfg = TrainConfig.model_validate(document["train"])
    if args.epochs:
        cfg = cfg.model_copy(update={"epochs": args.epochs})
    if args.device:
        cfg = cfg.model_copy(update={"device": args.device})
    data = DataConfig.model_validate(document["data"])
    runs = [
        timed_run(name, recipe.spec, data, cfg.model_copy(update={"seed": seed}), tmp / f"{name}-{seed}")
        for seed in range(args.first_seed, args.first_seed + args.seeds)
    ]
    return data, runs


def report(
    console: Console, name: str, recipe: Recipe, runs: list[dict], first_seed: int, budget: float | None
) -> None:
    """The seeds' table and the summary line: mean ± sd, min–max, and how many met the target."""
    table = Table(title=f"{name}: test accuracy and wall time (spec to test result)")
    for column in ("seed", "epochs", "test accuracy", "wall s", "training s", "train img/s"):
        table.add_column(column, justify="right")
    for seed, r in enumerate(runs, start=first_seed):
        table.add_row(
            str(seed), str(r["epochs_run"]), f"{100 * r['test_accuracy']:.2f}%", f"{r['wall']:.1f}",
            f"{r['train_seconds']:.1f}", f"{r['images_per_s']:,.0f}",
        )  # fmt: skip
    console.print(table)
    accuracy = [100 * r["test_accuracy"] for r in runs]
    wall = [r["wall"] for r in runs]
    spread = f" ± {statistics.stdev(accuracy):.2f}" if len(accuracy) > 1 else ""  # one seed has no spread
    reached = [a >= 100 * recipe.target for a in accuracy]
    if budget is None:  # a fifth of Keras' time, without Keras' run: no seed's time can be judged
        verdict = (
            f"target {100 * recipe.target:.1f}% within a fifth of Keras' time: {100 * recipe.target:.1f}% "
            f"reached by {sum(reached)} of {len(runs)} seeds; the time not judged (no reference run)"
        )
    else:
        met = sum(r and w <= budget for r, w in zip(reached, wall, strict=True))
        verdict = (
            f"target {100 * recipe.target:.1f}% within {budget:.1f} s: met by {met} of {len(runs)} seeds"
        )
    console.print(
        f"{name} over {len(runs)} seeds: test accuracy {statistics.mean(accuracy):.2f}{spread}% "
        f"(min–max {min(accuracy):.2f}–{max(accuracy):.2f}); wall time median {statistics.median(wall):.1f} s "
        f"(min–max {min(wall):.1f}–{max(wall):.1f}); {verdict}",
        highlight=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipes", nargs="+", choices=sorted(RECIPES), metavar="RECIPE")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds first-seed … first-seed + seeds − 1 (to add seeds later)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="override the recipes' epochs")
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda", "mps"], default=None, help="override the recipes' device"
    )
    parser.add_argument(
        "--keras-python", default=None, help="fashion-mnist: an interpreter with tensorflow-cpu"
    )
    parser.add_argument(
        "--reference-epochs", type=int, default=12, help="fashion-mnist: Keras' recipe's epochs"
    )
    parser.add_argument("--no-reference", action="store_true", help="fashion-mnist: skip Keras' recipe")
    parser.add_argument(
        "--capas-keras-recipe",
        action="store_true",
        help="fashion-mnist, with --keras-python: capas trains Keras' recipe too, and the epochs are compared",
    )
    args = parser.parse_args()
    if args.keras_python and shutil.which(args.keras_python) is None:  # before the recipes' minutes
        parser.error(
            f"--keras-python: {args.keras_python} is not an executable (an interpreter with tensorflow)"
        )
    names = list(dict.fromkeys(args.recipes))

    console = Console()
    results = {}
    with tempfile.TemporaryDirectory(prefix="capas-fast-") as tmp:
        # the recipes first: their figures come out even if the long reference is cut short
        for name in names:
            results[name] = run_seeds(name, args, Path(tmp))
        reference, keras_epochs, capas_epochs = None, None, None
        relative = [name for name in names if RECIPES[name].budget is None]
        data = results[relative[0]][0] if relative else None
        if data is not None and not args.no_reference:
            if args.keras_python and (keras := keras_reference(args.keras_python, args.reference_epochs)):
                label, seconds, keras_epochs = keras
                reference = (label, seconds)
            if args.capas_keras_recipe or not args.keras_python:
                keras_cfg = TrainConfig(
                    epochs=args.reference_epochs, batch_size=128, optimizer={"name": "adadelta", "lr": 1.0}
                )
                out = Path(tmp) / "keras"
                result = timed_run("Keras' recipe", EXAMPLES / "keras-mnist.yaml", data, keras_cfg, out)
                capas_epochs = [
                    row["seconds"]
                    for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                ]
                if reference is None:
                    reference = ("Keras' recipe run by capas (not Keras' own time)", result["wall"])

    relative_budget = None
    if keras_epochs and capas_epochs:
        trained = round(60_000 * (1 - data.val_fraction))  # Fashion-MNIST's training images less validation
        keras_median, capas_median = statistics.median(keras_epochs), statistics.median(capas_epochs)
        pace = (trained / capas_median) / (60_000 / keras_median)
        console.print(
            f"Keras' recipe, median epoch: Keras {keras_median:.1f} s for 60,000 images with a 10,000-image test "
            f"pass ({min(keras_epochs):.1f}–{max(keras_epochs):.1f}); capas {capas_median:.1f} s for {trained:,} "
            f"with a {60_000 - trained:,}-image validation pass ({min(capas_epochs):.1f}–{max(capas_epochs):.1f}); "
            f"training images per second of epoch, capas ÷ Keras: {pace:.2f}×",
            highlight=False,
        )
    if reference is not None:
        label, seconds = reference
        relative_budget = seconds / 5
        console.print(
            f"reference: {label}: {seconds:.1f} s; budget a fifth: {relative_budget:.1f} s", highlight=False
        )
    for name in names:
        recipe = RECIPES[name]
        budget = relative_budget if recipe.budget is None else recipe.budget
        report(console, name, recipe, results[name][1], args.first_seed, budget)
    console.print(machine_line(), highlight=False)


if __name__ == "__main__":
    main()
