"""Statistics over seeds: mean with a 95% confidence interval (Student's t), a paired comparison with
the base variant on the seeds both share (the seed fixes initialisation and batch order, and the splits
are the same, so pairing removes the between-seed spread from the difference), Holm's adjustment for
several variants compared with one base, and the binomial standard error of a test accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 0.05
TEST_NAME = "paired t-test over shared seeds"
ADJUSTMENT = "Holm"
SPREAD_EPS = 1e-9  # a standard deviation below this (relative to the values) is float rounding


@dataclass(frozen=True)
class Estimate:
    """A mean and its confidence interval.

    The interval is NaN with fewer than two values, and when every value is the same: a spread of
    zero over a few seeds says the variance could not be estimated, not that it is zero.
    """

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def zero_variance(self) -> bool:
        return self.n >= 2 and math.isnan(self.low)


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """Mean ± t(n-1) · s / √n."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    spread = float(x.std(ddof=1)) if n >= 2 else 0.0
    # Equal differences computed from decimals leave a rounding spread (~1e-17), not a measured one:
    # ttest_rel would turn it into p ≈ 1e-16.
    if n < 2 or spread <= SPREAD_EPS * max(1.0, float(np.abs(x).max())) or not math.isfinite(spread):
        return Estimate(mean, math.nan, math.nan, n)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * spread / math.sqrt(n))
    return Estimate(mean, mean - half, mean + half, n)


@dataclass(frozen=True)
class Comparison:
    """variant − base over shared seeds: the mean difference with its CI, the paired t-test's p (NaN
    when it cannot be computed: fewer than two seeds, or every seed differs by the same amount), and
    the per-seed differences it rests on."""

    difference: Estimate
    p_value: float
    seeds: tuple[int, ...] = ()
    differences: tuple[float, ...] = ()
    test: str = TEST_NAME

    @property
    def zero_variance(self) -> bool:
        """Two or more seeds whose differences are all equal: no variance, no interval, no test."""
        return self.difference.zero_variance


def paired_comparison(variant: dict[int, float], base: dict[int, float]) -> Comparison:
    """Compare per-seed values of a variant with the base's on the seeds both have (scipy's ttest_rel)."""
    seeds = tuple(sorted(set(variant) & set(base)))
    diffs = tuple(float(variant[s] - base[s]) for s in seeds)
    difference = mean_ci(diffs)
    if len(diffs) < 2 or difference.zero_variance:
        # ttest_rel would divide by a zero spread and answer p = 0 (or NaN): neither is a finding.
        return Comparison(difference, math.nan, seeds, diffs)
    p_value = float(stats.ttest_rel([variant[s] for s in seeds], [base[s] for s in seeds]).pvalue)
    return Comparison(difference, p_value, seeds, diffs)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p-values tested together (NaN ones take no part and stay NaN).

    The k-th smallest of m p-values is multiplied by m − k + 1, made non-decreasing, and capped at 1:
    it keeps the chance of any false 'significant' among m variants at or below ALPHA.
    """
    tested = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m = len(tested)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for k, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - k) * p))
        adjusted[i] = running
    return adjusted


def binomial_se(accuracy: float, n: int) -> float:
    """Standard error of an accuracy measured on n independent test images: √(p(1−p)/n)."""
    return math.sqrt(accuracy * (1 - accuracy) / n) if n > 0 else math.nan
