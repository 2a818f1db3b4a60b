"""The study report: statistics on synthetic per-seed figures (zero variance, failed and diverged
seeds, Holm, still improving, shared seeds, the terminal's width), then a tiny real study."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pytest
from rich.console import Console
from scipy import stats as scipy_stats

from capas.study import load_study
from capas.study.plots import _colors, _curves, per_class
from capas.study.render import print_report, table_rows, terminal_table, write_report
from capas.study.render.markdown import markdown
from capas.study.render.text import (
    HEADERS,
    document,
    header_lines,
    num,
    p_text,
    sentence,
    share_text,
    signed,
)
from capas.study.report import DIVERGED, FAILED, StudyReport, collect, comparison_kind
from capas.study.run import run_study
from capas.study.stats import holm, mean_ci, paired_comparison
from capas.study.store import RunRow, Store

HEAD = {
    "name": "head",
    "alternatives": [
        {"name": "GAP", "replace": {"layer": "flatten", "with": "GlobalAveragePooling2D"}},
        {"name": "GMP", "replace": {"layer": "flatten", "with": "GlobalMaxPooling2D"}},
    ],
}
SGD = {"name": "optimizer", "alternatives": [{"name": "sgd", "train": {"optimizer.name": "sgd"}}]}
TEST_IMAGES = 1000


def synthetic(
    accuracy: float, val_losses=(0.9, 0.7, 0.8), loss: float = 0.5, stopped: str = "max epochs"
) -> dict:
    """A run's result with the given test accuracy; its best validation epoch is where val_losses is lowest."""
    history = [
        {"epoch": i + 1, "loss": loss, "accuracy": accuracy, "val_loss": v, "val_accuracy": accuracy}
        for i, v in enumerate(val_losses)
    ]
    per_class = TEST_IMAGES // 10  # 10 balanced classes: guessing gives 10%
    return {
        "history": history,
        "test_accuracy": accuracy,
        "test_loss": loss if math.isfinite(loss) else math.nan,
        "confusion_matrix": [[per_class if i == j else 0 for j in range(10)] for i in range(10)],
        "best_epoch": len(history),
        "stopped": stopped,
        "train_seconds": 10.0,
        "images_per_s": 100.0,
        "val_loss": val_losses[-1],
        "val_accuracy": accuracy,
    }


def row(variant: str, seed: int, result: dict | None, error: str | None = None) -> RunRow:
    status = "done" if result is not None else "failed"
    return RunRow(f"{variant}/seed-{seed}", variant, seed, status, {}, "", 1, 0.0, 1.0, 1.0, result, error)


def report_of(study, accuracies: dict[str, list], **synthetic_args) -> StudyReport:
    """The report of `study` whose runs have these test accuracies by seed (None: the run crashed)."""
    rows = {
        f"{variant}/seed-{seed}": row(
            variant, seed, None if accuracy is None else synthetic(accuracy, **synthetic_args)
        )
        for variant, values in accuracies.items()
        for seed, accuracy in enumerate(values)
    }
    return collect(study, rows)


@pytest.fixture
def report(tiny_study, study_file):
    """4 seeds; GAP clearly worse and still improving in seed 0; GMP better by exactly 3 pp in every
    seed; sgd crashed in seed 1 and diverged (NaN loss, chance accuracy) in seed 2."""
    study = load_study(study_file(tiny_study(seeds=4, variations=[HEAD, SGD])))
    accuracies = {
        "Flatten": [0.80, 0.82, 0.81, 0.79],
        "GAP": [0.70, 0.73, 0.71, 0.72],
        "GMP": [0.83, 0.85, 0.84, 0.82],
        "sgd": [0.78, None, 0.10, 0.80],
    }
    rows = {}
    for variant, values in accuracies.items():
        for seed, accuracy in enumerate(values):
            if accuracy is None:
                result, error = None, "Traceback (most recent call last):\n  ...\nRuntimeError: out of memory"
            elif variant == "sgd" and seed == 2:
                result, error = synthetic(accuracy, val_losses=(2.3, math.nan, math.nan), loss=math.nan), None
            elif variant == "GAP" and seed == 0:
                result, error = synthetic(accuracy, val_losses=(0.9, 0.8, 0.7)), None  # best = last
            else:
                result, error = synthetic(accuracy), None
            rows[f"{variant}/seed-{seed}"] = row(variant, seed, result, error)
    return collect(study, rows)


def test_holm_multiplies_the_kth_smallest_p_by_m_minus_k_plus_1():
    adjusted = holm([0.01, 0.04, 0.03, math.nan])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adjusted[3])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1, never decreasing


def test_zero_variance_gives_no_interval_and_no_test():
    base = {0: 0.80, 1: 0.82, 2: 0.81}
    variant = {0: 0.83, 1: 0.85, 2: 0.84}  # +0.03 in every seed, up to float rounding (~1e-17)
    comparison = paired_comparison(variant, base)
    # scipy turns the rounding spread into a 'finding': the bug this guards against
    assert scipy_stats.ttest_rel(list(variant.values()), list(base.values())).pvalue < 1e-10
    assert comparison.zero_variance and math.isnan(comparison.p_value)
    assert math.isnan(comparison.difference.low) and comparison.difference.mean == pytest.approx(0.03)
    assert comparison.differences == pytest.approx((0.03, 0.03, 0.03))
    assert math.isnan(mean_ci([0.5, 0.5, 0.5]).half_width) and mean_ci([0.5, 0.5, 0.5]).zero_variance


