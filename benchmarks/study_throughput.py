"""Wall time of the global-pooling study (3 variants × 3 seeds, Fashion-MNIST, fixed epochs) run
sequentially with all torch threads, on the local worker pool and on a local Ray instance (one CPU
per run), side by side in one process. "start-up s" is the executor's creation (for Ray: starting
the instance), outside "wall s", which runs from reading the study file to writing the report.

    .venv/bin/python benchmarks/study_throughput.py            # the full study (several minutes)
    .venv/bin/python benchmarks/study_throughput.py --quick    # 1,500 images, 1 epoch, 2 seeds

Executors are taken from capas.study.executors.EXECUTORS (`--executors sequential,pool,ray`; Ray is
left out by default when the `ray` extra is not installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from capas.runs import machine_line
from capas.study.executors import EXECUTORS, available_cores
from capas.study.run import run_study

STUDY = Path(__file__).parent.parent / "examples" / "studies" / "global-pooling.yaml"


def study_file(folder: Path, quick: bool, threads: int) -> Path:
    """The example study's models at the fixed budget the table was measured with (3 epochs of 6,000
    images, float32, no early stopping: the example itself trains to convergence), reduced with --quick,
    and `threads` torch threads per run (studies fix train.threads, 1 by default: here, the executor's share)."""
    document = yaml.safe_load(STUDY.read_text())
    document["base"]["train"] = {
        "epochs": 3,
        "batch_size": 128,
        "optimizer": {"name": "adam", "lr": 0.001},
        "threads": threads,
    }
    document["base"]["data"] = {"name": "fashion-mnist", "limit": 6000, "test_limit": 1200}
    if quick:
        document["base"]["train"]["epochs"] = 1
        document["base"]["data"]["limit"] = 1500
        document["seeds"] = 2
    folder.mkdir(parents=True, exist_ok=True)
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
    default = "sequential,pool" + (",ray" if importlib.util.find_spec("ray") else "")
    parser.add_argument("--executors", default=default, help=f"from: {', '.join(EXECUTORS)}")
    args = parser.parse_args()
    console = Console()
    quiet = Console(quiet=True)
    names = args.executors.split(",")
    times: dict[str, list[float]] = {name: [] for name in names}
    startup: dict[str, list[float]] = {name: [] for name in names}
    accuracy: dict[str, float] = {}
    executors, threads = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = 0
        for repeat in range(args.repeats):
            for name in names:  # interleaved, so that a change in machine load hits every executor alike
                begun = time.perf_counter()
                executor = EXECUTORS[name](args.workers)
                startup[name].append(time.perf_counter() - begun)
                executors[name] = executor
                # sequential: all cores for its one run; a pool: cores / workers; Ray: --cpus-per-run
                threads[name] = getattr(executor, "threads", None) or available_cores() // executor.workers
                path = study_file(Path(tmp) / f"{name}-{repeat}-file", args.quick, threads[name])
                outcome = run_study(
                    path, out=Path(tmp) / f"{name}-{repeat}", executor=executor, console=quiet
                )
                times[name].append(outcome.seconds)
                runs = outcome.trained
                accuracy[name] = statistics.mean(
                    r.estimate("test_accuracy").mean for r in outcome.report.variants
                )
                console.print(f"{name} repeat {repeat + 1}: {outcome.seconds:.1f} s", highlight=False)
    table = Table(
        title=f"study throughput: {STUDY.name}{' (--quick)' if args.quick else ''}, {runs} runs, "
        f"median of {args.repeats}",
        title_justify="left",
    )
    columns = (
        "executor",
        "workers × threads",
        "start-up s",
        "wall s",
        "runs/min",
        "speed-up",
        "mean test acc %",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "executor" else "right")
    reference = statistics.median(times[names[0]])
    for name in names:
        wall = statistics.median(times[name])
        executor = executors[name]
        table.add_row(
            name,
            f"{executor.workers} × {threads[name]}",
            f"{statistics.median(startup[name]):.1f}",
            f"{wall:.1f}",
            f"{60 * runs / wall:.2f}",
            f"{reference / wall:.2f}×",
            f"{100 * accuracy[name]:.2f}",
        )
    console.print(table)
    if "ray" in names and "pool" in names:
        pool, ray = statistics.median(times["pool"]), statistics.median(times["ray"])
        console.print(
            f"Ray against the local pool: {ray - pool:+.1f} s wall ({(ray - pool) / runs:+.2f} s per run), "
            f"plus {statistics.median(startup['ray']):.1f} s to start the Ray instance",
            highlight=False,
        )
    console.print(f"{machine_line()}; {available_cores()} cores available to capas", highlight=False)


if __name__ == "__main__":
    main()
