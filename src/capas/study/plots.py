"""The study report's plots (PNG bytes): learning curves, accuracy against parameters and time, and
per-class accuracy, each over the report's seeds."""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure  # no pyplot: no global figure state, and the Agg canvas by default
from matplotlib.ticker import MaxNLocator

from capas.study.report import StudyReport
from capas.study.stats import CONFIDENCE


def _colors(n: int) -> list:
    """n distinct colours: tab10's up to 10 variants; beyond, samples of a continuous map (tab10 repeated
    drew variant 11 in the base's colour, the legend unable to tell which points were which)."""
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    return [colormaps["turbo"](x) for x in np.linspace(0, 1, n)]


def _text(name: str) -> str:
    """A variant's or class's name as matplotlib draws it literally (text between two '$' is mathtext)."""
    return name.replace("$", r"\$")


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _curves(values: list[list[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean, min and max across seeds; runs that stopped early count where they have values, and
    a diverged run's non-finite values are left out (as the table leaves them out of its loss means)."""
    longest = max(len(v) for v in values)
    epochs, mean, low, high = [], [], [], []
    for e in range(longest):
        at = [v[e] for v in values if len(v) > e and math.isfinite(v[e])]
        epochs.append(e + 1)
        mean.append(np.mean(at) if at else math.nan)
        low.append(min(at, default=math.nan))
        high.append(max(at, default=math.nan))
    return np.array(epochs), np.array(mean), np.array(low), np.array(high)


def learning_curves(report: StudyReport) -> bytes:
    figure = Figure(figsize=(11, 4))
    axes = figure.subplots(1, 2)
    colors = _colors(len(report.variants))
    for result, color in zip(report.variants, colors, strict=True):
        if not result.results:
            continue
        histories = [r["history"] for r in result.results.values()]
        for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
            for prefix, style in (("", "--"), ("val_", "-")):
                epochs, mean, low, high = _curves([[m[prefix + metric] for m in h] for h in histories])
                label = f"{_text(result.name)} ({'validation' if prefix else 'training'})"
                ax.plot(epochs, mean, style, color=color, label=label)
                ax.fill_between(epochs, low, high, color=color, alpha=0.15 if prefix else 0.07, linewidth=0)
    for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].set_title("accuracy: mean over seeds, band min–max (dashed: training)")
    axes[1].set_title("loss")
    axes[1].legend(fontsize=7, loc="upper right")
    return _png(figure)


def accuracy_against(report: StudyReport, key: str, label: str, log: bool) -> bytes:
    figure = Figure(figsize=(6, 4))
    ax = figure.subplots()
    for result, color in zip(report.variants, _colors(len(report.variants)), strict=True):
        accuracy = result.estimate("test_accuracy")
        if accuracy.n == 0:
            continue
        x = result.summary.total if key == "params" else result.estimate(key).mean
        error = 0 if math.isnan(accuracy.half_width) else 100 * accuracy.half_width
        ax.errorbar(
            [x],
            [100 * accuracy.mean],
            yerr=[error],
            fmt="o",
            color=color,
            capsize=4,
            label=_text(result.name),
        )
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel(f"test accuracy % (mean, {CONFIDENCE:.0%} CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(figure)


def _mean_percent(accuracies: list[float | None]) -> float:
    """The mean in %, over the seeds whose test split held the class (None: none of its images); NaN, no
    bar, if none did."""
    held = [a for a in accuracies if a is not None]
    return float(np.mean(held)) * 100 if held else float("nan")


def per_class(report: StudyReport) -> bytes:
    done = [r for r in report.variants if r.results]
    classes = list(next(iter(done[0].results.values()))["per_class_accuracy"]) if done else []
    figure = Figure(figsize=(max(6, 0.9 * len(classes) + 2), 4))
    ax = figure.subplots()
    width = 0.8 / max(len(done), 1)
    for i, (result, color) in enumerate(zip(done, _colors(len(done)), strict=True)):
        means = [
            _mean_percent([r["per_class_accuracy"][c] for r in result.results.values()]) for c in classes
        ]
        ax.bar(
            np.arange(len(classes)) + i * width - 0.4 + width / 2,
            means,
            width,
            color=color,
            label=_text(result.name),
        )
    ax.set_xticks(np.arange(len(classes)), [_text(c) for c in classes], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy % (mean over seeds)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return _png(figure)


def plots(report: StudyReport) -> dict[str, tuple[str, bytes]]:
    """file name -> (caption, PNG bytes)."""
    return {
        "learning_curves.png": ("Learning curves per variant", learning_curves(report)),
        "accuracy_vs_params.png": (
            "Test accuracy against parameters",
            accuracy_against(report, "params", "parameters", True),
        ),
        "accuracy_vs_time.png": (
            "Test accuracy against training time",
            accuracy_against(report, "train_seconds", "training seconds per run (mean)", False),
        ),
        "per_class_accuracy.png": ("Per-class test accuracy", per_class(report)),
    }