def test_a_run_early_stopping_ended_is_converged_even_if_its_loss_crept_lower(tiny_study, study_file):
    """Early stopping with min_delta ends a run whose loss still falls by less than min_delta per epoch:
    converged by the stated criterion, so not flagged; the same history ended by the epoch budget is."""
    study = load_study(study_file(tiny_study(seeds=2, variations=[HEAD])))
    creeping = (0.9, 0.8, 0.7995, 0.7993)  # lowest at the last epoch, each step below min_delta
    rows = {}
    for variant in ("Flatten", "GAP", "GMP"):
        for seed in (0, 1):
            stopped = "max epochs" if (variant, seed) == ("GAP", 1) else "early stopping"
            result = synthetic(0.8, val_losses=creeping, stopped=stopped)
            rows[f"{variant}/seed-{seed}"] = row(variant, seed, result)
    report = collect(study, rows)
    assert [v.still_improving for v in report.variants] == [[], [1], []]


def test_zero_variance_report_shows_per_seed_differences_not_p(report):
    gmp = report.variants[2]
    text = sentence(report, gmp)
    assert "the variance of the differences could not be estimated" in text
    assert "per seed: +3.0, +3.0, +3.0, +3.0 pp" in text and "p <" not in text and "p =" not in text
    cells = dict(zip(HEADERS, table_rows(report)[2], strict=True))
    assert cells["Δ test acc pp (95% CI)"] == "+3.0 (no spread)" and cells["p"] == cells["p (Holm)"] == "—"


def test_failed_seed_is_left_out_of_its_variants_comparison_and_shown(report):
    assert report.seeds == (0, 1, 2, 3)  # the base's row: every seed it finished
    sgd = report.variants[3]
    assert sgd.runs[1].status == FAILED and sgd.runs[1].detail == "RuntimeError: out of memory"
    # every other variant is compared with the base on all 4 seeds, sgd on the 3 it finished
    assert [tuple(v.results) for v in report.variants] == [
        (0, 1, 2, 3),
        (0, 1, 2, 3),
        (0, 1, 2, 3),
        (0, 2, 3),
    ]
    assert "1 failed" in [note.flag for note in sgd.notes]
    assert (
        "sgd: no figures from seed 1 (RuntimeError: out of memory); that seed is left out of its comparison "
        "with the base" in report.warnings
    )
    doc = document(report, [])
    seed1 = doc.per_seed.rows[1]
    assert seed1[0] == "1" and seed1[4] == "failed: RuntimeError: out of memory"
    assert seed1[1] == "82.00"
    assert (
        "the base's figures rest on every seed it finished (0, 1, 2, 3), each variant's figures and its Δ on "
        "the seeds it shares with the base (column seeds)" in "\n".join(doc.header)
    )


def test_the_bases_row_rests_on_every_seed_it_finished_when_variants_lost_different_seeds(
    tiny_study, study_file
):
    """The base's row rested on the seeds every variant with a finished run had finished: two variants
    that crashed on different seeds left it none ("—", "0 of 2", no binomial error) though it had
    finished both. It rests on the seeds it finished, as each variant's on those it shares with it."""
    study = load_study(study_file(tiny_study(seeds=2, variations=[HEAD])))
    report = report_of(study, {"Flatten": [0.80, 0.82], "GAP": [None, 0.84], "GMP": [0.83, None]})
    assert report.seeds == (0, 1) and [v.seeds for v in report.variants] == [(0, 1), (1,), (0,)]
    assert report.base.estimate("test_accuracy").mean == pytest.approx(0.81)
    rows = table_rows(report)
    assert rows[0][HEADERS.index("test acc %")].startswith("81.00") and rows[0][HEADERS.index("seeds")] == "2"
    assert [r[HEADERS.index("seeds")] for r in rows[1:]] == ["1 of 2", "1 of 2"]
    assert (
        "the base's figures rest on every seed it finished (0, 1), each variant's figures and its Δ on the "
        "seeds it shares with the base (column seeds)" in "\n".join(header_lines(report))
    )


@pytest.mark.parametrize("failed", ["Flatten", "GAP"])
def test_no_nan_is_printed_when_a_variant_finished_no_seed(failed, tiny_study, study_file):
    study = load_study(study_file(tiny_study(seeds=3)))
    report = report_of(
        study, {"Flatten": [0.80, 0.81, 0.82], "GAP": [0.70, 0.71, 0.72]} | {failed: [None] * 3}
    )
    text = "\n".join(
        [*header_lines(report), *map(" ".join, table_rows(report)), sentence(report, report.variants[1])]
    )
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
    assert "Test set: 1,000 images per run" in text
    if failed == "Flatten":  # the standard error is taken at the base's accuracy: there is none
        assert "binomial" not in text
        assert (
            "no figures: the base finished no seed" in text
            and "no comparison: the base finished no seed" in text
        )


def test_seeds_of_one_variant_in_different_precisions_are_flagged(tiny_study, study_file):
    study = load_study(study_file(tiny_study(seeds=2, variations=[HEAD])))
    precisions = {"Flatten": ["bfloat16", "float32"], "GAP": ["float32", "float32"], "GMP": [None, None]}
    rows = {
        f"{variant}/seed-{seed}": row(variant, seed, {**synthetic(0.8), "precision": precision})
        for variant, values in precisions.items()
        for seed, precision in enumerate(values)
    }
    warnings = collect(study, rows).warnings
    assert [w for w in warnings if "precisions" in w] == [
        "Flatten: its seeds trained in different precisions (1 in bfloat16, 1 in float32; `precision: auto` "
        "chooses per machine): its figures mix them. Set train.precision to compare like with like."
    ]


