"""The study report: a table (markdown, HTML, terminal), one plain sentence per variant, plots and
architecture diffs, all computed from the run store so that a resumed study reports the same figures."""

from __future__ import annotations

import base64
import html
import io
import math
from collections import Counter
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure  # no pyplot: no global figure state, and the Agg canvas by default
from matplotlib.ticker import MaxNLocator
from rich.table import Table

from capas import atomic
from capas.layers import Layer, Shape
from capas.models import summarize
from capas.models.summary import Summary
from capas.runs import environment
from capas.spec import LayerInfo
from capas.study.spec import Study, Variant, flat_items
from capas.study.stats import CONFIDENCE, TEST_NAME, Comparison, Estimate, mean_ci, paired_comparison
from capas.study.store import RunRow

MINUS = "\N{MINUS SIGN}"


@dataclass(frozen=True)
class VariantResult:
    """A variant with its finished runs (seed -> the run's result dict)."""

    variant: Variant
    summary: Summary
    results: dict[int, dict]

    @property
    def name(self) -> str:
        return self.variant.name

    def values(self, key: str) -> dict[int, float]:
        return {seed: float(r[key]) for seed, r in self.results.items() if r.get(key) is not None}

    def estimate(self, key: str) -> Estimate:
        return mean_ci(list(self.values(key).values()))

    @property
    def stopped_early(self) -> str:
        """'0', or how many runs stopped before their last epoch and why (early stopping, a budget)."""
        reasons = Counter(r["stopped"] for r in self.results.values() if r["stopped"] != "completed")
        return ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())) or "0"


@dataclass(frozen=True)
class DiffRow:
    """One layer that differs between the base and a variant (before or after is None when absent)."""

    change: str  # replaced, keywords, inserted, removed, input changed, frozen, unfrozen
    before: LayerInfo | None
    after: LayerInfo | None


@dataclass(frozen=True)
class StudyReport:
    study: Study
    variants: list[VariantResult]
    statuses: dict[str, int]  # runs per status

    @property
    def base(self) -> VariantResult:
        return self.variants[0]

    def comparison(self, result: VariantResult, key: str = "test_accuracy") -> Comparison:
        return paired_comparison(result.values(key), self.base.values(key))


def collect(study: Study, rows: dict[str, RunRow]) -> StudyReport:
    """The report's data: every variant of the study file with the finished runs of its seeds."""
    by_variant: dict[str, dict[int, dict]] = {}
    statuses: dict[str, int] = {}
    names = {v.name for v in study.variants}
    for row in rows.values():
        if row.variant not in names or row.seed not in study.seeds:
            continue  # runs of variants or seeds the study file no longer has
        statuses[row.status] = statuses.get(row.status, 0) + 1
        if row.status == "done":
            by_variant.setdefault(row.variant, {})[row.seed] = row.result
    variants = [VariantResult(v, summarize(v.model_spec), by_variant.get(v.name, {})) for v in study.variants]
    return StudyReport(study, variants, statuses)


# --- numbers as text ---------------------------------------------------------------------------


def _signed(value: float, digits: int = 1) -> str:
    value = round(value, digits)
    if value == 0:  # a change that rounds to nothing has no sign (and never shows "−0")
        return f"±{0:.{digits}f}"
    return f"{value:+.{digits}f}".replace("-", MINUS)


def _num(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}".replace("-", MINUS)


def _p(value: float) -> str:
    if math.isnan(value):
        return "—"
    return "p < 0.001" if value < 0.001 else f"p = {value:.2g}"


def _mean_pm(estimate: Estimate, scale: float = 1.0, digits: int = 2) -> str:
    if estimate.n == 0:
        return "—"
    if math.isnan(estimate.half_width):
        return f"{estimate.mean * scale:.{digits}f}"
    return f"{estimate.mean * scale:.{digits}f} ± {estimate.half_width * scale:.{digits}f}"


def _difference(comparison: Comparison) -> str:
    d = comparison.difference
    if d.n == 0:
        return "—"
    if math.isnan(d.low):
        return f"{_signed(100 * d.mean)}"
    return f"{_signed(100 * d.mean)} ({_num(100 * d.low)} to {_num(100 * d.high)})"


HEADERS = (
    "variant",
    "params",
    "mult-adds",
    "val acc %",
    "val loss",
    "test acc %",
    "test loss",
    "best epoch",
    "train s",
    "img/s",
    "Δ test acc pp (95% CI)",
    "p",
    "seeds",
    "stopped early",
)


