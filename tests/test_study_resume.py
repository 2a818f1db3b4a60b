"""A real `capas study` process killed with SIGKILL resumes: finished runs are not repeated, and the
report's figures equal those of the same study run without interruption."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
from rich.console import Console

from capas.errors import CapasError
from capas.study.executors import Executor
from capas.study.render import HEADERS, table_rows
from capas.study.run import run_study

# figures that must not depend on the interruption (timings do, so they are left out)
COMPARED = [
    "variant",
    "params",
    "mult-adds",
    "val acc %",
    "val loss",
    "test acc %",
    "test loss",
    "best epoch",
    "Δ test acc pp (95% CI)",
    "p",
    "p (Holm)",
    "seeds",
    "stopped early",
    "notes",
]


def _state(out: Path) -> tuple[int, int]:
    """(runs done, running runs with an epoch checkpoint on disk), read without writing. The loop records
    an epoch in the store before it writes that epoch's checkpoint, so the store alone cannot say a
    running run has something to resume from."""
    db = out / "study.sqlite"
    if not db.exists():
        return 0, 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            done = con.execute("SELECT count(*) FROM runs WHERE status = 'done'").fetchone()[0]
            running = [r[0] for r in con.execute("SELECT id FROM runs WHERE status = 'running'")]
    except sqlite3.OperationalError:  # tables not created yet
        return 0, 0
    return done, sum((out / "runs" / rid / "checkpoint.safetensors").exists() for rid in running)


def _study_command(path: Path, out: Path) -> list[str]:
    """`capas study` with two pool workers, as its own process."""
    cli = [sys.executable, "-c", "from capas.cli import app; app()"]
    return [*cli, "study", str(path), "--out", str(out), "--workers", "2"]


def _figures(outcome) -> list[list[str]]:
    keep = [HEADERS.index(h) for h in COMPARED]
    return [[row[i] for i in keep] for row in table_rows(outcome.report)]


@pytest.mark.slow  # run by `bash scripts/test.sh -m slow` (README): the suite stays under 10 minutes
def test_sigkill_then_rerun_gives_the_uninterrupted_report(tmp_path, tiny_study, study_file):
    # 3 epochs on 1,500 images: runs long enough to be killed in the middle of one
    path = study_file(tiny_study(name="killed", train={"epochs": 3, "batch_size": 32}, data={"limit": 1500}))
    out = tmp_path / "killed"
    command = _study_command(path, out)
    # its own process group: the kill takes the driver and its worker processes down together,
    # as a machine going down would
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            done, partial = _state(out)
            if done >= 1 and partial >= 1:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the study finished before it could be interrupted"
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL

    with sqlite3.connect(out / "study.sqlite") as con:
        before = dict(con.execute("SELECT id, finished FROM runs WHERE status = 'done'").fetchall())
        interrupted = [r[0] for r in con.execute("SELECT id FROM runs WHERE status = 'running'")]
    assert before and interrupted
    # at least one half-finished run left an epoch checkpoint to resume from
    assert any((out / "runs" / rid / "checkpoint.safetensors").exists() for rid in interrupted)
    mtimes = {rid: (out / "runs" / rid / "model.safetensors").stat().st_mtime_ns for rid in before}

    console = Console(file=open(tmp_path / "log.txt", "w"))  # noqa: SIM115
    resumed = run_study(path, out=out, workers=2, console=console)
    assert resumed.skipped == len(before) and resumed.trained == 4 - len(before) and not resumed.failed
    with sqlite3.connect(out / "study.sqlite") as con:
        after = dict(con.execute("SELECT id, finished FROM runs").fetchall())
        attempts = dict(con.execute("SELECT id, attempts FROM runs").fetchall())
    for rid in before:  # finished runs were not repeated
        assert after[rid] == before[rid] and attempts[rid] == 1
        assert (out / "runs" / rid / "model.safetensors").stat().st_mtime_ns == mtimes[rid]
    assert all(attempts[rid] == 2 for rid in interrupted)

    clean = run_study(path, out=tmp_path / "clean", workers=2, console=console)
    assert _figures(resumed) == _figures(clean)


def _statuses(out: Path) -> dict[str, str]:
    """Each run's status, read without writing; empty before the store has its tables."""
    if not (out / "study.sqlite").exists():
        return {}
    try:
        with sqlite3.connect(f"file:{out / 'study.sqlite'}?mode=ro", uri=True) as con:
            return dict(con.execute("SELECT id, status FROM runs").fetchall())
    except sqlite3.OperationalError:  # tables not created yet
        return {}