def test_diverged_seed_stays_in_the_figures_and_is_flagged(report):
    sgd = report.variants[3]
    assert sgd.runs[2].status == DIVERGED and sgd.runs[2].detail == "non-finite loss at epoch 1"
    # the diverged seed's 10% counts in the mean: a recipe that sometimes diverges is worse for it
    assert sgd.estimate("test_accuracy").mean == pytest.approx(np.mean([0.78, 0.10, 0.80]))
    assert sgd.estimate("test_accuracy").n == 3 and sgd.estimate("test_loss").n == 2  # NaN loss: no mean
    text = sentence(report, sgd)
    assert "3 shared seeds" in text and (
        "1 of 4 seeds diverged, kept in the accuracy figures, its non-finite losses left out of the loss means "
        "(each says how many seeds it rests on): seed 2" in text
    )
    # the loss cells say they rest on 2 of the 3 seeds in the figures; the accuracy cell on all 3
    cells = dict(zip(HEADERS, table_rows(report)[3], strict=True))
    assert cells["test loss"] == "0.5000 (2 of 3 seeds)" and cells["val loss"] == "0.8000 (2 of 3 seeds)"
    assert "seeds)" not in cells["test acc %"] and cells["seeds"] == "3 of 4"
    assert "10.00 (diverged: non-finite loss at epoch 1)" in document(report, []).per_seed.rows[2][4]


def test_a_variant_that_finished_no_seed_leaves_the_other_comparisons_standing(tiny_study, study_file):
    study = load_study(study_file(tiny_study(seeds=3, variations=[HEAD])))
    base, gmp = [0.80, 0.81, 0.82], [0.70, 0.72, 0.71]
    report = report_of(study, {"Flatten": base, "GAP": [None] * 3, "GMP": gmp})
    assert report.seeds == (0, 1, 2) and report.variants[2].seeds == (0, 1, 2)
    comparison = report.variants[2].comparison
    assert comparison.difference.mean == pytest.approx(-0.10)
    assert comparison.p_value == pytest.approx(scipy_stats.ttest_rel(gmp, base).pvalue)
    rows = table_rows(report)
    assert rows[0][HEADERS.index("seeds")] == "3" and rows[1][HEADERS.index("seeds")] == "0 of 3"
    gap = sentence(report, report.variants[1])
    assert "no comparison: it finished no seed" in gap and "no seed finished for both" not in gap
    assert "test accuracy −10.0 pp (95% CI −12.5 to −7.5, p = 0.0033; 3 shared seeds)" in sentence(
        report, report.variants[2]
    )
    header = "\n".join(header_lines(report))
    assert "every figure rests on seeds 0, 1, 2; GAP finished no seed: no figures, no comparison" in header


def test_a_variants_row_and_its_difference_rest_on_the_seeds_it_shares_with_the_base(report):
    rows = table_rows(report)
    column = {h: i for i, h in enumerate(HEADERS)}
    base = report.base
    for result, cells in zip(report.variants[1:], rows[1:], strict=True):
        shared = tuple(s for s in base.finished if s in result.finished)
        assert result.comparison.seeds == result.seeds == shared
        mean = float(cells[column["test acc %"]].split(" ± ")[0])
        delta = float(cells[column["Δ test acc pp (95% CI)"]].split()[0].replace("\N{MINUS SIGN}", "-"))
        base_mean = 100 * np.mean([base.finished[s]["test_accuracy"] for s in shared])
        assert mean - base_mean == pytest.approx(delta, abs=0.011)
    assert [r[column["seeds"]] for r in rows] == ["4", "4", "4", "3 of 4"]


def test_holm_adjusted_p_values_are_beside_the_raw_ones_and_in_the_sentence(report):
    gap, gmp, sgd = report.variants[1:]
    raw = [gap.comparison.p_value, gmp.comparison.p_value, sgd.comparison.p_value]
    assert math.isnan(raw[1])  # zero variance: not one of the tests
    assert [gap.p_adjusted, sgd.p_adjusted] == pytest.approx(holm([raw[0], raw[2]]))
    assert gap.p_adjusted == pytest.approx(min(1, 2 * min(raw[0], raw[2])))
    cells = dict(zip(HEADERS, table_rows(report)[1], strict=True))
    assert (cells["p"], cells["p (Holm)"]) == (f"{raw[0]:.2g}", f"{gap.p_adjusted:.2g}")
    assert f"p = {gap.p_adjusted:.2g} Holm-adjusted for 2 variants, raw p = {raw[0]:.2g}" in sentence(
        report, gap
    )
    # the family is the 2 variants tested, not the 3 compared: GMP moved by the same 3 pp in every seed
    assert (
        "p-values Holm-adjusted over the 2 variants tested (no test: GMP, the same difference in every seed)"
        in "\n".join(header_lines(report))
    )