def table_rows(report: StudyReport) -> list[list[str]]:
    """One row per variant; accuracy and loss as mean ± the 95% CI's half-width over seeds."""
    rows = []
    for result in report.variants:
        is_base = result is report.base
        comparison = report.comparison(result)
        rows.append(
            [
                result.name + (" (base)" if is_base else ""),
                f"{result.summary.total:,}",
                f"{result.summary.macs:,}",
                _mean_pm(result.estimate("val_accuracy"), 100),
                _mean_pm(result.estimate("val_loss"), 1, 4),
                _mean_pm(result.estimate("test_accuracy"), 100),
                _mean_pm(result.estimate("test_loss"), 1, 4),
                _mean_pm(result.estimate("best_epoch"), 1, 1),
                _mean_pm(result.estimate("train_seconds"), 1, 1),
                _mean_pm(result.estimate("images_per_s"), 1, 0),
                "" if is_base else _difference(comparison),
                "" if is_base else _p(comparison.p_value),
                str(len(result.results)),
                result.stopped_early,
            ]
        )
    return rows


def sentence(report: StudyReport, result: VariantResult) -> str:
    """'X instead of BASE: N fewer parameters (−74%); test accuracy −1.2 pp (95% CI …, p = …); …'"""
    base = report.base
    parts = []
    delta = result.summary.total - base.summary.total
    if delta == 0:
        parts.append(f"the same number of parameters ({result.summary.total:,})")
    else:
        share = 100 * delta / base.summary.total
        parts.append(f"{abs(delta):,} {'fewer' if delta < 0 else 'more'} parameters ({_signed(share, 0)}%)")
    if result.summary.trainable - base.summary.trainable != delta:  # frozen layers changed too
        parts.append(f"{result.summary.trainable:,} trainable instead of {base.summary.trainable:,}")
    comparison = report.comparison(result)
    d = comparison.difference
    if d.n == 0:
        parts.append("no seed finished for both, nothing to compare yet")
    elif d.n == 1:
        parts.append(
            f"test accuracy {_signed(100 * d.mean)} pp (one shared seed: no confidence interval or test)"
        )
    else:
        detail = f"95% CI {_num(100 * d.low)} to {_num(100 * d.high)}, {_p(comparison.p_value)}"
        if comparison.significant:
            parts.append(f"test accuracy {_signed(100 * d.mean)} pp ({detail})")
        else:
            parts.append(f"no significant difference in test accuracy ({_signed(100 * d.mean)} pp, {detail})")
        base_time, time = base.estimate("train_seconds").mean, result.estimate("train_seconds").mean
        if base_time > 0:
            parts.append(f"training time {_signed(100 * (time - base_time) / base_time, 0)}%")
    return f"{result.name} instead of {base.name}: " + "; ".join(parts) + "."


# --- architecture diff -------------------------------------------------------------------------


def param_formula(layer: Layer, shape: Shape, trainable: int, non_trainable: int) -> str:
    """The parameter count with the formula that gives it, as the seed articles explain them."""
    kind, total = layer.type_name(), trainable + non_trainable
    bias = getattr(layer, "use_bias", False)
    if kind == "Conv2D":
        kh, kw = layer.kernel_size
        return (
            f"{kh}·{kw}·{shape[2]}·{layer.filters}"
            + (f" + {layer.filters}" if bias else "")
            + f" = {total:,}"
        )
    if kind == "Dense":
        return f"{shape[0]}·{layer.units}" + (f" + {layer.units}" if bias else "") + f" = {total:,}"
    if kind == "BatchNormalization":
        return f"4·{shape[-1]} = {total:,} ({non_trainable:,} not trainable)"
    if kind in ("LayerNormalization", "GroupNormalization"):
        return f"2·{shape[-1]} = {total:,}"
    return f"{total:,}"


def _describe(info: LayerInfo) -> str:
    # a backbone block's only keyword repeats its type: leave it out
    keywords = {k: v for k, v in info.layer.keywords().items() if k != "name" and v != info.layer.type_name()}
    args = ", ".join(f"{k}={v}" for k, v in keywords.items())
    return f"{info.name} ({info.layer.type_name()}{' ' + args if args else ''})"


