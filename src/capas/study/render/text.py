"""The report's figures as text: the cells of its tables, one plain sentence per variant and the
header, gathered in a Document that the Markdown renderer and the HTML template lay out alike."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace

from capas.study.report import (
    DIFF_HEADERS,
    OK,
    StudyReport,
    VariantResult,
    architecture_diff,
    diff_cells,
    epochs_text,
    setting_changes,
)
from capas.study.stats import (
    ADJUSTMENT,
    ALPHA,
    CONFIDENCE,
    TEST_NAME,
    Comparison,
    Estimate,
    holm,
    mean_ci,
    paired_comparison,
)

MINUS = "\N{MINUS SIGN}"


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: list[list[str]]


@dataclass(frozen=True)
class DiffSection:
    """How one variant differs from the base: changed layers and changed settings."""

    name: str
    table: Table | None
    settings: list[str]


@dataclass(frozen=True)
class Document:
    """Everything a report page shows, as text; `plots` are (file name, caption) pairs."""

    title: str
    warnings: list[str]
    header: list[str]
    results: Table
    sentences: list[str]
    per_seed: Table
    compression: Table | None
    compression_sentences: list[str]
    plots: list[tuple[str, str]]
    diffs: list[DiffSection] = field(default_factory=list)


# --- numbers as text ---------------------------------------------------------------------------


def signed(value: float, digits: int = 1) -> str:
    """`value` as num() shows it, with its sign: a change below the last digit keeps its side (−0.03, not
    ±0.0, beside an interval that excludes 0); one that rounds to nothing has none (never "−0")."""
    shown = num(value, digits)
    if shown == num(0.0, digits):
        return f"±{shown}"
    return shown if shown.startswith(MINUS) else f"+{shown}"


def share_text(percent: float) -> str:
    """A change in parameters in whole percent, but a decimal where a model that keeps some would read
    as keeping none (−99.6%, not −100%)."""
    return f"{signed(percent, 1 if -100 < percent <= -99.5 else 0)}%"


def num(value: float, digits: int = 1) -> str:
    """`value` with `digits` decimals, or up to 3 more when it would round to zero: an interval's bound
    near 0 shows on which side it lies (never as "−0.0")."""
    for shown in range(digits, digits + 4):
        if round(value, shown) != 0:
            return f"{value:.{shown}f}".replace("-", MINUS)
    return f"{0:.{digits}f}"


def p_text(value: float) -> str:
    """Two significant digits, more where two would print ALPHA or put p on the wrong side of it
    (0.0497 and 0.0502 both round to 0.05, one significant and one not)."""
    if math.isnan(value):
        return "—"
    if value < 0.001:
        return "p < 0.001"
    for digits in range(2, 17):
        shown = f"{value:.{digits}g}"
        if (float(shown) < ALPHA) == (value < ALPHA) and (float(shown) != ALPHA or value == ALPHA):
            break
    return f"p = {shown}"


def mean_pm(estimate: Estimate, scale: float = 1.0, digits: int = 2) -> str:
    if estimate.n == 0:
        return "—"
    if math.isnan(estimate.half_width):  # one value, or no spread to build an interval from
        return f"{estimate.mean * scale:.{digits}f}"
    return f"{estimate.mean * scale:.{digits}f} ± {estimate.half_width * scale:.{digits}f}"


def difference(comparison: Comparison | None) -> str:
    if comparison is None:
        return ""
    d = comparison.difference
    if d.n == 0:
        return "—"
    if comparison.zero_variance:
        return f"{signed(100 * d.mean)} (no spread)"
    if math.isnan(d.low):
        return signed(100 * d.mean)
    return f"{signed(100 * d.mean)} ({num(100 * d.low)} to {num(100 * d.high)})"


def per_seed_differences(comparison: Comparison) -> str:
    return ", ".join(f"{signed(100 * d)}" for d in comparison.differences)


def figure_cell(result: VariantResult, key: str, scale: float = 1.0, digits: int = 2) -> str:
    """mean ± CI of `key` over the variant's seeds; when some seeds have no finite value (a diverged
    run's NaN loss), the cell says how many it rests on."""
    estimate = result.estimate(key)
    cell = mean_pm(estimate, scale, digits)
    seeds = len(result.results)
    return cell if estimate.n == seeds else f"{cell} ({estimate.n} of {seeds} seeds)"


