"""Adaptive replication: seeds are added to a variant until the 95% CI of its test-accuracy difference
from the base is within the target, or the variant reaches the maximum."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable

import numpy as np
import pytest
from rich.console import Console
from scipy import stats as scipy_stats

from capas.errors import CapasError
from capas.study import load_study
from capas.study.render import print_report
from capas.study.render.text import header_lines, seeds_cell
from capas.study.report import StudyReport, collect
from capas.study.run import next_runs, replication_status, run_study
from capas.study.spec import MAX_REACHED, TARGET_REACHED, Replication
from capas.study.store import Store

HEAD = {
    "name": "head",
    "alternatives": [
        {"name": "GAP", "replace": {"layer": "flatten", "with": "GlobalAveragePooling2D"}},
        {"name": "lr", "train": {"optimizer.lr": 0.003}},
    ],
}


@pytest.fixture
def adaptive(tiny_study) -> Callable[[dict], dict]:
    """The tiny study with two variants, 200 images, and the given `seeds:` setting."""

    def make(seeds) -> dict:
        return tiny_study(
            name="adaptive", seeds=seeds, variations=[HEAD], data={"limit": 200, "test_limit": 200}
        )

    return make


def _half_width_pp(diffs: list[float]) -> float:
    d = np.asarray(diffs)
    return 100 * scipy_stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))


def test_the_decision_stops_at_the_first_seed_count_whose_interval_is_within_the_target():
    rng = np.random.default_rng(0)
    base_values = 0.80 + 0.01 * rng.standard_normal(10)
    diffs = -0.03 + 0.012 * rng.standard_normal(10)  # Δ −3 pp, spread 1.2 pp between seeds
    rule = Replication(min=3, max=10, target_halfwidth_pp=1.0)
    expected = next(n for n in range(3, 11) if _half_width_pp(diffs[:n]) <= 1.0)
    for n in range(1, 11):
        base = {s: float(base_values[s]) for s in range(n)}
        variant = {s: float(base_values[s] + diffs[s]) for s in range(n)}
        decision = rule.decide(variant, base, tried=n)
        if n < expected:
            assert decision is None, n
        else:
            assert decision == TARGET_REACHED, n
            break
    assert 3 < expected < 10  # the synthetic case really needs more than min seeds, and stops before max
    noisy = {s: float(base_values[s] + 0.1 * (-1) ** s) for s in range(10)}  # ±10 pp from seed to seed
    assert rule.decide(noisy, {s: float(v) for s, v in enumerate(base_values)}, tried=9) is None
    assert rule.decide(noisy, {s: float(v) for s, v in enumerate(base_values)}, tried=10) == MAX_REACHED
    # fewer than min shared seeds never reaches the target, however narrow the interval
    assert rule.decide({0: 0.5, 1: 0.5}, {0: 0.4, 1: 0.4}, tried=2) is None


def _finish(store: Store, variant: str, seed: int, accuracy: float) -> None:
    rid = f"{variant}/seed-{seed}"
    store.add_run(rid, variant, seed, {}, "x")
    matrix = [[100 if i == j else 0 for j in range(10)] for i in range(10)]  # 1,000 balanced test images
    result = {
        "test_accuracy": accuracy,
        "test_loss": 1.0,
        "confusion_matrix": matrix,
        "history": [],
        "stopped": "max epochs",
    }
    store.finish(rid, {**result, "wall_seconds": 0.0})


def _first_round(store: Store) -> None:
    """Seeds 0-2 of the base (Flatten), a variant far from it (GAP) and one close to it (lr)."""
    for seed, (base, gap, lr) in enumerate([(0.80, 0.70, 0.801), (0.82, 0.60, 0.8215), (0.81, 0.75, 0.8105)]):
        _finish(store, "Flatten", seed, base)
        _finish(store, "GAP", seed, gap)
        _finish(store, "lr", seed, lr)


def test_next_round_adds_a_seed_to_unfinished_variants_and_their_base_pairs(tmp_path, adaptive, study_file):
    study = load_study(study_file(adaptive({"min": 3, "max": 5, "target_halfwidth_pp": 1.0})))
    assert study.initial_seeds == (0, 1, 2) and study.seeds == (0, 1, 2, 3, 4)
    with Store(tmp_path / "study.sqlite") as store:
        _first_round(store)
        status = replication_status(study, store.runs())
        assert status["lr"]["stopped"] == TARGET_REACHED and status["lr"]["half_width_pp"] < 0.2
        assert status["GAP"]["stopped"] is None and status["GAP"]["seeds"] == 3
        more = next_runs(study, store.runs())
        assert [(v.name, s) for v, s in more] == [("GAP", 3), ("Flatten", 3)]
        _finish(store, "Flatten", 3, 0.80)
        _finish(store, "GAP", 3, 0.50)
        assert [(v.name, s) for v, s in next_runs(study, store.runs())] == [("GAP", 4), ("Flatten", 4)]
        _finish(store, "Flatten", 4, 0.80)
        _finish(store, "GAP", 4, 0.79)
        assert next_runs(study, store.runs()) == []
        assert replication_status(study, store.runs())["GAP"] == {
            "seeds": 5,
            "half_width_pp": pytest.approx(_half_width_pp([-0.10, -0.22, -0.06, -0.30, -0.01])),
            "stopped": MAX_REACHED,
        }
        # the report's figures use every seed a variant shares with the base: the interval that stopped
        # the replication is the one the report shows; the base's row rests on every seed it finished
        report = collect(study, store.runs())
    by_name = {v.name: v for v in report.variants}
    assert report.base.seeds == (0, 1, 2, 3, 4) and by_name["lr"].seeds == (0, 1, 2)
    gap = by_name["GAP"]
    assert gap.seeds == (0, 1, 2, 3, 4)
    assert gap.comparison.differences == pytest.approx((-0.10, -0.22, -0.06, -0.30, -0.01))
    assert 100 * gap.comparison.difference.half_width == pytest.approx(
        _half_width_pp([-0.10, -0.22, -0.06, -0.30, -0.01])
    )
    assert gap.estimate("test_accuracy").n == 5


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        ({"min": 3, "max": 10}, "exactly the keys min, max and target_halfwidth_pp"),
        ({"min": 5, "max": 3, "target_halfwidth_pp": 1}, "2 <= min <= max"),
        ({"min": 3, "max": 10, "target_halfwidth_pp": 0}, "positive, finite number of percentage points"),
        # .inf was taken: every variant "reached" it at min seeds, which is no adaptive replication
        (
            {"min": 3, "max": 10, "target_halfwidth_pp": float("inf")},
            "positive, finite number of percentage points",
        ),
        # seeds 0 .. max − 1 must be seeds: was an OverflowError traceback from tuple(range(max)), and
        # 2**32, which passed, a MemoryError as the study loaded
        ({"min": 3, "max": 10**20, "target_halfwidth_pp": 1}, r"seeds.max must be at most 10,000 seeds"),
        ({"min": 3, "max": 2**32, "target_halfwidth_pp": 1}, r"seeds.max must be at most 10,000 seeds"),
    ],
)
def test_bad_adaptive_seeds_are_rejected(seeds, message, adaptive, study_file):
    with pytest.raises(CapasError, match=message):
        load_study(study_file(adaptive(seeds)))


def test_a_real_study_stops_each_variant_for_its_own_reason(tmp_path, adaptive, study_file):
    # lr: 0.003 instead of 0.001 after one epoch moves test accuracy by several pp from seed to seed
    # (200 test images); a target of 100 pp is met at min, one of 0.01 pp never is
    doc = adaptive({"min": 2, "max": 3, "target_halfwidth_pp": 0.01})
    doc["variations"][0]["alternatives"] = doc["variations"][0]["alternatives"][1:]
    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)  # noqa: SIM115 (closed with the test)
    outcome = run_study(study_file(doc), out=tmp_path / "narrow", workers=1, console=console)
    with Store(tmp_path / "narrow" / "study.sqlite") as store:
        rows = store.runs()
        recorded = store.get_meta("replication")
    assert sorted(rows) == [f"{v}/seed-{s}" for v in ("Flatten", "lr") for s in range(3)]
    assert recorded["lr"]["seeds"] == 3 and recorded["lr"]["stopped"] == MAX_REACHED
    assert "lr 3 seeds (max reached)" in outcome.markdown.read_text()
    # --seeds 2 reuses seeds 0 and 1: the store must not go on saying that lr ran 3 seeds and why it stopped
    outcome = run_study(study_file(doc), out=tmp_path / "narrow", workers=1, seeds=2, console=console)
    assert outcome.trained == 0
    with Store(tmp_path / "narrow" / "study.sqlite") as store:
        assert store.get_meta("study")["seeds"] == [0, 1] and store.get_meta("replication") is None
    doc["seeds"]["target_halfwidth_pp"] = 100.0
    outcome = run_study(study_file(doc), out=tmp_path / "wide", workers=1, console=console)
    with Store(tmp_path / "wide" / "study.sqlite") as store:
        assert sorted(store.runs()) == [f"{v}/seed-{s}" for v in ("Flatten", "lr") for s in range(2)]
        wide = store.get_meta("replication")["lr"]
    assert wide["seeds"] == 2 and wide["stopped"] == TARGET_REACHED and 0 < wide["half_width_pp"] <= 100


def _met_at_min(tmp_path, adaptive, study_file) -> StudyReport:
    """The report of an adaptive study (2 to 5 seeds) whose variants all meet the target at 2 seeds."""
    study = load_study(study_file(adaptive({"min": 2, "max": 5, "target_halfwidth_pp": 50.0})))
    with Store(tmp_path / "study.sqlite") as store:
        for seed, (base, gap, lr) in enumerate([(0.80, 0.70, 0.81), (0.82, 0.71, 0.825)]):
            _finish(store, "Flatten", seed, base)
            _finish(store, "GAP", seed, gap)
            _finish(store, "lr", seed, lr)
        assert next_runs(study, store.runs()) == []
        return dataclasses.replace(
            collect(study, store.runs()), replication=replication_status(study, store.runs())
        )


def test_the_header_names_the_seeds_that_ran_not_those_replication_could_have_added(
    tmp_path, adaptive, study_file
):
    report = _met_at_min(tmp_path, adaptive, study_file)
    assert header_lines(report)[0].endswith("seeds: 0, 1")
    # every variant's figures rest on all the seeds it ran: none is "2 of 5"
    assert [seeds_cell(v) for v in report.variants] == ["2", "2", "2"]


def test_the_header_says_the_intervals_ignore_that_the_seed_count_was_chosen_on_them(
    tmp_path, adaptive, study_file
):
    # stopping once the interval is narrow selects seeds whose differences happen to agree: an
    # interval computed as for a fixed count covers the true difference less often than it says
    report = _met_at_min(tmp_path, adaptive, study_file)
    line = next(line for line in header_lines(report) if line.startswith("Adaptive seeds"))
    assert "as if each variant's number of seeds had been fixed in advance" in line
    assert "less often than 95%" in line


def test_the_terminal_says_the_seeds_were_adaptive_and_what_that_does_to_the_intervals(
    tmp_path, adaptive, study_file
):
    # `capas study` prints the table and the sentences: its reader must learn there, not only in
    # report.md, that the intervals do not allow for the seed count having been chosen on them
    report = _met_at_min(tmp_path, adaptive, study_file)
    console = Console(file=io.StringIO(), width=100, color_system=None)
    print_report(report, console)
    printed = " ".join(console.file.getvalue().split())
    assert "Adaptive seeds (2 to 5," in printed and "GAP 2 seeds (target reached)" in printed
    assert "somewhat optimistic" in printed


def test_a_round_cut_short_pairs_the_seeds_it_left_unpaired_before_deciding_on_more(
    tmp_path, adaptive, study_file
):
    # killed in the round that gave GAP and the base seed 3: GAP's run finished, the base's did not.
    # The rerun must train the base's seed 3 and decide on 4 shared seeds, as the uninterrupted study
    # did; not give GAP seed 4 and leave its seed 3 unpaired (and the base's 'not run') for good.
    study = load_study(study_file(adaptive({"min": 3, "max": 5, "target_halfwidth_pp": 1.0})))
    with Store(tmp_path / "study.sqlite") as store:
        _first_round(store)
        _finish(store, "GAP", 3, 0.50)
        store.add_run("Flatten/seed-3", "Flatten", 3, {}, "x")  # pending: interrupted
        assert [(v.name, s) for v, s in next_runs(study, store.runs())] == [("Flatten", 3)]
        _finish(store, "Flatten", 3, 0.80)
        assert [(v.name, s) for v, s in next_runs(study, store.runs())] == [("GAP", 4), ("Flatten", 4)]


def test_a_seed_beyond_min_finished_under_other_settings_is_refused_not_reported(
    tmp_path, adaptive, study_file
):
    # GAP's seed 2 finished as GlobalAveragePooling2D under a fixed seed list; GAP then became
    # GlobalMaxPooling2D with adaptive seeds 0 to 2: replication counted that seed as tried and the
    # report rested GAP's figures on it, never comparing its settings (only seeds 0 and 1 are planned)
    doc = adaptive([2])
    doc["variations"][0]["alternatives"] = doc["variations"][0]["alternatives"][:1]
    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)  # noqa: SIM115 (closed with the test)
    run_study(study_file(doc), out=tmp_path / "out", workers=1, console=console)
    doc["seeds"] = {"min": 2, "max": 3, "target_halfwidth_pp": 1.0}
    doc["variations"][0]["alternatives"][0]["replace"]["with"] = "GlobalMaxPooling2D"
    with pytest.raises(CapasError, match=r"changed since these runs finished.*GAP/seed-2 \(spec.layers"):
        run_study(study_file(doc), out=tmp_path / "out", workers=1, console=console)
    with Store(tmp_path / "out" / "study.sqlite") as store:
        assert sorted(store.runs()) == ["Flatten/seed-2", "GAP/seed-2"]  # refused before any row was added
        assert store.get_meta("study")["seeds"] == [2]  # the store still describes the study it holds


def test_a_rerun_retries_a_failed_run_of_a_later_round(tmp_path, adaptive, study_file):
    # GAP's seed 2 (its second round) failed: its run directory's place held a file. `capas study`
    # said "rerun the same command to retry them"; the rerun counted the seed as tried and kept it failed.
    doc = adaptive({"min": 2, "max": 3, "target_halfwidth_pp": 0.01})
    doc["variations"][0]["alternatives"] = doc["variations"][0]["alternatives"][:1]
    out = tmp_path / "out"
    (out / "runs" / "GAP").mkdir(parents=True)
    (out / "runs" / "GAP" / "seed-2").write_text("in the way")
    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)  # noqa: SIM115 (closed with the test)
    assert run_study(study_file(doc), out=out, workers=1, console=console).failed == ["GAP/seed-2"]
    (out / "runs" / "GAP" / "seed-2").unlink()
    outcome = run_study(study_file(doc), out=out, workers=1, console=console)
    assert (outcome.trained, outcome.failed) == (1, [])
    with Store(out / "study.sqlite") as store:
        assert {row.status for row in store.runs().values()} == {"done"}
    assert "no figures from seed 2" not in outcome.markdown.read_text()
