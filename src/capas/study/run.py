"""`run_study`: validate a study, plan its runs against the store, execute them, write the report.

STUDY_DIR/
  study.sqlite              runs: status, config, per-epoch metrics, final metrics, timings
  runs/<variant>/seed-<k>/  each run's own run directory (capas.train.train)
  report.md, report.html    the report; plots/*.png
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from capas.data import default_preprocess, load_dataset, splits_for
from capas.errors import CapasError, first_of
from capas.inference import resolve_device
from capas.lock import LOCK, exclusive
from capas.runs import recover
from capas.spec import DataConfig, ModelSpec, TrainConfig
from capas.spec.io import config_changes, unrecorded
from capas.study.executors import Executor, RunTask, make_executor
from capas.study.render import write_report
from capas.study.report import StudyReport, collect
from capas.study.spec import Study, Variant, config_hash, directory_name, load_study
from capas.study.store import RunRow, Store
from capas.train import CHECKPOINT, check_settings
from capas.train.checkpoint import checkpoint_identity

DATABASE = "study.sqlite"
POLL_SECONDS = 0.2  # how often the driver collects progress events while runs train


@dataclass(frozen=True)
class StudyOutcome:
    directory: Path
    report: StudyReport
    markdown: Path
    html: Path
    trained: int  # runs executed by this call (finished, resumed or failed)
    skipped: int  # runs already done before this call
    failed: list[str]
    seconds: float


def run_id(variant_name: str, seed: int) -> str:
    return f"{directory_name(variant_name)}/seed-{seed}"


def check_classes(study: Study) -> None:
    """Every variant must take images capas can feed it (1 or 3 channels), pass what `train` refuses
    before loading data, and end in as many units as the dataset has classes: checked before any training."""
    data = study.base.data
    classes = load_dataset(data["name"], data["data_dir"])[0].classes
    for variant in study.variants:
        try:
            default_preprocess(variant.model_spec.input_shape)
            check_settings(variant.model_spec, TrainConfig.model_validate(variant.train))
        except CapasError as err:
            raise CapasError(f"{study.source}: variant {variant.name!r}: {err}") from None
        units = variant.model_spec.output_shape
        if units != (len(classes),):
            raise CapasError(
                f"{study.source}: variant {variant.name!r} outputs {units} but {data['name']} has {len(classes)} classes; "
                f"end the model with Dense: {{units: {len(classes)}, activation: softmax}}"
            )


def plan(
    study: Study,
    store: Store,
    directory: Path,
    console: Console,
    runs: list[tuple[Variant, int]] | None = None,
) -> tuple[list[RunTask], int]:
    """The runs still to do of `runs` (default: the study's initial runs); finished runs are skipped,
    and a finished run whose config the study file now changes is an error rather than a silent mix
    of old and new results — in the store, or in a run directory the store does not know of (its
    rows deleted, or left by another study in the same --out)."""
    folders = {directory_name(v.name): v for v in study.variants}
    for rid, row in store.runs().items():
        # a variant renamed to a name with the same folder ('GAP pool' -> 'GAP-pool') keeps its runs
        # under its new name: the report and replication find them by name, plan by folder
        variant = folders.get(rid.rsplit("/", 1)[0])
        if (
            variant is not None
            and row.variant != variant.name
            and row.config_hash == config_hash(variant.run_config(row.seed))
        ):
            store.rename(rid, variant.name)
    rows = store.runs()
    changed_done, todo, actions, done = [], [], [], 0
    # every finished run the report and adaptive replication read, planned now or not (an earlier
    # invocation's seeds beyond this round's, e.g. of a fixed seed list before `seeds: {min, max}`)
    variants = {v.name: v for v in study.variants}
    for rid, row in rows.items():
        if row.status == "done" and row.variant in variants and row.seed in study.seeds:
            config = variants[row.variant].run_config(row.seed)
            if row.config_hash != config_hash(config):
                changed_done.append(f"{rid} ({'; '.join(config_changes(row.config, config)[:4])})")
    for variant, seed in study.runs() if runs is None else runs:
        rid = run_id(variant.name, seed)
        config = variant.run_config(seed)
        digest = config_hash(config)
        row = rows.get(rid)
        if row is not None and row.config_hash != digest:
            if row.status == "done":
                continue  # named above
            actions.append(("restart", rid, variant, seed, config, digest))
        elif row is None:
            actions.append(("add", rid, variant, seed, config, digest))
        elif row.status == "done":
            done += 1
            continue
        else:
            actions.append(("resume", rid, variant, seed, config, digest))
    for action, rid, _, _, config, _ in actions:
        # a run killed while it was swapped in (staging) is whole again before it is looked at, and
        # before a restart deletes it: its worker would move the old one back after the deletion
        recover(directory / "runs" / rid)
        if action != "restart" and (what := _finished_otherwise(directory / "runs" / rid, config)):
            changed_done.append(f"{rid} ({'; '.join(what[:4])})")
    if changed_done:
        raise CapasError(
            f"the settings {study.source} gives changed since these runs finished in {directory} (an edit of "
            f"the file, or another default of a newer capas): {', '.join(changed_done)}. "
            "Their results would mix with the new settings; use another --out directory, or delete those runs' "
            "folders and rows to retrain them."
        )
    if actions and (changed_data := _data_changed(study, rows, directory)):
        raise CapasError(
            f"the dataset changed since these runs finished in {directory}: {', '.join(changed_data)}. "
            "Runs trained now would be tested on other images than theirs, and the report would pair "
            "them as one study; use another --out directory, or restore the dataset's files."
        )
    for action, rid, variant, seed, config, digest in actions:
        out = directory / "runs" / rid
        if action == "restart":
            console.print(f"{rid}: its config changed before it finished; starting it over", highlight=False)
            shutil.rmtree(out, ignore_errors=True)
        elif action == "resume" and (missing := _older_checkpoint(out / CHECKPOINT, config)):
            # train would refuse to resume it for ever: the study has no --restart to give
            console.print(
                f"{rid}: its checkpoint was written by an older capas, which did not record {missing}; "
                "starting it over",
                highlight=False,
            )
            shutil.rmtree(out, ignore_errors=True)
        if action in ("add", "restart"):
            store.add_run(rid, variant.name, seed, config, digest)
        else:
            store.reset(rid)
        todo.append(
            RunTask(
                rid,
                variant.name,
                seed,
                config["spec"],
                config["train"],
                config["data"],
                config["extras"],
                str(out),
            )
        )
    return todo, done


def _finished_otherwise(out: Path, config: dict) -> list[str]:
    """How the finished run in `out` (test.json written, no checkpoint: `execute_run` would read it
    back instead of training) was made otherwise than `config` says; empty if it was not, or if
    `out` holds no finished run. Settings left to `auto` are not compared with what they resolved to
    (another machine may resolve them otherwise)."""
    if not (out / "test.json").is_file() or (out / CHECKPOINT).exists():
        return []
    try:
        made = {
            "spec": json.loads((out / "model.json").read_text()),
            **{key: json.loads((out / "config.json").read_text())[key] for key in ("data", "train")},
        }
    except (OSError, ValueError, KeyError) as error:
        return [f"its model.json or config.json cannot be read ({error})"]
    asked = {
        "spec": ModelSpec.from_dict(config["spec"]).to_dict(),
        "data": DataConfig.model_validate(config["data"]).model_dump(mode="json"),
        "train": TrainConfig.model_validate(config["train"]).model_dump(mode="json"),
    }
    for key, value in asked["train"].items():
        if value == "auto" and isinstance(made["train"], dict):
            made["train"][key] = "auto"
    return config_changes(made, asked)


def _older_checkpoint(path: Path, config: dict) -> str:
    """The settings this capas records that the checkpoint at `path` (an older capas') lacks, as
    train's refusal names them; empty if it records them all, is absent or is damaged (the run then
    fails with train's own message)."""
    if not path.exists():
        return ""
    try:
        saved = checkpoint_identity(path) or {}  # an older capas' checkpoint may record no settings
    except CapasError:
        return ""
    asked = {
        "spec": ModelSpec.from_dict(config["spec"]).to_dict(),
        "data": DataConfig.model_validate(config["data"]).model_dump(mode="json"),
        "train": TrainConfig.model_validate(config["train"]).model_dump(mode="json"),
        "splits": {},
    }
    return unrecorded(saved, asked)


def _data_changed(study: Study, rows: dict[str, RunRow], directory: Path) -> list[str]:
    """The study's finished runs whose splits (config.json: sizes and digests) the dataset, as it is
    now, no longer gives: a folder that gained, lost or changed images since."""
    names, now, changed = {v.name for v in study.variants}, {}, []
    for rid, row in rows.items():
        if row.variant not in names or row.status != "done":
            continue
        try:
            made = json.loads((directory / "runs" / rid / "config.json").read_text())["splits"]
        except (OSError, ValueError, KeyError):
            continue
        key = json.dumps(row.config["data"], sort_keys=True)
        if key not in now:
            now[key] = splits_for(DataConfig.model_validate(row.config["data"])).info
        if any(part in made and made[part] != now[key][part] for part in ("sizes", "sha256")):
            sizes = config_changes(made["sizes"], now[key]["sizes"])
            changed.append(f"{rid} ({'; '.join(sizes) if sizes else 'as many images, other ones'})")
    return changed


def _tried(study: Study, rows: dict[str, RunRow]) -> dict[str, dict[int, float | None]]:
    """Per variant, its seeds that finished (test accuracy) or failed (None)."""
    names = {v.name for v in study.variants}
    tried: dict[str, dict[int, float | None]] = {v.name: {} for v in study.variants}
    for row in rows.values():
        if row.variant in names and row.seed in study.seeds and row.status in ("done", "failed"):
            value = row.result["test_accuracy"] if row.status == "done" else None
            tried[row.variant][row.seed] = value
    return tried


def replication_status(study: Study, rows: dict[str, RunRow]) -> dict[str, dict]:
    """Adaptive replication per variant (the base excluded): seeds run, the CI half-width of the
    difference from the base in pp, and why it stopped (None: it still needs seeds)."""
    from capas.study.stats import paired_comparison

    tried = _tried(study, rows)
    finished = {name: {s: v for s, v in seeds.items() if v is not None} for name, seeds in tried.items()}
    base = finished[study.base.name]
    status = {}
    for variant in study.variants[1:]:
        values = finished[variant.name]
        half = 100 * paired_comparison(values, base).difference.half_width
        status[variant.name] = {
            "seeds": len(tried[variant.name]),
            "half_width_pp": None if half != half else half,  # NaN: fewer than two shared seeds
            "stopped": study.replication.decide(values, base, len(tried[variant.name])),
        }
    return status


def next_runs(study: Study, rows: dict[str, RunRow]) -> list[tuple[Variant, int]]:
    """The next round of adaptive replication: one more seed for each variant that needs one (its
    lowest seed not yet tried), and those seeds for the base where it lacks them, for pairing.

    A round cut short (the driver killed) can leave a variant's seed without the base's: that seed is
    trained first, alone, so that every decision rests on the pairs an uninterrupted study had."""
    tried = _tried(study, rows)
    unpaired = {s for v in study.variants[1:] for s in tried[v.name]} - set(tried[study.base.name])
    if unpaired:
        return [(study.base, seed) for seed in sorted(unpaired)]
    runs, base_needs = [], set()
    for variant, state in zip(study.variants[1:], replication_status(study, rows).values(), strict=True):
        if state["stopped"] is None:
            seed = next(s for s in study.seeds if s not in tried[variant.name])
            runs.append((variant, seed))
            base_needs.add(seed)
    runs += [(study.base, seed) for seed in sorted(base_needs - set(tried[study.base.name]))]
    return runs


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def execute(
    tasks: list[RunTask], executor: Executor, store: Store, total: int, done: int, console: Console
) -> list[str]:
    """Submit every task and record what comes back; returns the ids of failed runs. The caller
    closes the executor (it may run several rounds of tasks)."""
    failed, finished, started = [], set(), set()
    with _progress(console) as progress:
        overall = progress.add_task(
            "[bold]runs", total=total, completed=done, note=f"{executor.workers} worker(s)"
        )
        bars: dict[str, int] = {}
        futures: dict[Future, str] = {executor.submit(task.to_dict()): task.id for task in tasks}
        pending = set(futures)

        def handle_events() -> None:
            for event in executor.events():
                rid = event["run"]
                if rid in finished:
                    continue  # late events of a run already recorded with its whole history
                if event["event"] == "start":
                    store.start(rid)
                    started.add(rid)
                    bars[rid] = progress.add_task(
                        f"  {rid}", total=event["total"], completed=event["done"], note=""
                    )
                elif event["event"] == "steps" and rid in bars:
                    progress.advance(bars[rid], event["n"])
                elif event["event"] == "epoch":
                    store.add_epoch(rid, event["metrics"])
                    m = event["metrics"]
                    if rid in bars:
                        progress.update(bars[rid], note=f"epoch {m['epoch']} val_acc {m['val_accuracy']:.3f}")

        while pending:
            completed, pending = wait(pending, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            handle_events()
            for future in completed:
                rid = futures[future]
                finished.add(rid)
                if rid in bars:
                    progress.remove_task(bars.pop(rid))
                try:
                    result = future.result()
                except CapasError as error:
                    store.fail(rid, str(error))
                    failed.append(rid)
                    console.print(f"[red]{rid} failed:[/] {escape(str(error))}", highlight=False)
                except BrokenProcessPool:
                    if not started:
                        # spawned workers import the main script again: unguarded, it runs the
                        # study once more in each (refused: the directory is locked) and they end
                        raise CapasError(
                            "the worker processes ended before any run started training (their errors are "
                            'above); from a script, call run_study under `if __name__ == "__main__":` '
                            "(each worker process imports the script again) or pass workers=1; else they "
                            "ran out of memory or were killed. Finished runs are kept"
                        ) from None
                    # the pool cannot tell which run's process it was: name those that were training
                    running = [rid for rid, row in store.runs().items() if row.status == "running"]
                    during = f" while these runs trained: {first_of(running, 8)}" if running else ""
                    raise CapasError(
                        f"a worker process died (out of memory or killed){during}; finished runs are kept, "
                        "rerun the same command to resume the others"
                    ) from None
                except Exception as error:  # a bug or a resource problem in one run must not lose the others
                    store.fail(rid, "".join(traceback.format_exception(error)))
                    failed.append(rid)
                    console.print(
                        f"[red]{rid} failed:[/] {type(error).__name__}: {escape(str(error))}", highlight=False
                    )
                else:
                    store.finish(rid, result)
                progress.advance(overall)
    return failed


STUDY_FILES = ("runs", "plots", "report.md", "report.html", LOCK)  # and DATABASE with its journal


def check_study_out(directory: Path) -> None:
    """Refuse a study folder that holds what a study does not write (a run, a user's files): the study
    would mix its database, runs and report into it. One that lost its database (its runs are read
    back) is a study's."""
    if not directory.is_dir():
        return
    names = sorted(
        entry.name
        for entry in directory.iterdir()
        if entry.name not in STUDY_FILES and not entry.name.startswith((DATABASE, "."))
    )
    if names:
        raise CapasError(
            f"{directory}: not a study directory (it holds {first_of(names, 3)}); a study writes its "
            "database, runs and report there: choose another --out, or an empty folder"
        )


def run_study(
    path: str | Path,
    *,
    out: str | Path | None = None,
    workers: int | None = None,
    data: str | None = None,
    seeds: int | None = None,
    input_shape: list[int] | None = None,
    executor: Executor | Callable[[int], Executor] | None = None,
    console: Console | None = None,
) -> StudyOutcome:
    """Run (or resume) every variant × seed of a study file and write its report.

    `out` defaults to studies/<study name>; `executor` defaults to the local pool sized by `workers`.
    It may also be a function of the number of runs to do that makes the executor: called only once
    the study is validated and there is something to run (starting a Ray instance takes seconds). An
    executor given is closed once the study has planned its runs, whether or not any was left to do.
    """
    console = console or Console(stderr=True, emoji=False)
    started = time.perf_counter()
    study = load_study(path, data=data, seeds=seeds, input_shape=input_shape)
    check_classes(study)
    directory = Path(out) if out is not None else Path("studies") / directory_name(study.name)
    check_study_out(directory)
    # one driver per study directory: a second one would restart runs the first is training
    with exclusive(directory, "study directory"), Store(directory / DATABASE) as store:
        variants = {v.name: v for v in study.variants}
        # a rerun retries every failed run: plan takes the first round's, these are adaptive rounds'
        # (replication counts a failed seed as tried and would never train it again)
        retry = [
            (variants[row.variant], row.seed)
            for row in store.runs().values()
            if row.status == "failed"
            and row.variant in variants
            and row.seed in study.seeds
            and row.seed not in study.initial_seeds
        ]
        tasks, done = plan(study, store, directory, console, study.runs() + retry)
        # once planned: a study refused for its changes must not become the store's description
        store.set_meta(
            "study",
            {
                "name": study.name,
                "source": study.source,
                "design": study.design,
                "seeds": list(study.seeds),
                "variants": [v.name for v in study.variants],
            },
        )
        total = len(study.runs())
        console.print(
            f"study [bold]{escape(study.name)}[/]: {len(study.variants)} variants × {len(study.initial_seeds)} seeds = {total} runs"
            + (f", {done} already done" if done else "")
            + (
                f" (then up to {study.replication.max} seeds per variant, until the difference's 95% CI "
                f"is within ±{study.replication.target_halfwidth_pp:g} pp)"
                if study.replication
                else ""
            )
            + f" -> {directory}",
            highlight=False,
        )
        failed, trained = [], len(tasks)
        # made once there is something to run, or given; closed at the end (a Ray instance it started
        # stayed up when nothing was left to run)
        made: list[Executor] = [executor] if isinstance(executor, Executor) else []

        def run(tasks: list[RunTask], total: int, done: int) -> None:
            if not made:
                if executor is None:
                    made.append(
                        make_executor(
                            workers,
                            len(tasks),
                            threads=max(v.train["threads"] or 1 for v in study.variants),
                            cuda=any(
                                resolve_device(v.train["device"]).type == "cuda" for v in study.variants
                            ),
                        )
                    )
                else:
                    made.append(executor(len(tasks)))
            failed.extend(execute(tasks, made[0], store, total, done, console))

        try:
            if tasks:
                run(tasks, total + len(retry), done)
            while study.replication is not None:
                store.set_meta("replication", replication_status(study, store.runs()))
                more = next_runs(study, store.runs())
                if not more:
                    break
                tasks, done = plan(study, store, directory, console, more)
                trained += len(tasks)
                if tasks:
                    names = sorted({v.name for v, _ in more if v is not study.base})
                    console.print(
                        f"one more seed for {', '.join(names)}"
                        if names
                        else f"{study.base.name}: the seeds of the round cut short, for pairing",
                        highlight=False,
                        markup=False,
                    )
                    run(tasks, len(more), done)
        except BaseException:
            for pool in made:
                pool.close(cancel=True)
            raise
        for pool in made:
            pool.close()
        report = collect(study, store.runs())
        if study.replication is not None:
            report = dataclasses.replace(report, replication=replication_status(study, store.runs()))
        # also with fixed seeds: an earlier adaptive invocation's status no longer describes the study
        store.set_meta("replication", report.replication)
    markdown, page = write_report(report, directory)
    return StudyOutcome(
        directory, report, markdown, page, trained, done, failed, time.perf_counter() - started
    )


__all__ = ["StudyOutcome", "run_study"]