def architecture_diff(base: VariantResult, result: VariantResult) -> list[DiffRow]:
    """The layers that differ, in the variant's order, with removed base layers where they stood.

    A backbone's rows come first and are compared row by row (a variant may freeze more or fewer
    of them); the spec's own layers are matched through the variant's origins.
    """
    own = len(result.variant.origins)
    before_backbone, before = (
        base.summary.rows[: -len(base.variant.origins)],
        base.summary.rows[-len(base.variant.origins) :],
    )
    after_backbone, after = result.summary.rows[:-own], result.summary.rows[-own:]
    rows = []
    for old, info in zip_longest(before_backbone, after_backbone):
        if old is None or info is None or old.name != info.name:
            rows.append(
                DiffRow(
                    "replaced" if old and info else ("removed" if info is None else "inserted"), old, info
                )
            )
        elif old.frozen != info.frozen:
            rows.append(DiffRow("unfrozen" if old.frozen else "frozen", old, info))
    present = {origin for origin in result.variant.origins if origin is not None}
    next_base = 0
    for info, origin in zip(after, result.variant.origins, strict=True):
        if origin is not None:
            rows += [
                DiffRow("removed", before[i], None) for i in range(next_base, origin) if i not in present
            ]
            next_base = max(next_base, origin + 1)
            old = before[origin]
            if old.layer.type_name() != info.layer.type_name():
                rows.append(DiffRow("replaced", old, info))
            elif old.layer != info.layer:
                rows.append(DiffRow("keywords", old, info))
            elif (old.output_shape, old.trainable, old.non_trainable) != (
                info.output_shape,
                info.trainable,
                info.non_trainable,
            ):
                rows.append(DiffRow("input changed", old, info))
        else:
            rows.append(DiffRow("inserted", None, info))
    rows += [DiffRow("removed", before[i], None) for i in range(next_base, len(before)) if i not in present]
    return rows


def _diff_cells(row: DiffRow) -> list[str]:
    cells = [row.change]
    for info in (row.before, row.after):
        if info is None:
            cells += ["—", "—", "—"]
        else:
            cells += [
                _describe(info),
                str(tuple(info.output_shape)),
                param_formula(info.layer, info.input_shape, info.trainable, info.non_trainable),
            ]
    return cells


DIFF_HEADERS = (
    "change",
    "base layer",
    "output",
    "params (formula)",
    "variant layer",
    "output",
    "params (formula)",
)


def setting_changes(base: Variant, variant: Variant) -> list[str]:
    """Training and spec-level settings that differ, as 'key: before → after'."""
    lines = []
    for section, old, new in (
        ("train", base.train, variant.train),
        (
            "spec",
            {k: v for k, v in base.spec.items() if k != "layers"},
            {k: v for k, v in variant.spec.items() if k != "layers"},
        ),
        ("extras", base.extras, variant.extras),
    ):
        old_flat, new_flat = flat_items(old), flat_items(new)
        for key in sorted(set(old_flat) | set(new_flat)):
            if old_flat.get(key) != new_flat.get(key):
                lines.append(f"{section}.{key}: {old_flat.get(key)!r} → {new_flat.get(key)!r}")
    return lines


# --- plots -------------------------------------------------------------------------------------