def test_an_unadjusted_interval_that_excludes_zero_is_labelled_beside_a_holm_decision(tiny_study, study_file):
    """Raw p 0.026 and 0.049, Holm-adjusted 0.052 for both: 'no significant difference' after the
    adjustment, beside the raw test's interval, which excludes 0 (scipy: −3.30 to −0.56 pp)."""
    study = load_study(study_file(tiny_study(seeds=3, variations=[HEAD])))
    base, gap = [0.80, 0.82, 0.81], [0.781, 0.795, 0.796]
    report = report_of(study, {"Flatten": base, "GAP": gap, "GMP": [0.767, 0.805, 0.775]})
    assert report.variants[1].comparison.p_value == pytest.approx(scipy_stats.ttest_rel(gap, base).pvalue)
    assert report.variants[1].p_adjusted == pytest.approx(0.052, abs=5e-4)
    assert (
        "no significant difference in test accuracy after Holm's adjustment (−1.9 pp, unadjusted 95% CI −3.3 "
        "to −0.6, p = 0.052 Holm-adjusted for 2 variants, raw p = 0.026; 3 shared seeds)"
        in sentence(report, report.variants[1])
    )
    assert "the 95% confidence intervals of the differences are unadjusted" in "\n".join(header_lines(report))


def test_p_values_near_alpha_show_their_side_and_no_bound_reads_minus_zero(tiny_study, study_file):
    assert [p_text(p) for p in (0.0497, 0.0502, 0.05, 0.049999, 0.022, 0.0067, 0.5)] == [
        "p = 0.0497",
        "p = 0.0502",
        "p = 0.05",
        "p = 0.049999",
        "p = 0.022",
        "p = 0.0067",
        "p = 0.5",
    ]
    assert [num(v) for v in (-0.04, 0.004, -2.45, -1e-9, 0.0)] == ["−0.04", "0.004", "−2.5", "0.0", "0.0"]
    study = load_study(study_file(tiny_study(seeds=3)))
    base = [0.80, 0.82, 0.81]
    below = report_of(study, {"Flatten": base, "GAP": [0.772, 0.793, 0.798]})  # p = 0.0497
    above = report_of(study, {"Flatten": base, "GAP": [0.770, 0.790, 0.797]})  # p = 0.0502
    assert "test accuracy −2.2 pp (95% CI −4.5 to −0.01, p = 0.0497; 3 shared seeds)" in sentence(
        below, below.variants[1]
    )
    assert (
        "no significant difference in test accuracy (−2.4 pp, 95% CI −4.9 to 0.005, p = 0.0502;"
        in sentence(above, above.variants[1])
    )


def test_a_lone_tested_variant_is_said_to_need_no_adjustment(tiny_study, study_file):
    study = load_study(study_file(tiny_study(seeds=3, variations=[HEAD])))
    report = report_of(
        study, {"Flatten": [0.80, 0.82, 0.81], "GAP": [0.77, 0.80, 0.775], "GMP": [0.83, 0.85, 0.84]}
    )
    header = "\n".join(header_lines(report))
    assert "one variant tested (GAP): its p needs no adjustment (no test: GMP, the same difference" in header
    assert "Holm-adjusted over" not in header
    assert [r.name for r in report.tested] == ["GAP"]


def test_runs_early_stopping_did_not_end_are_flagged_not_converged(tiny_study, study_file):
    """With early stopping configured, a run the epoch ceiling ended one epoch after its best epoch (1 of
    3 patience epochs used) has not met the stated criterion, though its best epoch is not its last."""
    stopping = {"epochs": 5, "early_stopping": {"patience": 3, "min_delta": 0.002}}
    study = load_study(study_file(tiny_study(seeds=2, train=stopping, variations=[HEAD])))
    history = (0.9, 0.7, 0.6, 0.5, 0.52)
    rows = {}
    for variant, stopped in (("Flatten", "early stopping"), ("GAP", "max epochs"), ("GMP", "time budget")):
        for seed in (0, 1):
            result = synthetic(0.8 - seed / 100, val_losses=history, stopped=stopped)
            rows[f"{variant}/seed-{seed}"] = row(variant, seed, result)
    report = collect(study, rows)
    assert [r.not_converged for r in report.variants] == [[], [0, 1], [0, 1]]
    assert [r.still_improving for r in report.variants] == [[], [], []]
    assert (
        "GAP: not converged in 2 of 2 seeds: max epochs ended training before early stopping's criterion "
        "(3 epochs without an improvement of at least 0.002 in val_loss) was met, so the effect is not "
        "measured at convergence" in report.warnings
    )
    assert any(w.startswith("GMP: not converged in 2 of 2 seeds: time budget ended") for w in report.warnings)
    assert [table_rows(report)[i][HEADERS.index("notes")] for i in range(3)] == [
        "",
        "not converged",
        "not converged",
    ]
    header = "\n".join(header_lines(report))
    assert "trained to its own convergence" not in header
    assert (
        "Comparison: each variant trained towards its own convergence: early stopping on val_loss" in header
        and "at most 5 epochs; convergence not reached in every run by GAP, GMP (see the warnings)" in header
    )


def test_still_improving_variants_are_flagged_in_table_sentence_and_top(report):
    gap = report.variants[1]
    assert gap.still_improving == [0] and [r.still_improving for r in report.variants[2:]] == [[], []]
    assert "still improving" in table_rows(report)[1][HEADERS.index("notes")]
    assert "still improving at the budget in 1 of 4 seeds: the effect may shrink or grow" in sentence(
        report, gap
    )
    assert report.warnings[0].startswith("Still improving at the budget: GAP ")
    assert report.base.still_improving == [] and "still improving" not in table_rows(report)[0][-1]


