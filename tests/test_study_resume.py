"""A real `capas study` process killed with SIGKILL resumes: finished runs are not repeated, and the
report's figures equal those of the same study run without interruption."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

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


def _figures(outcome) -> list[list[str]]:
    keep = [HEADERS.index(h) for h in COMPARED]
    return [[row[i] for i in keep] for row in table_rows(outcome.report)]


def test_sigkill_then_rerun_gives_the_uninterrupted_report(tmp_path, tiny_study, study_file):
    # 3 epochs on 1,500 images: runs long enough to be killed in the middle of one
    path = study_file(tiny_study(name="killed", train={"epochs": 3, "batch_size": 32}, data={"limit": 1500}))
    out = tmp_path / "killed"
    command = [
        sys.executable,
        "-c",
        "from capas.cli import app; app()",
        "study",
        str(path),
        "--out",
        str(out),
        "--workers",
        "2",
    ]
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