def _colors(n: int) -> list:
    return [colormaps["tab10"](i % 10) for i in range(n)]


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _curves(values: list[list[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean, min and max across seeds; runs that stopped early count where they have values."""
    longest = max(len(v) for v in values)
    epochs, mean, low, high = [], [], [], []
    for e in range(longest):
        at = [v[e] for v in values if len(v) > e]
        epochs.append(e + 1)
        mean.append(np.mean(at))
        low.append(np.min(at))
        high.append(np.max(at))
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
                label = f"{result.name} ({'validation' if prefix else 'training'})"
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
            [x], [100 * accuracy.mean], yerr=[error], fmt="o", color=color, capsize=4, label=result.name
        )
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel(f"test accuracy % (mean, {CONFIDENCE:.0%} CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(figure)


def per_class(report: StudyReport) -> bytes:
    done = [r for r in report.variants if r.results]
    classes = list(next(iter(done[0].results.values()))["per_class_accuracy"]) if done else []
    figure = Figure(figsize=(max(6, 0.9 * len(classes) + 2), 4))
    ax = figure.subplots()
    width = 0.8 / max(len(done), 1)
    for i, (result, color) in enumerate(zip(done, _colors(len(done)), strict=True)):
        means = [
            np.mean([r["per_class_accuracy"][c] for r in result.results.values()]) * 100 for c in classes
        ]
        ax.bar(
            np.arange(len(classes)) + i * width - 0.4 + width / 2,
            means,
            width,
            color=color,
            label=result.name,
        )
    ax.set_xticks(np.arange(len(classes)), classes, rotation=30, ha="right", fontsize=8)
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


# --- documents ---------------------------------------------------------------------------------


def _header_lines(report: StudyReport) -> list[str]:
    study, base = report.study, report.base.variant
    env = environment()
    statuses = ", ".join(f"{n} {status}" for status, n in sorted(report.statuses.items()))
    return [
        f"Study file: {study.source}; design: {study.design}; seeds: {', '.join(map(str, study.seeds))}",
        f"Data: {base.data['name']} (limit {base.data['limit']}, split seed {base.data['split_seed']}, the same splits for every run)",
        f"Training (base): {base.train['epochs']} epochs, batch {base.train['batch_size']}, "
        f"{base.train['optimizer']['name']} lr {base.train['optimizer']['lr'] or 'default'}",
        f"Runs: {statuses}",
        f"Accuracy and loss: mean ± half-width of the {CONFIDENCE:.0%} confidence interval over seeds (Student's t); "
        f"differences against the base: {TEST_NAME} (scipy.stats.ttest_rel)",
        f"Machine: {env['processor']}, {env['cpu_count']} threads, torch {env['torch']}, capas {env['capas']}, "
        f"python {env['python']}" + (f", {env['cuda']}" if env["cuda"] else ""),
    ]


def _md_table(headers: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    def clean(cell: str) -> str:
        return cell.replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- compression variants --------------------------------------------------------------------

COMPRESSION_HEADERS = (
    "variant",
    "method",
    "float test acc %",
    "compressed test acc %",
    "Δ pp (95% CI)",
    "p",
    "smaller",
    "batch-1 faster",
    "batch-64 faster",
)


def _compressed(result: VariantResult) -> dict[int, dict]:
    return {seed: r["compress"] for seed, r in result.results.items() if r.get("compress")}


def compression_rows(report: StudyReport) -> list[list[str]]:
    """Each compressed variant against its own float models, seed by seed (same paired test)."""
    rows = []
    for result in report.variants:
        compressed = _compressed(result)
        if not compressed:
            continue
        after = {seed: c["test_accuracy"] for seed, c in compressed.items()}
        comparison = paired_comparison(after, result.values("test_accuracy"))
        ratio = mean_ci([c["size_ratio"] for c in compressed.values()])
        fast1 = mean_ci([c["speedup_batch1"] for c in compressed.values()])
        fast64 = mean_ci([c["speedup_batch64"] for c in compressed.values()])
        rows.append(
            [
                result.name,
                next(iter(compressed.values()))["method"],
                _mean_pm(result.estimate("test_accuracy"), 100),
                _mean_pm(mean_ci(list(after.values())), 100),
                _difference(comparison),
                _p(comparison.p_value),
                f"{ratio.mean:.2f}×",
                f"{fast1.mean:.2f}×",
                f"{fast64.mean:.2f}×",
            ]
        )
    return rows


def compression_sentence(result: VariantResult) -> str:
    compressed = _compressed(result)
    after = {seed: c["test_accuracy"] for seed, c in compressed.items()}
    comparison = paired_comparison(after, result.values("test_accuracy"))
    d = comparison.difference
    ratio = mean_ci([c["size_ratio"] for c in compressed.values()]).mean
    fast1 = mean_ci([c["speedup_batch1"] for c in compressed.values()]).mean
    speed = f"{fast1:.2f}× faster" if fast1 >= 1 else f"{1 / fast1:.2f}× slower"
    if d.n < 2:
        accuracy = f"test accuracy {_signed(100 * d.mean)} pp (one seed: no confidence interval or test)"
    elif comparison.significant:
        accuracy = f"test accuracy {_signed(100 * d.mean)} pp (95% CI {_num(100 * d.low)} to {_num(100 * d.high)}, {_p(comparison.p_value)})"
    else:
        accuracy = (
            f"no significant change in test accuracy ({_signed(100 * d.mean)} pp, {_p(comparison.p_value)})"
        )
    return f"{result.name}, compressed against its own float model: {ratio:.2f}× smaller, {speed} at batch 1; {accuracy}."


def _compression_md(report: StudyReport) -> list[str]:
    rows = compression_rows(report)
    if not rows:
        return []
    sentences = [f"- {compression_sentence(r)}" for r in report.variants if _compressed(r)]
    return ["## Compression", "", _md_table(COMPRESSION_HEADERS, rows), "", *sentences, ""]


def markdown(report: StudyReport, images: dict[str, tuple[str, bytes]]) -> str:
    parts = [f"# Study: {report.study.name}", "", *[f"- {line}" for line in _header_lines(report)], ""]
    parts += ["## Results", "", _md_table(HEADERS, table_rows(report)), ""]
    parts += ["## In plain words", ""] + [f"- {sentence(report, r)}" for r in report.variants[1:]] + [""]
    parts += _compression_md(report)
    parts += (
        ["## Plots", ""] + [f"![{caption}](plots/{name})" for name, (caption, _) in images.items()] + [""]
    )
    parts += ["## Architecture differences from the base", ""]
    for result in report.variants[1:]:
        parts += [f"### {result.name}", ""]
        diff = architecture_diff(report.base, result)
        if diff:
            parts += [_md_table(DIFF_HEADERS, [_diff_cells(row) for row in diff]), ""]
        settings = setting_changes(report.base.variant, result.variant)
        parts += [f"- {line}" for line in settings] + ([""] if settings else [])
        if not diff and not settings:
            parts += ["No difference in layers or settings.", ""]
    return "\n".join(parts)


def _html_table(headers, rows) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 1em 0; }
"""


def html_page(report: StudyReport, images: dict[str, tuple[str, bytes]]) -> str:
    """One self-contained page: the plots are embedded as base64 PNGs."""
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Study: {e(report.study.name)}</title>",
        f"<style>{STYLE}</style></head><body><h1>Study: {e(report.study.name)}</h1><ul>",
    ]
    parts += [f"<li>{e(line)}</li>" for line in _header_lines(report)]
    parts += [
        "</ul><h2>Results</h2>",
        _html_table(HEADERS, table_rows(report)),
        "<h2>In plain words</h2><ul>",
    ]
    parts += [f"<li>{e(sentence(report, r))}</li>" for r in report.variants[1:]]
    parts.append("</ul>")
    if rows := compression_rows(report):
        parts += ["<h2>Compression</h2>", _html_table(COMPRESSION_HEADERS, rows), "<ul>"]
        parts += [f"<li>{e(compression_sentence(r))}</li>" for r in report.variants if _compressed(r)]
        parts.append("</ul>")
    parts += ["<h2>Plots</h2>"]
    for caption, png in images.values():
        data = base64.b64encode(png).decode()
        parts.append(
            f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{data}'><figcaption>{e(caption)}</figcaption></figure>"
        )
    parts.append("<h2>Architecture differences from the base</h2>")
    for result in report.variants[1:]:
        parts.append(f"<h3>{e(result.name)}</h3>")
        diff = architecture_diff(report.base, result)
        if diff:
            parts.append(_html_table(DIFF_HEADERS, [_diff_cells(row) for row in diff]))
        settings = setting_changes(report.base.variant, result.variant)
        if settings:
            parts.append("<ul>" + "".join(f"<li>{e(line)}</li>" for line in settings) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


TERMINAL = (
    "variant",
    "params",
    "val acc %",
    "test acc %",
    "test loss",
    "train s",
    "Δ test acc pp (95% CI)",
    "p",
)


def terminal_table(report: StudyReport) -> Table:
    """The report's main columns (report.md has them all)."""
    table = Table(
        title=f"study {report.study.name}: mean ± {CONFIDENCE:.0%} CI over seeds; p: {TEST_NAME}",
        title_justify="left",
    )
    keep = [HEADERS.index(h) for h in TERMINAL]
    for header in TERMINAL:
        table.add_column(
            header, justify="left" if header == "variant" else "right", no_wrap=header == "variant"
        )
    for row in table_rows(report):
        table.add_row(*(row[i] for i in keep))
    return table


def write_report(report: StudyReport, out: Path) -> tuple[Path, Path]:
    """Write plots/*.png, report.md and report.html into the study directory (each file atomically)."""
    images = plots(report)
    for name, (_, png) in images.items():
        atomic.write_with(out / "plots" / name, lambda tmp, png=png: tmp.write_bytes(png))
    md = atomic.write_text(out / "report.md", markdown(report, images))
    page = atomic.write_text(out / "report.html", html_page(report, images))
    return md, page