def seeds_cell(result: VariantResult) -> str:
    """Seeds in the figures, of the seeds it has a run of (every seed of the study, but those adaptive
    replication never gave it)."""
    n = len(result.results)
    return str(n) if n == len(result.runs) else f"{n} of {len(result.runs)}"


def _p_cell(value: float, comparison: Comparison | None) -> str:
    return "" if comparison is None else p_text(value).removeprefix("p = ").removeprefix("p ")


# --- the results table -------------------------------------------------------------------------

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
    f"p ({ADJUSTMENT})",
    "seeds",
    "stopped early",
    "notes",
)


def table_rows(report: StudyReport) -> list[list[str]]:
    """One row per variant; accuracy and loss as mean ± the 95% CI's half-width over its seeds."""
    rows = []
    for result in report.variants:
        comparison = result.comparison
        rows.append(
            [
                result.name + (" (base)" if comparison is None else ""),
                f"{result.summary.total:,}",
                f"{result.summary.macs:,}",
                figure_cell(result, "val_accuracy", 100),
                figure_cell(result, "val_loss", 1, 4),
                figure_cell(result, "test_accuracy", 100),
                figure_cell(result, "test_loss", 1, 4),
                figure_cell(result, "best_epoch", 1, 1),
                figure_cell(result, "train_seconds", 1, 1),
                figure_cell(result, "images_per_s", 1, 0),
                difference(comparison),
                _p_cell(comparison.p_value if comparison else math.nan, comparison),
                _p_cell(result.p_adjusted, comparison),
                seeds_cell(result),
                result.stopped_early,
                "; ".join(note.flag for note in result.notes),
            ]
        )
    return rows


def per_seed_table(report: StudyReport) -> Table:
    """Test accuracy of every run, with what became of the runs that have none or a doubtful one."""
    rows = []
    for seed in report.study.seeds:
        if not any(seed in r.runs for r in report.variants):
            continue  # adaptive replication: a seed no variant needed
        in_figures = any(seed in r.seeds for r in report.variants)
        cells = [str(seed) + ("" if in_figures else " (not in the figures)")]
        for result in report.variants:
            outcome = result.runs.get(seed)
            if outcome is None:
                cells.append("not needed (adaptive seeds)")
            elif outcome.result is not None:
                cell = f"{100 * outcome.result['test_accuracy']:.2f}"
                cells.append(cell if outcome.status == OK else f"{cell} ({outcome.status}: {outcome.detail})")
            else:
                cells.append(outcome.status + (f": {outcome.detail}" if outcome.detail else ""))
        rows.append(cells)
    return Table(("seed", *(f"{r.name} test acc %" for r in report.variants)), rows)


# --- plain sentences ---------------------------------------------------------------------------


def _no_test(comparison: Comparison) -> str:
    """Why a comparison has no test (it has at most one shared seed, or no spread)."""
    if comparison.difference.n == 0:
        return "no shared seed"
    if comparison.difference.n == 1:
        return "one shared seed"
    return "the same difference in every seed"


def _accuracy_phrase(report: StudyReport, result: VariantResult) -> str:
    comparison = result.comparison
    d = comparison.difference
    if d.n == 0:
        if not report.base.finished:
            return "no comparison: the base finished no seed"
        if not result.finished:
            return "no comparison: it finished no seed"
        return "no comparison: it and the base finished no seed in common"
    on = f"{d.n} shared seed{'s' if d.n != 1 else ''}"
    if d.n == 1:
        return f"test accuracy {signed(100 * d.mean)} pp (one shared seed: no confidence interval or test)"
    if comparison.zero_variance:
        return (
            f"test accuracy {signed(100 * d.mean)} pp on {on}, the same difference in every seed "
            f"(per seed: {per_seed_differences(comparison)} pp): the variance of the differences could not "
            "be estimated, so there is no confidence interval or test"
        )
    tested = len(report.tested)
    p, interval, after = p_text(result.p_adjusted), "95% CI", ""
    if tested > 1:
        # The interval is the raw test's (it excludes 0 exactly when the raw p is below ALPHA); the
        # decision is Holm's. Both are named, so an interval that excludes 0 beside "no significant
        # difference" reads as what it is.
        p += f" {ADJUSTMENT}-adjusted for {tested} variants, raw {p_text(comparison.p_value)}"
        interval, after = "unadjusted 95% CI", f" after {ADJUSTMENT}'s adjustment"
    detail = f"{interval} {num(100 * d.low)} to {num(100 * d.high)}, {p}; {on}"
    if result.p_adjusted < ALPHA:
        return f"test accuracy {signed(100 * d.mean)} pp ({detail})"
    return f"no significant difference in test accuracy{after} ({signed(100 * d.mean)} pp, {detail})"


