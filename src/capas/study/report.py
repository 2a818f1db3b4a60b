"""The study report's model: every figure a study's runs support, typed, computed from the run store
alone (so a resumed study reports the same figures), and the architecture diff between the base and a
variant. The renderers in capas.study.render (Markdown, one HTML template, the terminal table) only
lay these figures out.

Which seeds a figure rests on (a diverged run counts: it is an outcome of its variant; a run that
crashed has no figures): each variant's row and its Δ on every seed it and the base both finished, so
a seed another variant lost stays in its comparison, and with adaptive replication the seeds a
variant was given for a narrower interval are in its figures. The base's row rests on every seed it
finished; when no run crashed and the seeds were not adaptive, that is every variant's seeds, and a
variant's mean minus the base's mean is its Δ.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import zip_longest

from capas.spec import LayerInfo
from capas.spec.io import flat_items
from capas.spec.summary import Summary, summarize
from capas.spec.train import SCHEDULE_READS, best_epoch
from capas.study.spec import Study, Variant
from capas.study.stats import Comparison, Estimate, binomial_se, holm, mean_ci, paired_comparison
from capas.study.store import RunRow

# What became of one seed of one variant.
OK, DIVERGED, AT_CHANCE, FAILED, NOT_RUN = "ok", "diverged", "at chance", "failed", "not run"
WITH_FIGURES = (OK, DIVERGED, AT_CHANCE)  # a finished run: its accuracy is a real outcome of its variant
CHANCE_SE = 3  # 'at chance': test accuracy within 3 binomial standard errors of the majority-class share


@dataclass(frozen=True)
class RunOutcome:
    """One seed of one variant: its status (OK, DIVERGED, AT_CHANCE, FAILED, NOT_RUN), why, its result."""

    seed: int
    status: str
    detail: str = ""
    result: dict | None = None


@dataclass(frozen=True)
class Note:
    """A remark on one variant that every renderer shows: `flag` in the table, `text` in its sentence.

    `warning` notes are also listed at the top of the report. New per-run facts (how many seeds
    adaptive replication needed, a BatchNorm evaluation gap) become notes by adding a rule to NOTES.
    """

    flag: str
    text: str
    warning: bool = False


@dataclass(frozen=True)
class VariantResult:
    """A variant, what became of each of its seeds, and its figures on the report's seeds."""

    variant: Variant
    summary: Summary
    runs: dict[int, RunOutcome]  # every seed of the study
    seeds: tuple[int, ...] = ()  # the seeds its figures rest on: those it shares with the base
    comparison: Comparison | None = None  # against the base on those seeds; None for the base
    p_adjusted: float = math.nan  # the comparison's p after Holm's adjustment over the variants tested
    notes: tuple[Note, ...] = field(default=())

    @property
    def name(self) -> str:
        return self.variant.name

    @property
    def finished(self) -> dict[int, dict]:
        """seed -> result of every run with figures, also those outside the report's seeds."""
        return {s: o.result for s, o in self.runs.items() if o.status in WITH_FIGURES and o.result}

    @property
    def results(self) -> dict[int, dict]:
        """seed -> result on the report's seeds."""
        finished = self.finished
        return {s: finished[s] for s in self.seeds if s in finished}

    def values(self, key: str) -> dict[int, float]:
        if key == "best_epoch" and not self.variant.train.get("early_stopping"):
            # such a run keeps its last epoch's weights, which its best_epoch names: its best validation
            # epoch is the one still_improving reads (NaN when no validation loss was finite)
            return {
                seed: float(best_epoch(r["history"], "val_loss") or math.nan)
                for seed, r in self.results.items()
            }
        return {seed: float(r[key]) for seed, r in self.results.items() if r.get(key) is not None}

    def estimate(self, key: str) -> Estimate:
        """Mean and CI over the report's seeds, counting only finite values (a diverged loss is NaN)."""
        return mean_ci([v for v in self.values(key).values() if math.isfinite(v)])

    def outcomes(self, *statuses: str) -> list[RunOutcome]:
        return [o for o in self.runs.values() if o.status in statuses]

    @property
    def stopped_early(self) -> str:
        """'0', or how many runs stopped before their last epoch and why (early stopping, a budget)."""
        reasons = Counter(r["stopped"] for r in self.results.values() if r["stopped"] != "max epochs")
        return ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())) or "0"

    @property
    def still_improving(self) -> list[int]:
        """Seeds that a budget (epochs, seconds, images) stopped while their best validation epoch was the
        last one: training ended while it still helped. A run that early stopping ended has converged by
        the criterion the report states (no improvement of at least min_delta for `patience` epochs),
        even if the monitored value crept on by less than min_delta."""
        monitor = (self.variant.train.get("early_stopping") or {}).get("monitor", "val_loss")
        return [
            s
            for s, r in self.finished.items()
            if r.get("stopped") != "early stopping"
            and r["history"]
            and best_epoch(r["history"], monitor) == len(r["history"])
        ]

    @property
    def not_converged(self) -> list[int]:
        """With early stopping configured, seeds that something else ended (the epoch ceiling, a time or
        sample budget) before its criterion was met: whatever their best epoch, they did not converge
        by the criterion the report states."""
        if not self.variant.train.get("early_stopping"):
            return []
        return [s for s, r in self.finished.items() if r.get("stopped") != "early stopping"]


