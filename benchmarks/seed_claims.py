"""What the seed articles claim, measured: runs (or resumes, or just reads) the studies that test each
claim on Fashion-MNIST and on CIFAR-10, and prints the README's table with a verdict per claim.

    .venv/bin/python benchmarks/seed_claims.py                    # both datasets (about an hour on 2 cores)
    .venv/bin/python benchmarks/seed_claims.py --datasets fashion-mnist

Each study is an ordinary `capas study` into studies/<name>-<dataset>; the command each row prints
reproduces it (a finished study directory is reused, an interrupted one resumed). The verdict rule:
"confirmed" when the change moves test accuracy the way the article says and the Holm-adjusted p
(over the study's variants) is below 0.05, "refuted" when it moves it the other way with p < 0.05,
"no significant difference" otherwise; a claim of equal accuracy is refuted by a significant
difference either way. Comparisons between two variants (momentum vs plain gradient descent) use
the paired t-test over their shared seeds, unadjusted. A variant still improving at its epoch
ceiling is marked so beside its verdict: such an effect is not measured at convergence.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from capas.runs import machine_line
from capas.study.report import StudyReport, VariantResult
from capas.study.run import run_study
from capas.study.stats import Comparison, paired_comparison

ROOT = Path(__file__).resolve().parent.parent
CIFAR10 = "folder:../shared/datasets/cifar10-jpeg/train"
DATASETS = {
    # name: (--data, --input-shape for the claims study's 28×28×1 base, --seeds or None for the file's)
    "fashion-mnist": (None, None, None),
    # 3 fixed seeds: adaptive replication up to 5 would double CIFAR-10's hour on 2 cores
    "cifar10": (CIFAR10, "32,32,3", 3),
}
ALPHA = 0.05


@dataclass(frozen=True)
class Claim:
    seed: str  # which article(s)
    text: str  # the claim, as the article makes it
    study: str  # examples/studies/<study>.yaml
    variant: str
    against: str | None = None  # compare with this variant instead of the study's base
    direction: int = 1  # +1: the variant is more accurate than what it is compared with; -1 less; 0 equal
    parameters: bool = False  # the claim is about the parameter count (exact, no seeds needed)


CLAIMS = [
    Claim(
        "000, 001",
        "GlobalAveragePooling2D instead of Flatten reduces the parameters",
        "seed-claims",
        "GlobalAveragePooling2D",
        parameters=True,
    ),
    Claim(
        "000, 001",
        "… as an alternative to Flatten: accuracy kept",
        "seed-claims",
        "GlobalAveragePooling2D",
        direction=0,
    ),
    Claim(
        "000, 001",
        "GlobalMaxPooling2D instead of Flatten reduces the parameters",
        "seed-claims",
        "GlobalMaxPooling2D",
        parameters=True,
    ),
    Claim(
        "000, 001",
        "… as an alternative to Flatten: accuracy kept",
        "seed-claims",
        "GlobalMaxPooling2D",
        direction=0,
    ),
    Claim(
        "001, 004",
        "pooling reduces overfitting (removing it costs accuracy)",
        "seed-claims",
        "no-pooling",
        direction=-1,
    ),
    Claim(
        "001, 004",
        "max pooling, the usual choice, over average pooling",
        "seed-claims",
        "AveragePooling2D",
        direction=-1,
    ),
    Claim(
        "004",
        "pooling with another stride (3×3 windows, stride 2: overlapping) — no effect stated",
        "seed-claims",
        "MaxPooling2D-3-stride-2",
        direction=0,
    ),
    Claim(
        "002",
        "dropout reduces overfitting (removing it costs accuracy)",
        "seed-claims",
        "no-dropout",
        direction=-1,
    ),
    Claim(
        "002",
        "batch normalisation improves training and performance",
        "seed-claims",
        "BatchNormalization",
        direction=1,
    ),
    Claim(
        "002",
        "momentum improves gradient descent",
        "seed-claims",
        "sgd-momentum-0.9",
        against="sgd-0.01",
        direction=1,
    ),
    Claim("002", "Adam trains better than plain gradient descent", "seed-claims", "sgd-0.01", direction=-1),
    Claim(
        "002",
        "Adadelta (the Keras MNIST example's optimizer) against Adam — no effect stated",
        "seed-claims",
        "adadelta-1.0",
        direction=0,
    ),
    Claim(
        "003",
        "fine-tuning the whole backbone beats training only a new top on frozen layers",
        "frozen-layers",
        "none-frozen",
        direction=1,
    ),
    Claim(
        "003",
        "unfreezing only the last blocks (block 7 and the top) beats all frozen",
        "frozen-layers",
        "block7-unfrozen",
        direction=1,
    ),
]


def study_directory(study: str, dataset: str) -> Path:
    return ROOT / "studies" / f"{study}-{dataset}"


def command(study: str, dataset: str) -> str:
    data, shape, seeds = DATASETS[dataset]
    parts = [f"capas study examples/studies/{study}.yaml"]
    if data:
        parts.append(f"--data {data}")
    if shape and study == "seed-claims":
        parts.append(f"--input-shape {shape}")
    if seeds:
        parts.append(f"--seeds {seeds}")
    parts.append(f"--out studies/{study}-{dataset}")
    return " ".join(parts)


def run(study: str, dataset: str, console: Console) -> tuple[StudyReport, float, int]:
    data, shape, seeds = DATASETS[dataset]
    started = time.perf_counter()
    outcome = run_study(
        ROOT / "examples" / "studies" / f"{study}.yaml",
        out=study_directory(study, dataset),
        data=data,
        input_shape=[int(n) for n in shape.split(",")] if shape and study == "seed-claims" else None,
        seeds=seeds,
        console=console,
    )
    return outcome.report, time.perf_counter() - started, outcome.trained


def pp(value: float) -> str:
    return f"{100 * value:+.1f}".replace("-", "−")


def effect(comparison: Comparison) -> str:
    d = comparison.difference
    if comparison.zero_variance or not math.isfinite(d.low):
        return f"{pp(d.mean)} pp (no interval: {d.n} seeds)"
    return f"{pp(d.mean)} pp ({pp(d.low)} to {pp(d.high)})"


def verdict(claim: Claim, comparison: Comparison, p: float) -> str:
    if not math.isfinite(p) or p >= ALPHA:
        return "no significant difference"
    sign = 1 if comparison.difference.mean > 0 else -1
    if claim.direction == 0:
        return "refuted: " + ("more" if sign > 0 else "less") + " accurate"
    return "confirmed" if sign == claim.direction else "refuted"


def row(claim: Claim, report: StudyReport) -> tuple[str, str]:
    """(the measured effect, the verdict) of one claim on one study's report."""
    by_name: dict[str, VariantResult] = {r.name: r for r in report.variants}
    variant = by_name[claim.variant]
    other = by_name[claim.against] if claim.against else report.base
    if claim.parameters:
        before, after = other.summary.total, variant.summary.total
        return f"{before:,} → {after:,} parameters ({after / before - 1:+.1%})".replace("-", "−"), (
            "confirmed" if after < before else "refuted"
        )
    if claim.against:
        comparison = paired_comparison(variant.values("test_accuracy"), other.values("test_accuracy"))
        p, which = comparison.p_value, "p"
    else:
        comparison, p, which = variant.comparison, variant.p_adjusted, "Holm p"
    n = len(comparison.seeds)
    text = (
        f"{effect(comparison)}, {which} {p:.2g}, {n} seeds"
        if math.isfinite(p)
        else f"{effect(comparison)}, {n} seeds"
    )
    still = [r.name for r in (variant, other) if r.still_improving]
    result = verdict(claim, comparison, p)
    if still:
        result += f" (not converged: {', '.join(still)} still improving at the ceiling)"
    return text, result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", default=",".join(DATASETS), help="fashion-mnist,cifar10")
    args = parser.parse_args()
    datasets = [d for d in args.datasets.split(",") if d]
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown:
        parser.error(f"--datasets: unknown {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    console = Console(stderr=True)
    reports: dict[tuple[str, str], StudyReport] = {}
    for dataset in datasets:
        for study in dict.fromkeys(c.study for c in CLAIMS):
            report, seconds, trained = run(study, dataset, console)
            reports[study, dataset] = report
            base = report.base.estimate("test_accuracy")
            console.print(
                f"{study} on {dataset}: {trained} runs trained in {seconds:.0f} s; base test accuracy "
                f"{100 * base.mean:.2f}% ({report.test_size:,} test images)",
                highlight=False,
            )
    print(machine_line())
    print()
    print("| seed | claim | " + " | ".join(f"{d}: measured | {d}: verdict" for d in datasets) + " |")
    print("|---|---|" + "---|---|" * len(datasets))
    for claim in CLAIMS:
        cells = [c for d in datasets for c in row(claim, reports[claim.study, d])]
        print(f"| {claim.seed} | {claim.text} | " + " | ".join(cells) + " |")
    print()
    for dataset in datasets:
        for study in dict.fromkeys(c.study for c in CLAIMS):
            print(f"- {dataset}, {study}: `{command(study, dataset)}`")


if __name__ == "__main__":
    main()