def test_header_states_the_comparison_kind_test_size_and_binomial_error(report, tiny_study, study_file):
    lines = "\n".join(header_lines(report))
    assert (
        "Comparison: every variant trained to an equal training budget: 1 epoch, no early stopping" in lines
    )
    se = 100 * math.sqrt(0.8 * 0.2 / TEST_IMAGES)  # the base's mean on seeds 0, 2, 3 is 80.0%
    assert (
        f"Test set: 1,000 images per run; the binomial standard error of one test accuracy at that size is ±{se:.1f} pp"
        in lines
    )
    converging = tiny_study(train={"epochs": 30, "early_stopping": {"patience": 4}})
    assert comparison_kind(load_study(study_file(converging))) == (
        "each variant trained to its own convergence: early stopping on val_loss (stopped after 4 epochs "
        "without an improvement of at least 0, the best epoch's weights restored), at most 30 epochs"
    )
    mixed = tiny_study(variations=[{"name": "b", "alternatives": [{"name": "long", "train": {"epochs": 5}}]}])
    assert comparison_kind(load_study(study_file(mixed))).startswith(
        "mixed, the variants train differently: Flatten: "
    )


def _printed(renderable, width: int) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def test_terminal_table_fits_80_columns_without_cutting_numbers(report):
    text = _printed(terminal_table(report, 80), 80)
    assert max(len(line) for line in text.splitlines()) <= 80
    rows = table_rows(report)
    shown = [HEADERS.index(h) for h in ("variant", "test acc %", "Δ test acc pp (95% CI)", "p (Holm)")]
    for cells in rows:  # each row on one line, its numbers whole
        line = next(line for line in text.splitlines() if line.startswith(cells[0]))
        assert all(cells[i] in line for i in shown)
    caption = " ".join(text.split())  # rich wraps the caption between words
    assert "not shown at this width" in caption and "a: still improving" in caption
    assert "95% CI over seeds (unadjusted for Δ)" in caption
    wide = _printed(terminal_table(report, 250), 250)
    assert "not shown at this width" not in wide and "mult-adds" in wide
    narrow = _printed(
        terminal_table(report, 45), 45
    )  # narrower than the essential columns: one figure a line
    assert max(len(line) for line in narrow.splitlines()) <= 45
    assert all(f"test acc %: {cells[HEADERS.index('test acc %')]}" in narrow for cells in rows)


def test_tiny_real_study_reports_a_diverged_variant_and_a_failed_run(tmp_path, tiny_study, study_file):
    diverging = {"name": "lr", "alternatives": [{"name": "diverging", "train": {"optimizer.lr": 1e30}}]}
    # a name with brackets is printed as written, not read as rich markup ('[/]' raised MarkupError)
    doc = tiny_study(name="tiny [/]", variations=[*tiny_study()["variations"], diverging])
    out = tmp_path / "out"
    console = Console(file=io.StringIO(), width=80, color_system=None)
    outcome = run_study(study_file(doc), out=out, workers=1, console=console)
    assert outcome.failed == [] and "study tiny [/]: 3 variants" in console.file.getvalue()
    report = outcome.report
    assert [o.status for o in report.variants[2].runs.values()] == [DIVERGED, DIVERGED]
    markdown = outcome.markdown.read_text()
    assert markdown.splitlines()[2].startswith("> **Warning:** Still improving at the budget: Flatten, GAP")
    assert (
        "diverging: 2 of 2 seeds diverged, kept in the accuracy figures, its non-finite losses left out of the "
        "loss means (each says how many seeds it rests on): seed 0 (non-finite loss at epoch 1)" in markdown
    )
    assert "Comparison: every variant trained to an equal training budget: 1 epoch," in markdown
    page = outcome.html.read_text()
    assert '<p class="warning"><strong>Warning:</strong> Still improving' in page

    print_report(report, console)
    printed = console.file.getvalue()
    assert max(len(line) for line in printed.splitlines() if not line.startswith(("- ", "warning:"))) <= 80
    assert "diverging" in printed and "2 shared seeds" in printed

    with Store(out / "study.sqlite") as store:  # what the runner records when a run raises
        store.fail("GAP/seed-1", "Traceback (most recent call last):\nValueError: boom")
        failed = collect(report.study, store.runs())
    assert failed.seeds == (0, 1) and failed.variants[1].runs[1].status == FAILED
    assert failed.variants[2].seeds == (0, 1)  # GAP's lost seed stays in the diverging variant's comparison
    markdown, _ = write_report(failed, out)
    text = markdown.read_text()
    assert "| 1 | " in text and "failed: ValueError: boom" in text
    assert "test accuracy" in text and "one shared seed: no confidence interval or test" in text


def test_the_terminal_shows_variant_names_as_written(tiny_study, study_file):
    """Brackets in a variant's name are text, not rich markup: '[bn]' was dropped and
    '[/]' raised a MarkupError after every run had trained."""
    names = {
        "name": "head",
        "alternatives": [
            {"name": "GAP [bn]", "replace": {"layer": "flatten", "with": "GlobalAveragePooling2D"}}
        ],
    }
    study = load_study(
        study_file(tiny_study(variations=[names], base={**tiny_study()["base"], "name": "Flatten [/]"}))
    )
    report = report_of(study, {"Flatten [/]": [0.80, 0.82], "GAP [bn]": [0.70, None]})
    console = Console(file=io.StringIO(), width=200, color_system=None)
    print_report(report, console)
    printed = console.file.getvalue()
    assert (
        "GAP [bn] instead of Flatten [/]:" in printed
        and "warning: GAP [bn]: no figures from seed 1" in printed
    )
    rows = [line for line in printed.splitlines() if line.startswith(("Flatten [/] (base) ", "GAP [bn] "))]
    assert len(rows) == 2