@dataclass(frozen=True)
class StudyReport:
    study: Study
    variants: list[VariantResult]
    statuses: dict[str, int]  # runs per status
    seeds: tuple[int, ...]  # the base's figures: every seed it finished
    kind: str  # which comparison this is: equal budget or each variant at its own convergence
    test_size: int | None  # test images per run (None before any run finished)
    replication: dict[str, dict] | None = None  # adaptive replication per variant (run.replication_status)

    @property
    def base(self) -> VariantResult:
        return self.variants[0]

    @property
    def test_se(self) -> float:
        """The binomial standard error of one test accuracy at the base's mean, on test_size images."""
        accuracy = self.base.estimate("test_accuracy").mean
        return (
            binomial_se(accuracy, self.test_size) if self.test_size and math.isfinite(accuracy) else math.nan
        )

    @property
    def tested(self) -> list[VariantResult]:
        """The variants with a test against the base: Holm's family."""
        return [r for r in self.variants[1:] if not math.isnan(r.p_adjusted)]

    @property
    def warnings(self) -> list[str]:
        """What a reader must know before any figure: still-improving or unconverged variants, runs left out."""
        lines = []
        improving = [r.name for r in self.variants if r.still_improving]
        if improving:
            lines.append(
                f"Still improving at the budget: {', '.join(improving)} (a budget ended training at the best "
                "validation epoch in at least one seed). Their effects may shrink or grow with more training."
            )
        lines += [f"{r.name}: {note.text}" for r in self.variants for note in r.notes if note.warning]
        for r in self.variants:
            precisions = Counter(result.get("precision") for result in r.results.values())
            precisions.pop(None, None)  # runs from before test.json recorded it
            if len(precisions) > 1:
                counts = ", ".join(f"{n} in {p}" for p, n in sorted(precisions.items()))
                lines.append(
                    f"{r.name}: its seeds trained in different precisions ({counts}; `precision: auto` "
                    "chooses per machine): its figures mix them. Set train.precision to compare like with like."
                )
        return lines


def images_tested(result: dict) -> int:
    """Test images a run was evaluated on (its confusion matrix's total)."""
    return sum(map(sum, result["confusion_matrix"]))


def classify(row: RunRow | None, seed: int) -> RunOutcome:
    """A stored run as an outcome: a non-finite loss is DIVERGED, a test accuracy within CHANCE_SE
    standard errors of guessing the most frequent class is AT_CHANCE, a crash is FAILED."""
    if row is None or row.status in ("pending", "running"):
        return RunOutcome(seed, NOT_RUN)
    if row.status == "failed":
        last = (row.error or "").strip().splitlines()
        return RunOutcome(seed, FAILED, last[-1] if last else "no error recorded")
    result = row.result
    for metrics in result["history"]:
        for key in ("loss", "val_loss"):
            if not math.isfinite(metrics[key]):
                return RunOutcome(seed, DIVERGED, f"non-finite {key} at epoch {metrics['epoch']}", result)
    if not math.isfinite(result["test_loss"]):
        return RunOutcome(seed, DIVERGED, "non-finite test loss", result)
    matrix = result["confusion_matrix"]
    n = images_tested(result)
    chance = max(map(sum, matrix)) / n
    if result["test_accuracy"] <= chance + CHANCE_SE * binomial_se(chance, n):
        return RunOutcome(
            seed,
            AT_CHANCE,
            f"test accuracy {100 * result['test_accuracy']:.1f}%, chance {100 * chance:.0f}%",
            result,
        )
    return RunOutcome(seed, OK, "", result)