def sentence(report: StudyReport, result: VariantResult) -> str:
    """'X instead of BASE: N fewer parameters (−74%); test accuracy −1.2 pp (95% CI …, p = …; 3 shared seeds); …'"""
    base = report.base
    parts = []
    delta = result.summary.total - base.summary.total
    if delta == 0:
        parts.append(f"the same number of parameters ({result.summary.total:,})")
    else:
        share = 100 * delta / base.summary.total
        parts.append(f"{abs(delta):,} {'fewer' if delta < 0 else 'more'} parameters ({share_text(share)})")
    if result.summary.trainable - base.summary.trainable != delta:  # frozen layers changed too
        parts.append(f"{result.summary.trainable:,} trainable instead of {base.summary.trainable:,}")
    parts.append(_accuracy_phrase(report, result))
    if result.comparison.difference.n >= 2:
        # on the seeds of its Δ: the base's row may rest on more (every seed the base finished)
        base_time = replace(base, seeds=result.seeds).estimate("train_seconds").mean
        time = result.estimate("train_seconds").mean
        if base_time > 0:
            parts.append(f"training time {signed(100 * (time - base_time) / base_time, 0)}%")
    parts += [note.text for note in result.notes]
    return f"{result.name} instead of {base.name}: " + "; ".join(parts) + "."


def machine_line(report: StudyReport) -> str:
    """Where the finished runs trained, as each recorded it (a Ray cluster's runs may differ)."""
    machines = Counter(
        (
            f"{w['processor']}{', ' + w['gpu'] if w['gpu'] else ''}, {w['threads']} thread{'s' if w['threads'] != 1 else ''} per run, "
            f"torch {w['torch']}, capas {w['capas']}, python {w['python']}"
            if "processor" in (w := result.get("worker", {}))
            else "not recorded (runs from an older capas)"
        )
        for variant in report.variants
        for result in variant.finished.values()
    )
    if len(machines) <= 1:
        return f"Machine: {next(iter(machines), 'no finished run')}"
    return "Machines: " + "; ".join(
        f"{m} ({n} run{'s' if n != 1 else ''})" for m, n in machines.most_common()
    )


def adaptive_line(report: StudyReport) -> str | None:
    """How many seeds adaptive replication gave each variant and why it stopped, with what that does
    to the intervals; None when the seeds were fixed."""
    study = report.study
    if not (study.replication and report.replication):
        return None
    return (
        f"Adaptive seeds ({study.replication.min} to {study.replication.max}, until the 95% CI of Δ test acc "
        f"on the seeds shared with the base is within ±{study.replication.target_halfwidth_pp:g} pp): "
        + "; ".join(
            f"{name} {r['seeds']} seeds ({r['stopped'] or 'unfinished'})"
            for name, r in report.replication.items()
        )
        + ". Their intervals and p-values are computed as if each variant's number of seeds had been "
        "fixed in advance; since replication stops once an interval is narrow, they are somewhat "
        f"optimistic (an interval covers the true difference less often than {CONFIDENCE:.0%}, and a "
        f"variant without any effect is found significant in more than {ALPHA:.0%} of studies)"
    )