def test_markdown_tables_keep_their_columns_with_a_pipe_in_a_variant_name(tiny_study, study_file):
    names = {
        "name": "head",
        "alternatives": [
            {"name": "GAP | x", "replace": {"layer": "flatten", "with": "GlobalAveragePooling2D"}}
        ],
    }
    study = load_study(study_file(tiny_study(variations=[names])))
    text = markdown(document(report_of(study, {"Flatten": [0.80, 0.82], "GAP | x": [0.70, 0.72]}), []))
    per_seed = text.split("## Per seed")[1].split("##")[0]
    lines = [line for line in per_seed.splitlines() if line.startswith("|")]
    # the per-seed table's header names the variants: an unescaped '|' added a column to it only
    assert [len(re.split(r"(?<!\\)\|", line)) for line in lines] == [5] * 4
    assert "| GAP \\| x test acc % |" in lines[0]


def test_training_time_is_compared_on_the_seeds_of_the_variants_difference(tiny_study, study_file):
    """GMP lost seed 1, so its Δ, and its training time against the base's, rest on seeds 0 and 2 (it
    took exactly as long as the base in each), the base's row on all three."""
    study = load_study(study_file(tiny_study(seeds=3, variations=[HEAD])))
    seconds = [10.0, 40.0, 10.0]
    rows = {}
    for variant, accuracies in {
        "Flatten": [0.80, 0.82, 0.81],
        "GAP": [0.70, 0.73, 0.71],
        "GMP": [0.8, None, 0.8],
    }.items():
        for seed, accuracy in enumerate(accuracies):
            result = None if accuracy is None else {**synthetic(accuracy), "train_seconds": seconds[seed]}
            rows[f"{variant}/seed-{seed}"] = row(variant, seed, result)
    report = collect(study, rows)
    assert report.seeds == (0, 1, 2) and report.variants[2].seeds == (0, 2)
    text = sentence(report, report.variants[2])
    assert "2 shared seeds" in text and "training time ±0%" in text


def test_best_epoch_without_early_stopping_is_the_lowest_validation_loss(report):
    """Without early stopping a run keeps its last epoch's weights, which test.json calls best_epoch (3
    here); the report's best epoch is the one its still-improving flag reads: lowest val_loss, epoch 2."""
    cells = [dict(zip(HEADERS, r, strict=True))["best epoch"] for r in table_rows(report)]
    assert cells[0] == "2.0" and cells[1].startswith("2.2 ± ") and cells[2] == "2.0"
    assert report.base.still_improving == [] and report.variants[1].still_improving == [0]


def test_plots_draw_a_dollar_in_a_name_as_text(tiny_study, study_file):
    """matplotlib reads text between two '$' as mathtext: 'GAP $_$' raised a ValueError before
    report.md was written."""
    names = {
        "name": "head",
        "alternatives": [
            {"name": "GAP $_$", "replace": {"layer": "flatten", "with": "GlobalAveragePooling2D"}}
        ],
    }
    study = load_study(study_file(tiny_study(variations=[names])))
    rows = {
        f"{variant}/seed-{seed}": row(
            variant, seed, {**synthetic(0.8 - seed / 10), "per_class_accuracy": {"$x$": 0.5, "y": None}}
        )
        for variant in ("Flatten", "GAP $_$")
        for seed in (0, 1)
    }
    # one plot with the names as legend labels and the classes as tick labels (all four take 4 s)
    assert per_class(collect(study, rows)).startswith(b"\x89PNG")


def test_markdown_shows_html_in_a_name_or_an_error_as_text(tiny_study, study_file):
    """report.html escapes what comes from users' files and runs; report.md let a Markdown viewer render
    it as HTML ('GAP <b>x</b>' in bold, a failed run's '<lambda>' vanished as an unknown element)."""
    names = {
        "name": "head",
        "alternatives": [
            {"name": "GAP <b>x</b>", "replace": {"layer": "flatten", "with": "GlobalAveragePooling2D"}}
        ],
    }
    study = load_study(study_file(tiny_study(variations=[names])))
    rows = {
        "Flatten/seed-0": row("Flatten", 0, synthetic(0.8)),
        "Flatten/seed-1": row("Flatten", 1, None, "Traceback ...\nTypeError: <lambda>() takes 0 arguments"),
        "GAP <b>x</b>/seed-0": row("GAP <b>x</b>", 0, synthetic(0.7)),
        "GAP <b>x</b>/seed-1": row("GAP <b>x</b>", 1, synthetic(0.7)),
    }
    text = markdown(document(collect(study, rows), []))
    assert "### GAP \\<b>x\\</b>" in text and "TypeError: \\<lambda>() takes" in text
    assert not re.search(r"(?<!\\)<[A-Za-z/!?]", text)