def _seed_list(outcomes: list[RunOutcome]) -> str:
    return ", ".join(f"seed {o.seed}" + (f" ({o.detail})" if o.detail else "") for o in outcomes)


def _still_improving_note(result: VariantResult) -> Note | None:
    seeds = result.still_improving
    if not seeds:
        return None
    of = f"{len(seeds)} of {len(result.finished)} seeds"
    return Note("still improving", f"still improving at the budget in {of}: the effect may shrink or grow")


def _not_converged_note(result: VariantResult) -> Note | None:
    seeds = result.not_converged
    if not seeds:
        return None
    stopping = result.variant.train["early_stopping"]
    ended = " or ".join(sorted({result.finished[s]["stopped"] for s in seeds}))
    return Note(
        "not converged",
        f"not converged in {len(seeds)} of {len(result.finished)} seeds: {ended} ended training before "
        f"early stopping's criterion ({stopping['patience']} epochs without an improvement of at least "
        f"{stopping.get('min_delta', 0):g} in {stopping['monitor']}) was met, so the effect is not measured "
        "at convergence",
        warning=True,
    )


def _diverged_note(result: VariantResult) -> Note | None:
    bad = result.outcomes(DIVERGED, AT_CHANCE)
    if not bad:
        return None
    kinds = "/".join(sorted({o.status for o in bad}))
    # a diverged loss is NaN: it cannot count in a mean, so those cells say how many seeds they rest on
    dropped = any(result.estimate(key).n < len(result.results) for key in ("val_loss", "test_loss"))
    kept = (
        "kept in the accuracy figures, its non-finite losses left out of the loss means (each says how many "
        "seeds it rests on)"
        if dropped
        else "kept in the figures"
    )
    return Note(
        f"{len(bad)} {kinds}",
        f"{len(bad)} of {len(result.runs)} seeds {kinds}, {kept}: {_seed_list(bad)}",
        warning=True,
    )


def _failed_note(result: VariantResult) -> Note | None:
    missing = result.outcomes(FAILED, NOT_RUN)
    if not missing:
        return None
    counts = Counter(o.status for o in missing)
    text = f"no figures from {_seed_list(missing)}"
    if result.finished:  # one with no finished seed has no figures at all: its sentence says so
        text += ("; that seed is" if len(missing) == 1 else "; those seeds are") + (
            " left out of every comparison"
            if result.comparison is None
            else " left out of its comparison with the base"
        )
    return Note(", ".join(f"{n} {status}" for status, n in sorted(counts.items())), text, warning=True)


def _compressed_note(result: VariantResult) -> Note | None:
    if "compress" not in result.variant.extras:
        return None
    return Note(
        "float model",
        "its figures are its float model's, before compression (the compressed model against it: below)",
    )


# Each rule turns what a variant's runs recorded into a Note (or None); renderers show notes generically.
NOTES: list[Callable[[VariantResult], Note | None]] = [
    _compressed_note,
    _still_improving_note,
    _not_converged_note,
    _diverged_note,
    _failed_note,
]


CONVERGENCE = "to its own convergence"  # how training_kind describes a variant with early stopping


