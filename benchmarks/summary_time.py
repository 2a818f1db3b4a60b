"""Wall time of `capas summary` on the example specs: a fresh `python -m capas summary` process each time.

What a user waits for, interpreter start and imports included. Each spec runs `--repeats` times
(after one untimed warm-up run that fills the OS file cache); the table shows the median and the
fastest run, and whether torch was imported (read from `python -X importtime`).

    python benchmarks/summary_time.py               # every seed spec, 7 repeats
    python benchmarks/summary_time.py --repeats 3   # quicker

Target (issue 11): at most 0.5 s for the seed specs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPECS = ("seed000-gap.yaml", "seed000-flatten.yaml", "keras-mnist.yaml")


def run_once(spec: Path, env: dict) -> float:
    """Seconds from starting the process to its exit."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "capas", "summary", str(spec)],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def imports_torch(spec: Path, env: dict) -> bool:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "capas", "summary", str(spec)],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # importtime lines read "import time: self | cumulative | <indent>module"
    return any(line.split("|")[-1].strip() == "torch" for line in result.stderr.splitlines())


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def machine() -> str:
    """The machine and the versions the timings depend on (the processor's name from /proc/cpuinfo)."""
    from capas.cpu import cpu_features, cpu_model, describe  # torch, in this process only

    return (
        f"machine: {cpu_model()} ({platform.machine()}), {os.cpu_count()} cores, {describe(cpu_features())}; "
        f"python {platform.python_version()}, torch {version('torch')}, pydantic {version('pydantic')}, "
        f"rich {version('rich')}, typer {version('typer')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "120"}
    print(machine())
    print(f"{'spec':<24} {'median s':>9} {'fastest s':>10} {'repeats':>8}  torch imported")
    for name in SPECS:
        spec = ROOT / "examples" / name
        run_once(spec, env)  # warm-up: file cache
        times = [run_once(spec, env) for _ in range(args.repeats)]
        print(
            f"{name:<24} {statistics.median(times):>9.3f} {min(times):>10.3f} {args.repeats:>8}  "
            f"{'yes' if imports_torch(spec, env) else 'no'}"
        )


if __name__ == "__main__":
    main()
