"""`run_study`: validate a study, plan its runs against the store, execute them, write the report.

STUDY_DIR/
  study.sqlite              runs: status, config, per-epoch metrics, final metrics, timings
  runs/<variant>/seed-<k>/  each run's own run directory (capas.train.train)
  report.md, report.html    the report; plots/*.png
"""

from __future__ import annotations

import shutil
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from capas.data import load_dataset
from capas.errors import CapasError
from capas.inference import resolve_device
from capas.lock import exclusive
from capas.spec.io import config_changes
from capas.study.executors import Executor, RunTask, make_executor
from capas.study.render import write_report
from capas.study.report import StudyReport, collect
from capas.study.spec import Study, config_hash, directory_name, load_study
from capas.study.store import Store

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
    """Every variant must end in as many units as the dataset has classes: checked before any training."""
    data = study.base.data
    classes = load_dataset(data["name"], data["data_dir"])[0].classes
    for variant in study.variants:
        units = variant.model_spec.output_shape
        if units != (len(classes),):
            raise CapasError(
                f"{study.source}: variant {variant.name!r} outputs {units} but {data['name']} has {len(classes)} classes; "
                f"end the model with Dense: {{units: {len(classes)}, activation: softmax}}"
            )


def plan(study: Study, store: Store, directory: Path, console: Console) -> tuple[list[RunTask], int]:
    """The runs still to do; finished runs are skipped, and a finished run whose config the study file
    now changes is an error rather than a silent mix of old and new results."""
    rows = store.runs()
    changed_done, todo, actions, done = [], [], [], 0
    for variant, seed in study.runs():
        rid = run_id(variant.name, seed)
        config = variant.run_config(seed)
        digest = config_hash(config)
        row = rows.get(rid)
        if row is not None and row.config_hash != digest:
            what = config_changes(row.config, config)
            if row.status == "done":
                changed_done.append(f"{rid} ({'; '.join(what[:4])})")
                continue
            actions.append(("restart", rid, variant, seed, config, digest))
        elif row is None:
            actions.append(("add", rid, variant, seed, config, digest))
        elif row.status == "done":
            done += 1
            continue
        else:
            actions.append(("resume", rid, variant, seed, config, digest))
    if changed_done:
        raise CapasError(
            f"{study.source} changed since these runs finished in {directory}: {', '.join(changed_done)}. "
            "Their results would mix with the new settings; use another --out directory, or delete those runs' "
            "folders and rows to retrain them."
        )
    for action, rid, variant, seed, config, digest in actions:
        out = directory / "runs" / rid
        if action == "restart":
            console.print(f"{rid}: its config changed before it finished; starting it over", highlight=False)
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
    """Submit every task and record what comes back; returns the ids of failed runs."""
    failed, finished = [], set()
    with _progress(console) as progress, executor:
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
                    console.print(f"[red]{rid} failed:[/] {error}", highlight=False)
                except BrokenProcessPool:
                    raise CapasError(
                        "a worker process died (out of memory or killed); finished runs are kept, "
                        "rerun the same command to resume the others"
                    ) from None
                except Exception as error:  # a bug or a resource problem in one run must not lose the others
                    store.fail(rid, "".join(traceback.format_exception(error)))
                    failed.append(rid)
                    console.print(f"[red]{rid} failed:[/] {type(error).__name__}: {error}", highlight=False)
                else:
                    store.finish(rid, result)
                progress.advance(overall)
    return failed


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
    the study is validated and there is something to run (starting a Ray instance takes seconds).
    """
    console = console or Console(stderr=True)
    started = time.perf_counter()
    study = load_study(path, data=data, seeds=seeds, input_shape=input_shape)
    check_classes(study)
    directory = Path(out) if out is not None else Path("studies") / directory_name(study.name)
    # one driver per study directory: a second one would restart runs the first is training
    with exclusive(directory, "study directory"), Store(directory / DATABASE) as store:
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
        tasks, done = plan(study, store, directory, console)
        total = len(study.runs())
        console.print(
            f"study [bold]{study.name}[/]: {len(study.variants)} variants × {len(study.seeds)} seeds = {total} runs"
            + (f", {done} already done" if done else "")
            + f" -> {directory}",
            highlight=False,
        )
        failed = []
        if tasks:
            if executor is None:
                executor = make_executor(
                    workers,
                    len(tasks),
                    threads=max(v.train["threads"] or 1 for v in study.variants),
                    cuda=any(resolve_device(v.train["device"]).type == "cuda" for v in study.variants),
                )
            elif not isinstance(executor, Executor):
                executor = executor(len(tasks))
            failed = execute(tasks, executor, store, total, done, console)
        report = collect(study, store.runs())
    markdown, page = write_report(report, directory)
    return StudyOutcome(
        directory, report, markdown, page, len(tasks), done, failed, time.perf_counter() - started
    )


__all__ = ["StudyOutcome", "run_study"]
