"""Statistics over seeds: mean with a 95% confidence interval (Student's t), and a paired comparison
with the base variant on the seeds both share (the seed fixes initialisation and batch order, and
the splits are the same, so pairing removes the between-seed spread from the difference)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 0.05
TEST_NAME = "paired t-test over shared seeds"


@dataclass(frozen=True)
class Estimate:
    """A mean and its confidence interval; the interval is NaN with fewer than two values."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """Mean ± t(n-1) · s / √n."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Estimate(mean, math.nan, math.nan, 1)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Estimate(mean, mean - half, mean + half, n)


@dataclass(frozen=True)
class Comparison:
    """variant − base over shared seeds: the mean difference with its CI, and the paired t-test's p."""

    difference: Estimate
    p_value: float
    test: str = TEST_NAME

    @property
    def significant(self) -> bool:
        return not math.isnan(self.p_value) and self.p_value < ALPHA


def paired_comparison(variant: dict[int, float], base: dict[int, float]) -> Comparison:
    """Compare per-seed values of a variant with the base's on the seeds both have (scipy's ttest_rel)."""
    seeds = sorted(set(variant) & set(base))
    diffs = np.array([variant[s] - base[s] for s in seeds], dtype=float)
    difference = mean_ci(diffs)
    if len(diffs) < 2:
        return Comparison(difference, math.nan)
    if np.ptp(diffs) == 0:
        # Every seed moved by exactly the same amount: ttest_rel divides by a zero spread.
        return Comparison(difference, 1.0 if diffs[0] == 0 else 0.0)
    p_value = float(stats.ttest_rel([variant[s] for s in seeds], [base[s] for s in seeds]).pvalue)
    return Comparison(difference, p_value)