def epochs_text(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def training_kind(train: dict) -> str:
    """How long one variant trains, from its resolved training config."""
    stopping = train.get("early_stopping")
    if stopping:
        kind = (
            f"{CONVERGENCE}: early stopping on {stopping['monitor']} (stopped after "
            f"{stopping['patience']} epochs without an improvement of at least {stopping.get('min_delta', 0):g}, "
            f"the best epoch's weights restored), at most {epochs_text(train['epochs'])}"
        )
    else:
        kind = f"an equal training budget: {epochs_text(train['epochs'])}, no early stopping"
    budgets = [
        f"{train['max_seconds']:g} s" if train.get("max_seconds") else "",
        f"{train['max_samples']:,} images" if train.get("max_samples") else "",
    ]
    if any(budgets):
        kind += ", or " + " or ".join(b for b in budgets if b) + " if that comes first"
    return kind


def comparison_kind(study: Study, not_converged: Sequence[str] = ()) -> str:
    """Which comparison the study makes: each variant at its own convergence, or at an equal budget.

    `not_converged` names the variants with early stopping of which a run did not meet its criterion:
    convergence is then what they trained towards, not what they reached."""
    kinds: dict[str, list[str]] = {}
    for variant in study.variants:
        kinds.setdefault(training_kind(variant.train), []).append(variant.name)
    if len(kinds) == 1:
        kind = next(iter(kinds))
        if not kind.startswith(CONVERGENCE):
            return f"every variant trained to {kind} (the effect at this budget, not at convergence)"
        if not not_converged:
            return f"each variant trained {kind}"
        text = f"each variant trained towards its own convergence{kind.removeprefix(CONVERGENCE)}"
    else:
        text = "mixed, the variants train differently: " + "; ".join(
            f"{', '.join(names)}: {kind}" for kind, names in kinds.items()
        )
    if not_converged:
        text += f"; convergence not reached in every run by {', '.join(not_converged)} (see the warnings)"
    return text


def collect(study: Study, rows: dict[str, RunRow]) -> StudyReport:
    """The report's figures: every variant of the study file with what became of each of its seeds."""
    names = {v.name for v in study.variants}
    by_key = {(r.variant, r.seed): r for r in rows.values() if r.variant in names and r.seed in study.seeds}
    statuses = dict(Counter(r.status for r in by_key.values()))
    variants = [
        VariantResult(
            v,
            summarize(v.model_spec),
            {
                s: classify(by_key.get((v.name, s)), s)
                for s in study.seeds
                # adaptive replication: a seed a variant never needed is not a missing run
                if study.replication is None or (v.name, s) in by_key
            },
        )
        for v in study.variants
    ]
    # the base on every seed it finished, each variant on every seed it shares with the base (the
    # paired test's seeds): a seed another variant lost stays in, and adaptive replication's extra
    # seeds narrow its interval
    base = replace(variants[0], seeds=tuple(s for s in study.seeds if s in variants[0].finished))
    others = [
        replace(v, seeds=tuple(s for s in study.seeds if s in v.finished and s in variants[0].finished))
        for v in variants[1:]
    ]
    variants = [base, *others]
    comparisons = [
        paired_comparison(v.values("test_accuracy"), replace(base, seeds=v.seeds).values("test_accuracy"))
        for v in others
    ]
    adjusted = holm([c.p_value for c in comparisons])
    variants[1:] = [
        replace(v, comparison=c, p_adjusted=p)
        for v, c, p in zip(variants[1:], comparisons, adjusted, strict=True)
    ]
    variants = [replace(v, notes=tuple(n for rule in NOTES if (n := rule(v)) is not None)) for v in variants]
    sizes = {images_tested(r) for v in variants for r in v.finished.values()}
    kind = comparison_kind(study, [v.name for v in variants if v.not_converged])
    return StudyReport(study, variants, statuses, base.seeds, kind, max(sizes) if sizes else None)


@dataclass(frozen=True)
class DiffRow:
    """One layer that differs between the base and a variant (before or after is None when absent)."""

    change: str  # replaced, keywords, inserted, removed, input changed, frozen, unfrozen
    before: LayerInfo | None
    after: LayerInfo | None


# --- architecture diff -------------------------------------------------------------------------


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


def diff_cells(row: DiffRow) -> list[str]:
    cells = [row.change]
    for info in (row.before, row.after):
        if info is None:
            cells += ["—", "—", "—"]
        else:
            cells += [
                _describe(info),
                str(tuple(info.output_shape)),
                info.layer.formula(info.input_shape),
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
        # an empty section (the base's extras) has no settings, not one named '' whose value is {}
        old_flat, new_flat = (flat_items(values) if values else {} for values in (old, new))
        for key in sorted(set(old_flat) | set(new_flat)):
            if old_flat.get(key) != new_flat.get(key) and not _unread(section, key, variant.train):
                lines.append(f"{section}.{key}: {old_flat.get(key)!r} → {new_flat.get(key)!r}")
    return lines


def _unread(section: str, key: str, train: dict) -> bool:
    """A schedule setting the variant's schedule does not read (its defaults where the base's linear
    schedule had a warm-up): listed, it read as a change (a constant rate 'with a 25% warm-up')."""
    setting = key.removeprefix("schedule.")
    schedule = (train.get("schedule") or {}).get("name")
    return (
        section == "train"
        and setting != key
        and setting in SCHEDULE_READS
        and schedule not in SCHEDULE_READS[setting]
    )