def test_markdown_shows_emphasis_and_code_marks_in_names_as_text(tiny_study, study_file):
    """Variant, study and layer names are any text: report.md showed '*GAP*' in italics, '__x__' in bold
    and a name in backticks as code, in the tables, headings and sentences alike."""
    names = {
        "name": "head",
        "alternatives": [
            {
                "name": "*GAP* __x__ `y`",
                "replace": {"layer": "flatten", "with": {"GlobalAveragePooling2D": {"name": "gap_*a*_"}}},
            }
        ],
    }
    study = load_study(study_file(tiny_study(name="tiny_*", variations=[names])))
    text = markdown(
        document(report_of(study, {"Flatten": [0.80, 0.82], "*GAP* __x__ `y`": [0.70, 0.72]}), [])
    )
    shown = r"\*GAP\* \_\_x\_\_ \`y\`"
    assert text.startswith(r"# Study: tiny\_\*") and f"### {shown}\n" in text
    assert f"| {shown} | " in text and f"\n- {shown} instead of Flatten: " in text
    assert r"gap\_\*a\*\_ (GlobalAveragePooling2D)" in text
    assert "/test_markdown_shows_emphasis" in text  # the study file's path: '_' inside a word stays
    assert not re.search(r"(?<!\\)[*`]", text)


INT8 = {"name": "q", "alternatives": [{"name": "int8", "compress": {"quantize": "int8"}}]}


def compressed_report(tiny_study, study_file, size_ratio: float) -> StudyReport:
    """Flatten and its int8 variant over 3 seeds; the int8 models' size ratio (float bytes / int8 bytes)."""
    study = load_study(study_file(tiny_study(seeds=3, variations=[INT8])))
    rows = {}
    for seed, accuracy in enumerate((0.80, 0.82, 0.81)):
        rows[f"Flatten/seed-{seed}"] = row("Flatten", seed, synthetic(accuracy))
        compress = {
            "method": "quantize-int8",
            "test_accuracy": accuracy + 0.001 * seed,
            "size_ratio": size_ratio,
            "speedup_batch1": 2.0,
            "speedup_batch64": 2.0,
        }
        rows[f"int8/seed-{seed}"] = row("int8", seed, {**synthetic(accuracy), "compress": compress})
    return collect(study, rows)


def test_a_compressed_model_larger_than_its_float_model_is_called_larger(tiny_study, study_file):
    """A tiny model's int8 ONNX file (graph and scales) can outweigh its float weights: 0.90 is not 'smaller'."""
    doc = document(compressed_report(tiny_study, study_file, 12256 / 13594), [])
    assert doc.compression_sentences[0].startswith(
        "int8, compressed against its own float model: 1.11× larger, 2.00× faster at batch 1;"
    )
    doc = document(compressed_report(tiny_study, study_file, 4.0), [])
    assert "its own float model: 4.00× smaller, 2.00× faster" in doc.compression_sentences[0]


def test_a_compressed_variants_row_and_sentence_say_they_are_its_float_models(tiny_study, study_file):
    """int8's row is the float model it compressed, trained as the base: its '±0.0 pp' is not int8's."""
    report = compressed_report(tiny_study, study_file, 4.0)
    int8 = report.variants[1]
    assert dict(zip(HEADERS, table_rows(report)[1], strict=True))["notes"] == "float model"
    assert sentence(report, int8).endswith(
        "; its figures are its float model's, before compression (the compressed model against it: below)."
    )
    console = Console(file=io.StringIO(), width=200, color_system=None)
    print_report(report, console)  # the terminal's sentences include the compressed model's
    assert "int8, compressed against its own float model: 4.00× smaller" in console.file.getvalue()


def test_compressed_models_are_judged_after_holms_adjustment_over_the_compressed_variants(
    tiny_study, study_file
):
    """Each compressed variant was judged by its raw p: with several, one changed by chance would read as
    an effect. They form a family, adjusted as the variants' comparisons with the base are."""
    methods = {"a": "int8", "b": "dynamic"}
    two = {
        "name": "q",
        "alternatives": [{"name": n, "compress": {"quantize": m}} for n, m in methods.items()],
    }
    study = load_study(study_file(tiny_study(seeds=3, variations=[two])))
    floats = (0.80, 0.82, 0.81)
    changes = {"a": (-0.010, -0.018, -0.012), "b": (0.004, -0.006, 0.001)}
    rows = {f"Flatten/seed-{s}": row("Flatten", s, synthetic(a)) for s, a in enumerate(floats)}
    for name, deltas in changes.items():
        for seed, (accuracy, delta) in enumerate(zip(floats, deltas, strict=True)):
            compress = {"method": "quantize-int8", "test_accuracy": accuracy + delta, "size_ratio": 4.0}
            compress |= {"speedup_batch1": 2.0, "speedup_batch64": 2.0}
            rows[f"{name}/seed-{seed}"] = row(name, seed, {**synthetic(accuracy), "compress": compress})
    doc = document(collect(study, rows), [])
    raw = {n: scipy_stats.ttest_rel(np.add(floats, d), floats).pvalue for n, d in changes.items()}
    adjusted = holm(list(raw.values()))
    assert raw["a"] < 0.05 <= adjusted[0]  # significant alone, not among two
    table = {r[0]: dict(zip(doc.compression.headers, r, strict=True)) for r in doc.compression.rows}
    assert table["a"]["p"] == p_text(raw["a"]).removeprefix("p = ")
    assert table["a"]["p (Holm)"] == p_text(adjusted[0]).removeprefix("p = ")
    assert (
        "no significant change in test accuracy after Holm's adjustment (−1.3 pp, unadjusted 95% CI"
        in doc.compression_sentences[0]
    )
    assert (
        f"{p_text(adjusted[0])} Holm-adjusted for 2 compressed variants, raw {p_text(raw['a'])}"
        in (doc.compression_sentences[0])
    )