def header_lines(report: StudyReport) -> list[str]:
    study, base = report.study, report.base.variant
    statuses = ", ".join(f"{n} {status}" for status, n in sorted(report.statuses.items()))
    # the study's seeds, less those adaptive replication never needed (no variant has a run of them)
    planned = [s for s in study.seeds if any(s in r.runs for r in report.variants)]
    left_out = [s for s in planned if s not in report.seeds]
    seeds = ", ".join(map(str, report.seeds))
    if not report.base.finished:
        figures = "no figures: the base finished no seed, and every figure rests on seeds shared with it"
    elif all(r.seeds == report.seeds for r in report.variants if r.finished):
        figures = f"every figure rests on seeds {seeds}" + (
            f" (left out: {', '.join(map(str, left_out))}, which the base did not finish)" if left_out else ""
        )
    else:
        figures = (
            f"the base's figures rest on every seed it finished ({seeds}), each variant's figures and its Δ "
            "on the seeds it shares with the base (column seeds)"
        )
    unfinished = [r.name for r in report.variants[1:] if not r.finished]
    if unfinished and report.base.finished:
        figures += f"; {', '.join(unfinished)} finished no seed: no figures, no comparison"
    tested, untested = report.tested, [r for r in report.variants[1:] if math.isnan(r.p_adjusted)]
    if len(tested) > 1:
        family = f"p-values {ADJUSTMENT}-adjusted over the {len(tested)} variants tested"
    elif tested:
        family = f"one variant tested ({tested[0].name}): its p needs no adjustment"
    else:
        family = "no variant could be tested"
    if untested:
        family += f" (no test: {'; '.join(f'{r.name}, {_no_test(r.comparison)}' for r in untested)})"
    if len(tested) > 1:
        family += (
            f"; the {CONFIDENCE:.0%} confidence intervals of the differences are unadjusted (one that excludes 0 "
            f"can miss the {ADJUSTMENT}-adjusted threshold)"
        )
    lines = [
        f"Study file: {study.source}; design: {study.design}; seeds: {', '.join(map(str, planned))}",
        f"Comparison: {report.kind}",
        f"Data: {base.data['name']} (limit {base.data['limit']}, split seed {base.data['split_seed']}, the same splits for every run)",
    ]
    if report.test_size:
        accuracy = report.base.estimate("test_accuracy").mean
        line = f"Test set: {report.test_size:,} images per run"
        if math.isfinite(report.test_se):  # taken at the base's accuracy: none without a finished base run
            line += (
                f"; the binomial standard error of one test accuracy at that size is ±{100 * report.test_se:.1f} pp "
                f"(at the base's {100 * accuracy:.1f}%)"
            )
        lines.append(line)
    lines += [
        f"Training (base): {epochs_text(base.train['epochs'])}, batch {base.train['batch_size']}, "
        f"{base.train['optimizer']['name']} lr {base.train['optimizer']['lr'] or 'default'}",
        f"Runs: {statuses}; {figures}",
        *filter(None, [adaptive_line(report)]),
        f"Accuracy and loss: mean ± half-width of the {CONFIDENCE:.0%} confidence interval over seeds (Student's t); "
        f"differences against the base: {TEST_NAME} (scipy.stats.ttest_rel), {family}",
        machine_line(report),
    ]
    return lines


# --- compression variants ----------------------------------------------------------------------

COMPRESSION_HEADERS = (
    "variant",
    "method",
    "float test acc %",
    "compressed test acc %",
    "Δ pp (95% CI)",
    "p",
    f"p ({ADJUSTMENT})",
    "smaller",
    "batch-1 faster",
    "batch-64 faster",
)


def _compressed(result: VariantResult) -> dict[int, dict]:
    return {seed: r["compress"] for seed, r in result.results.items() if r.get("compress")}


def _geometric_mean(ratios: list[float]) -> float:
    """The mean of ratios over seeds: 2× and 0.5× average to 1×, not to 1.25×."""
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def compression_tests(report: StudyReport) -> dict[str, tuple[Comparison, float]]:
    """Each compressed variant against its own float models, seed by seed (the paired test of the
    variants' comparisons), with its p after Holm's adjustment over the compressed variants tested: a
    family, as the comparisons with the base are."""
    tests = {}
    for result in report.variants:
        if compressed := _compressed(result):
            after = {seed: c["test_accuracy"] for seed, c in compressed.items()}
            tests[result.name] = paired_comparison(after, result.values("test_accuracy"))
    adjusted = holm([c.p_value for c in tests.values()])
    return {name: (c, p) for (name, c), p in zip(tests.items(), adjusted, strict=True)}


