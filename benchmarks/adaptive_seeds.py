"""How far adaptive seeds bend a study's 95% intervals and p-values: capas' own stopping rule
(`Replication.decide`) and comparison (`paired_comparison`) on simulated studies.

Each simulated variant has no effect: its per-seed difference from the base is drawn from a normal
distribution of mean 0 and spread σ pp; seeds are added one at a time from `min` until the rule
stops, then the interval and p are computed as the report computes them. With a fixed seed count the
interval covers 0 in 95% of studies and the variant is found significant in 5% (with no effect, one
is 100% less the other); stopping once the interval is narrow picks a small spread, so they do less
well.

    python benchmarks/adaptive_seeds.py                       # 3 to 5 seeds, target ±1 pp
    python benchmarks/adaptive_seeds.py --min 2 --max 5 --studies 50000
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from capas.study.spec import Replication
from capas.study.stats import ALPHA, paired_comparison

BASE = 0.9  # the base's accuracy on every seed: the comparison sees only the differences


def simulate(
    replication: Replication, sigma_pp: float, effect_pp: float, studies: int, seed: int = 0
) -> dict:
    """Coverage of the true difference by the reported interval, share of studies found significant
    (p < ALPHA), and how many seeds the studies stopped at."""
    rng = np.random.default_rng(seed)
    covered = significant = 0
    stopped_at = np.zeros(replication.max + 1, dtype=int)
    for draws in rng.normal(effect_pp, sigma_pp, size=(studies, replication.max)):
        base: dict[int, float] = {}
        variant: dict[int, float] = {}
        for n in range(1, replication.max + 1):
            base[n - 1], variant[n - 1] = BASE, BASE + draws[n - 1] / 100
            if n >= replication.min and replication.decide(variant, base, n) is not None:
                break
        comparison = paired_comparison(variant, base)
        difference = comparison.difference
        covered += abs(100 * difference.mean - effect_pp) <= 100 * difference.half_width
        significant += comparison.p_value < ALPHA
        stopped_at[len(variant)] += 1
    return {
        "coverage": covered / studies,
        "significant": significant / studies,
        "seeds": {n: stopped_at[n] / studies for n in range(replication.min, replication.max + 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min", type=int, default=3)
    parser.add_argument("--max", type=int, default=5)
    parser.add_argument("--target", type=float, default=1.0, help="the interval's half-width to stop at, pp")
    parser.add_argument("--sigmas", default="0.5,1,1.5,2,3", help="the per-seed differences' spreads, pp")
    parser.add_argument("--studies", type=int, default=5000, help="simulated studies per spread")
    args = parser.parse_args()
    adaptive = Replication(args.min, args.max, args.target)
    fixed = Replication(args.min, args.min, 0.0)  # never narrow enough: always `min` seeds
    print(f"python {platform.python_version()}, numpy {np.__version__}; {args.studies:,} studies per row")
    print(f"{'rule':<28} {'σ pp':>5} {'coverage':>9} {'found significant (no effect)':>30}  seeds stopped at")
    for sigma in (float(s) for s in args.sigmas.split(",")):
        for name, rule in (
            (f"adaptive {args.min}–{args.max}, ±{args.target:g} pp", adaptive),
            (f"fixed {args.min}", fixed),
        ):
            started = time.perf_counter()
            covered = simulate(rule, sigma, 0.0, args.studies)
            shares = ", ".join(f"{n}: {share:.0%}" for n, share in covered["seeds"].items())
            print(
                f"{name:<28} {sigma:>5g} {covered['coverage']:>9.1%} {covered['significant']:>30.1%}  {shares}"
                f"  ({time.perf_counter() - started:.0f} s)"
            )


if __name__ == "__main__":
    main()