@pytest.mark.slow  # run by `bash scripts/test.sh -m slow` (README): the suite stays under 10 minutes
def test_ctrl_c_stops_a_worker_pool_at_once(tmp_path, tiny_study, study_file):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) with two workers: the driver exits
    within seconds and no run that had not started is trained (queued runs were trained to the end
    after the interrupt, 22 s of work the user had cancelled)."""
    path = study_file(
        tiny_study(name="ctrl-c", train={"epochs": 3, "batch_size": 32}, data={"limit": 1500}, seeds=4)
    )
    out = tmp_path / "ctrl-c"
    process = subprocess.Popen(
        _study_command(path, out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        # as from a terminal: a test session started in the background by a script inherits SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if "running" in _statuses(out).values():
                break
            time.sleep(0.05)
        assert process.poll() is None, "the study finished before it could be interrupted"
        waiting = [rid for rid, status in _statuses(out).items() if status == "pending"]
        os.killpg(process.pid, signal.SIGINT)
        interrupted = time.monotonic()
        process.wait(30)
        stopped_after = time.monotonic() - interrupted
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130 and stopped_after < 10, (process.returncode, stopped_after)
    assert waiting, "no run was waiting"
    trained_anyway = [rid for rid in waiting if (out / "runs" / rid / "test.json").exists()]
    assert not trained_anyway


def _children(pid: int) -> set[int]:
    """Processes whose parent is `pid`, from /proc (Linux)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow  # run by `bash scripts/test.sh -m slow` (README): the suite stays under 10 minutes
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_workers_die_with_a_killed_driver(tmp_path, tiny_study, study_file):
    # only the driver is killed (not its process group): its training workers must not live on
    path = study_file(
        tiny_study(name="orphans", train={"epochs": 20, "batch_size": 32}, data={"limit": 1500})
    )
    out = tmp_path / "orphans"
    command = _study_command(path, out)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    workers: set[int] = set()
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if (out / "runs").exists() and any((out / "runs").rglob("*.lock")):
                workers = {pid for pid in _children(process.pid) if "spawn_main" in _cmdline(pid)}
                if len(workers) == 2:
                    break
            time.sleep(0.05)
        assert process.poll() is None and len(workers) == 2, "no two training workers seen"
        process.kill()
    finally:
        process.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.05)
    left = [pid for pid in workers if _alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers {left} outlived the driver"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class _WorkersThatNeverStart(Executor):
    """What the driver sees when its spawned workers end while they import the main script (a script
    that calls run_study outside `if __name__ == "__main__":` runs it again in each, refused: locked)."""

    name, workers = "pool", 2

    def submit(self, task: dict) -> Future:
        future = Future()
        future.set_exception(BrokenProcessPool("A process in the process pool was terminated abruptly"))
        return future

    def events(self) -> list[dict]:
        return []

    def close(self, cancel: bool = False) -> None:
        pass


def test_workers_that_end_before_any_run_starts_are_not_called_out_of_memory(
    tmp_path, tiny_study, study_file
):
    """The driver said "a worker process died (out of memory or killed) … rerun the same command",
    which failed the same way every time."""
    with pytest.raises(CapasError, match=r'before any run started.*if __name__ == "__main__":'):
        run_study(
            study_file(tiny_study()),
            out=tmp_path / "study",
            executor=_WorkersThatNeverStart(),
            console=Console(file=io.StringIO()),
        )


class _AWorkerKilledMidRun(_WorkersThatNeverStart):
    """Two runs start training, then one's worker process is killed (the OOM killer): the pool fails
    every future, and cannot tell which run's process it was."""

    def __init__(self):
        self.submitted: list[str] = []

    def submit(self, task: dict) -> Future:
        self.submitted.append(task["id"])
        return super().submit(task)

    def events(self) -> list[dict]:
        started, self.submitted = self.submitted[:2], []
        return [{"run": rid, "event": "start", "total": 10, "done": 0} for rid in started]


def test_a_worker_killed_mid_run_names_the_runs_that_were_training(tmp_path, tiny_study, study_file):
    """The one line said a worker process died, not which runs were training when it did."""
    with pytest.raises(CapasError) as error:
        run_study(
            study_file(tiny_study()),
            out=tmp_path / "study",
            executor=_AWorkerKilledMidRun(),
            console=Console(file=io.StringIO()),
        )
    assert str(error.value) == (
        "a worker process died (out of memory or killed) while these runs trained: Flatten/seed-0, "
        "Flatten/seed-1; finished runs are kept, rerun the same command to resume the others"
    )


def test_a_run_killed_while_swapped_in_and_then_edited_starts_over(tmp_path, tiny_study, study_file):
    """A run killed between staging's two renames (its checkpoint moved aside, .seed-0.old-*), then its
    settings edited: the restart deleted nothing, the worker's train moved the old checkpoint back and
    refused it (other settings), and the run failed."""
    doc = tiny_study()
    with pytest.raises(CapasError, match="a worker process died"):  # two runs were training
        run_study(
            study_file(doc),
            out=tmp_path / "s",
            executor=_AWorkerKilledMidRun(),
            console=Console(file=io.StringIO()),
        )
    variant = tmp_path / "s" / "runs" / "Flatten"
    (variant / ".seed-0.old-k1lled_x").mkdir(parents=True)  # what the kill left: no seed-0, its run aside
    (variant / ".seed-0.old-k1lled_x" / "checkpoint.safetensors").write_text("of the old settings")
    doc["base"]["train"]["epochs"] = 2

    def no_cluster(runs: int):
        raise CapasError("cannot start or join the Ray cluster at auto")

    with (
        pytest.raises(CapasError, match="cannot start"),
        pytest.warns(UserWarning, match="seed-0: moved back"),
    ):
        run_study(
            study_file(doc), out=tmp_path / "s", executor=no_cluster, console=Console(file=io.StringIO())
        )
    assert list(variant.iterdir()) == []  # restarted: nothing of the old run is left to resume