def test_a_settings_diff_names_only_what_changed(tiny_study, study_file):
    """The base's empty extras ({}) and a variant's compress extras once gave 'extras.: {} → None' too."""
    diff = document(compressed_report(tiny_study, study_file, 4.0), []).diffs[0]
    assert diff.table is None and diff.settings == ["extras.compress.quantize: None → 'int8'"]


def test_a_significant_difference_below_a_tenth_of_a_point_keeps_its_sign(tiny_study, study_file):
    """−0.02, −0.03 and −0.04 pp in the three seeds (2 to 4 images in 10,000) is significant: it read
    'test accuracy ±0.0 pp' beside its interval, a difference without a sign."""
    study = load_study(study_file(tiny_study(seeds=3)))
    report = report_of(study, {"Flatten": [0.80, 0.82, 0.81], "GAP": [0.7998, 0.8197, 0.8096]})
    text = sentence(report, report.variants[1])
    assert "test accuracy −0.03 pp (95% CI −0.1 to −0.01, p = 0.035; 3 shared seeds)" in text
    assert "per seed" not in text and [signed(v) for v in (0.0, 1e-17, -2.45, 0.04)] == [
        "±0.0",
        "±0.0",
        "−2.5",
        "+0.04",
    ]
    cells = dict(zip(HEADERS, table_rows(report)[1], strict=True))
    assert cells["Δ test acc pp (95% CI)"] == "−0.03 (−0.1 to −0.01)"


@pytest.mark.parametrize("n", [2, 10, 11, 60])
def test_every_variant_gets_its_own_colour_in_the_plots(n):
    """A study of 60 variants drew every tenth in the same colour and marker: the legend could not say
    which point was the base and which lr-09, lr-19…"""
    assert len(set(_colors(n))) == n


def test_a_diverged_seeds_non_finite_losses_leave_the_learning_curves_as_they_leave_the_loss_means():
    """A diverged seed's NaN loss made its variant's mean curve and band NaN from that epoch on (not
    drawn), where the table leaves such values out of the loss means."""
    epochs, mean, low, high = _curves([[0.9, math.nan, math.nan], [0.8, 0.6, 0.5], [1.0, 0.7]])
    assert list(epochs) == [1, 2, 3]
    assert list(mean) == pytest.approx([0.9, 0.65, 0.5]) and list(low) == [0.8, 0.6, 0.5]
    assert list(high) == [1.0, 0.7, 0.5]
    assert np.isnan(_curves([[math.nan], [math.inf]])[1]).all()  # no finite value: nothing drawn


def test_a_variant_with_nearly_all_parameters_removed_is_not_said_to_have_none():
    """−99.6% of the parameters printed as −100%."""
    assert signed(-99.6, 0) == "\N{MINUS SIGN}100"  # the general rounding
    assert share_text(-99.6) == "\N{MINUS SIGN}99.6%" and share_text(-100.0) == "\N{MINUS SIGN}100%"
    assert share_text(-74.2) == "\N{MINUS SIGN}74%" and share_text(250.4) == "+250%"


def test_compressed_models_ratios_are_averaged_geometrically(tiny_study, study_file):
    """Size and speed ratios were averaged arithmetically: 2× faster in one seed and 2× slower in
    another read as 1.25× faster."""
    study = load_study(study_file(tiny_study(seeds=2, variations=[INT8])))
    rows = {}
    for seed, speedup in enumerate((2.0, 0.5)):
        rows[f"Flatten/seed-{seed}"] = row("Flatten", seed, synthetic(0.8))
        compress = {"method": "quantize-int8", "test_accuracy": 0.8, "size_ratio": 4.0 if seed else 1.0}
        compress |= {"speedup_batch1": speedup, "speedup_batch64": speedup}
        rows[f"int8/seed-{seed}"] = row("int8", seed, {**synthetic(0.8), "compress": compress})
    doc = document(collect(study, rows), [])
    cells = dict(zip(doc.compression.headers, doc.compression.rows[0], strict=True))
    assert (cells["smaller"], cells["batch-1 faster"], cells["batch-64 faster"]) == (
        "2.00×",
        "1.00×",
        "1.00×",
    )
    assert "2.00× smaller, 1.00× faster at batch 1" in doc.compression_sentences[0]


def test_settings_a_variants_schedule_does_not_read_are_not_listed_as_changes(tiny_study, study_file):
    """The tricks study's constant-rate variant listed `schedule.warmup_fraction: 0.23 → 0.25` and two
    more: the defaults a constant schedule never reads, shown as if it warmed up."""
    from capas.study.report import setting_changes

    doc = tiny_study(train={"schedule": {"name": "linear", "warmup_fraction": 0.23, "initial_factor": 0.2}})
    doc["variations"] = [
        {
            "name": "schedule",
            "alternatives": [
                {"name": "constant", "train": {"schedule": {"name": "constant"}}},
                {"name": "longer", "train": {"schedule.warmup_fraction": 0.5}},
            ],
        }
    ]
    study = load_study(study_file(doc))
    constant, longer = study.variants[1:]
    assert setting_changes(study.base, constant) == ["train.schedule.name: 'linear' → 'constant'"]
    assert setting_changes(study.base, longer) == ["train.schedule.warmup_fraction: 0.23 → 0.5"]
