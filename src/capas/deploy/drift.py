"""Data drift: is a window of recent inputs drawn from the distribution the model was trained on?

The test compares the model's penultimate-layer embeddings of recent inputs with those of a
reference sample of validation images kept in the run directory (`reference.safetensors`), using
the maximum mean discrepancy (MMD, Gretton et al., JMLR 2012) with a Gaussian (RBF) kernel and a
permutation test:

- Why MMD on embeddings: an embedding has tens to hundreds of correlated dimensions. MMD with a
  characteristic kernel compares whole multivariate distributions (means, spreads and the
  dependence between dimensions) in one statistic, so it needs no multiple-testing correction
  and no choice of which dimensions matter. Per-dimension Kolmogorov–Smirnov tests with a
  Bonferroni correction over F dimensions lose power as F grows and miss changes that show only
  in the joint structure.
- Why a permutation test: the null distribution of the MMD estimate has no convenient closed form
  at these sample sizes; permuting the pooled sample gives a p-value that is valid for any sample
  size. The observed split counts as one of the permutations, p = (1 + #{perm >= observed}) /
  (1 + n_permutations), so p is never 0 and the test keeps its level (Phipson & Smyth 2010).
- Bandwidth: the median heuristic (the median pairwise squared distance of the pooled sample),
  after standardising each embedding dimension by the pooled sample's spread (a function of the
  pooled rows alone, which keeps the permutations exchangeable).

The per-image input statistics (mean and standard deviation of the preprocessed pixels) are
also tested, each with a two-sample KS test (Bonferroni over the two): cheap, and they say *what*
changed (brightness, contrast) when the embedding test flags drift. Only the MMD test decides the
alarm, so the false-alarm rate is the chosen alpha.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from capas.errors import CapasError
from capas.runs.reference import INPUT_STATS, Reference


@dataclass(frozen=True)
class DriftResult:
    """One test of a window of recent inputs against the reference."""

    statistic: float  # MMD² (biased estimate) between window and reference embeddings
    p_value: float  # permutation p-value, observed split included
    drift: bool  # p_value < alpha
    alpha: float
    window: int  # recent inputs tested
    reference: int  # reference images
    permutations: int
    bandwidth: float  # RBF kernel's squared length scale (median heuristic)
    input_stats: dict[
        str, dict[str, float]
    ]  # KS statistic and Bonferroni-corrected p-value per input statistic

    def to_dict(self) -> dict:
        return asdict(self)


class DriftDetector:
    """MMD permutation test of recent embeddings against a fixed reference (see the module docstring)."""

    def __init__(self, reference: Reference, *, alpha: float = 0.01, permutations: int = 500, seed: int = 0):
        if not 0 < alpha < 1:
            raise CapasError(f"drift alpha must lie in (0, 1), got {alpha}")
        if permutations < 1:
            raise CapasError(f"drift permutations must be at least 1, got {permutations}")
        self.reference = reference
        self.alpha = alpha
        self.permutations = permutations
        self.seed = seed
        self._reference = reference.embeddings.float()  # (N, F)

    def test(self, embeddings: torch.Tensor, input_stats: torch.Tensor) -> DriftResult:
        """Test a window: embeddings (M, F) and input statistics (M, 2) of recent inputs."""
        n, m = len(self._reference), len(embeddings)
        if m < 2:
            raise CapasError(f"a drift test needs at least 2 recent inputs, got {m}")
        if embeddings.shape[1] != self._reference.shape[1]:
            raise CapasError(
                f"recent embeddings have {embeddings.shape[1]} features, the reference {self._reference.shape[1]}"
            )
        # Standardised by the pooled sample's mean and spread, so that no dimension dominates the
        # distances just by its units; dimensions that never vary (dead ReLUs) keep their scale. Not
        # by the reference's: a scaling that depends on which rows are the reference makes them look
        # tighter than the window's, and the permutations no longer exchangeable (without drift,
        # 10 reference images flagged 8% of windows at alpha 0.01).
        pooled = torch.cat([self._reference, embeddings.float()])  # (N + M, F)
        std = pooled.std(0)
        pooled = (pooled - pooled.mean(0)) / torch.where(std > 1e-6, std, torch.ones_like(std))
        distances = torch.cdist(pooled, pooled).square()  # (N + M, N + M)
        off_diagonal = distances[~torch.eye(n + m, dtype=torch.bool)]
        bandwidth = float(off_diagonal.median().clamp_min(1e-12))
        kernel = torch.exp(-distances / bandwidth)
        # MMD² (biased) = w' K w with w = 1/n on reference rows and -1/m on window rows; a permutation
        # relabels the rows, so all permutations are one matrix product: (P + 1, N + M) @ (N + M, N + M).
        generator = torch.Generator().manual_seed(self.seed)
        labels = torch.cat([torch.full((n,), 1 / n), torch.full((m,), -1 / m)])
        order = torch.stack([torch.randperm(n + m, generator=generator) for _ in range(self.permutations)])
        weights = torch.cat([labels.unsqueeze(0), labels[order]])  # row 0: the observed split
        statistics = ((weights @ kernel) * weights).sum(1)
        observed = statistics[0]
        # in Python's float64: float32's 1/100 lies below 0.01, and p < alpha would flag p = alpha
        p_value = (1 + int((statistics[1:] >= observed).sum())) / (1 + self.permutations)
        return DriftResult(
            statistic=float(observed),
            p_value=p_value,
            drift=p_value < self.alpha,
            alpha=self.alpha,
            window=m,
            reference=n,
            permutations=self.permutations,
            bandwidth=bandwidth,
            input_stats=self._input_stat_tests(input_stats),
        )

    def _input_stat_tests(self, input_stats: torch.Tensor) -> dict[str, dict[str, float]]:
        from scipy.stats import ks_2samp

        tests = {}
        for column, name in enumerate(INPUT_STATS):
            result = ks_2samp(
                self.reference.input_stats[:, column].numpy(), input_stats[:, column].float().numpy()
            )
            tests[name] = {
                "statistic": float(result.statistic),
                "p_value": min(1.0, float(result.pvalue) * len(INPUT_STATS)),  # Bonferroni
            }
        return tests
