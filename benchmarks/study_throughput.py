"""Wall time of the global-pooling study (3 variants × 3 seeds, Fashion-MNIST, fixed epochs) run
sequentially with all torch threads against the local worker pool, side by side in one process.

    .venv/bin/python benchmarks/study_throughput.py            # the full study (several minutes)
    .venv/bin/python benchmarks/study_throughput.py --quick    # 1,500 images, 1 epoch, 2 seeds

Executors are taken from capas.study.executors.EXECUTORS: an executor registered there (e.g. "ray")
joins the comparison with `--executors sequential,pool,ray`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from capas.runs import environment
from capas.study.executors import EXECUTORS, available_cores
from capas.study.run import run_study

STUDY = Path(__file__).parent.parent / "examples" / "studies" / "global-pooling.yaml"


def study_file(folder: Path, quick: bool) -> Path:
    """The example study with fixed epochs (no early stopping), reduced with --quick."""
    document = yaml.safe_load(STUDY.read_text())
    document["base"]["train"].pop("early_stopping", None)
    if quick:
        document["base"]["train"]["epochs"] = 1
        document["base"]["data"]["limit"] = 1500
        document["seeds"] = 2
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a reduced study that proves the script works")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each executor; the table shows the median"
    )
    parser.add_argument("--workers", type=int, default=None, help="pool workers (default: one per core)")
    parser.add_argument("--executors", default="sequential,pool", help=f"from: {', '.join(EXECUTORS)}")
    args = parser.parse_args()
    console = Console()
    quiet = Console(quiet=True)
    names = args.executors.split(",")
    times: dict[str, list[float]] = {name: [] for name in names}
    accuracy: dict[str, float] = {}
    executors = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = study_file(Path(tmp), args.quick)
        runs = 0
        for repeat in range(args.repeats):
            for name in names:  # interleaved, so that a change in machine load hits every executor alike
                executor = EXECUTORS[name](args.workers)
                executors[name] = executor
                outcome = run_study(
                    path, out=Path(tmp) / f"{name}-{repeat}", executor=executor, console=quiet
                )
                times[name].append(outcome.seconds)
                runs = outcome.trained
                accuracy[name] = statistics.mean(
                    r.estimate("test_accuracy").mean for r in outcome.report.variants
                )
                console.print(f"{name} repeat {repeat + 1}: {outcome.seconds:.1f} s", highlight=False)
    env = environment()
    table = Table(
        title=f"study throughput: {STUDY.name}{' (--quick)' if args.quick else ''}, {runs} runs, "
        f"median of {args.repeats}",
        title_justify="left",
    )
    for column in ("executor", "workers × threads", "wall s", "runs/min", "speed-up", "mean test acc %"):
        table.add_column(column, justify="left" if column == "executor" else "right")
    reference = statistics.median(times[names[0]])
    for name in names:
        wall = statistics.median(times[name])
        executor = executors[name]
        threads = getattr(executor, "threads", env["cpu_count"])
        table.add_row(
            name,
            f"{executor.workers} × {threads}",
            f"{wall:.1f}",
            f"{60 * runs / wall:.2f}",
            f"{reference / wall:.2f}×",
            f"{100 * accuracy[name]:.2f}",
        )
    console.print(table)
    console.print(
        f"machine: {available_cores()} cores, {env['processor']}, torch {env['torch']}, "
        f"python {env['python']}, capas {env['capas']}",
        highlight=False,
    )


if __name__ == "__main__":
    main()