def compression_rows(report: StudyReport, tests: dict[str, tuple[Comparison, float]]) -> list[list[str]]:
    rows = []
    for result in report.variants:
        compressed = _compressed(result)
        if not compressed:
            continue
        comparison, p_adjusted = tests[result.name]
        after = mean_ci([c["test_accuracy"] for c in compressed.values()])
        rows.append(
            [
                result.name,
                next(iter(compressed.values()))["method"],
                mean_pm(result.estimate("test_accuracy"), 100),
                mean_pm(after, 100),
                difference(comparison),
                _p_cell(comparison.p_value, comparison),
                _p_cell(p_adjusted, comparison),
                *(
                    f"{_geometric_mean([c[key] for c in compressed.values()]):.2f}×"
                    for key in ("size_ratio", "speedup_batch1", "speedup_batch64")
                ),
            ]
        )
    return rows


def compression_sentence(result: VariantResult, tests: dict[str, tuple[Comparison, float]]) -> str:
    compressed = _compressed(result)
    comparison, p_adjusted = tests[result.name]
    d = comparison.difference
    ratio = _geometric_mean([c["size_ratio"] for c in compressed.values()])
    fast1 = _geometric_mean([c["speedup_batch1"] for c in compressed.values()])
    size = f"{ratio:.2f}× smaller" if ratio >= 1 else f"{1 / ratio:.2f}× larger"
    speed = f"{fast1:.2f}× faster" if fast1 >= 1 else f"{1 / fast1:.2f}× slower"
    if d.n < 2:
        accuracy = f"test accuracy {signed(100 * d.mean)} pp (one seed: no confidence interval or test)"
    elif comparison.zero_variance:
        accuracy = (
            f"test accuracy {signed(100 * d.mean)} pp in every one of {d.n} seeds (per seed: "
            f"{per_seed_differences(comparison)} pp): the variance could not be estimated, no interval or test"
        )
    else:
        tested = sum(not math.isnan(p) for _, p in tests.values())
        p, interval, after = p_text(p_adjusted), "95% CI", ""
        if tested > 1:  # as the variants' sentences: the raw test's interval, Holm's decision
            p += f" {ADJUSTMENT}-adjusted for {tested} compressed variants, raw {p_text(comparison.p_value)}"
            interval, after = "unadjusted 95% CI", f" after {ADJUSTMENT}'s adjustment"
        detail = f"{interval} {num(100 * d.low)} to {num(100 * d.high)}, {p}; {d.n} seeds"
        if p_adjusted < ALPHA:
            accuracy = f"test accuracy {signed(100 * d.mean)} pp ({detail})"
        else:
            accuracy = f"no significant change in test accuracy{after} ({signed(100 * d.mean)} pp, {detail})"
    return f"{result.name}, compressed against its own float model: {size}, {speed} at batch 1; {accuracy}."


# --- the whole document ------------------------------------------------------------------------


def document(report: StudyReport, plots: list[tuple[str, str]]) -> Document:
    """The report as text, for the Markdown renderer and the HTML template."""
    diffs = []
    for result in report.variants[1:]:
        rows = architecture_diff(report.base, result)
        table = Table(DIFF_HEADERS, [diff_cells(row) for row in rows]) if rows else None
        diffs.append(DiffSection(result.name, table, setting_changes(report.base.variant, result.variant)))
    tests = compression_tests(report)
    compression = compression_rows(report, tests)
    return Document(
        title=f"Study: {report.study.name}",
        warnings=report.warnings,
        header=header_lines(report),
        results=Table(HEADERS, table_rows(report)),
        sentences=[sentence(report, r) for r in report.variants[1:]],
        per_seed=per_seed_table(report),
        compression=Table(COMPRESSION_HEADERS, compression) if compression else None,
        compression_sentences=[compression_sentence(r, tests) for r in report.variants if _compressed(r)],
        plots=plots,
        diffs=diffs,
    )
