"""The run store: one SQLite file per study (standard library sqlite3, WAL mode), written by the driver only.

Workers never open it: they return their results to the driver, which records them. Each method
is one transaction, committed before it returns, and WAL makes a commit survive a kill -9 of the
process, so the store always says which runs finished, whatever happens to the driver.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capas.errors import CapasError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,            -- '<variant folder>/seed-<k>'
    variant TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    config TEXT NOT NULL,           -- JSON: spec, train, data, extras
    config_hash TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    started REAL,                   -- unix time of the last start
    finished REAL,
    seconds REAL,                   -- wall-clock seconds of the run as the worker measured it
    result TEXT,                    -- JSON: test.json plus history, timings and where it ran
    error TEXT
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL REFERENCES runs(id),
    epoch INTEGER NOT NULL,
    metrics TEXT NOT NULL,          -- JSON: loss, accuracy, val_loss, val_accuracy, lr, seconds, images_per_s
    PRIMARY KEY (run_id, epoch)
);
"""


@dataclass(frozen=True)
class RunRow:
    id: str
    variant: str
    seed: int
    status: str
    config: dict
    config_hash: str
    attempts: int
    started: float | None
    finished: float | None
    seconds: float | None
    result: dict | None
    error: str | None


class Store:
    """The study database; every method is one committed transaction."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.made = not self.path.exists()  # by this call: deleted again if no run started (__exit__)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # autocommit: each statement is its own transaction, committed before the call returns
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable against process kills
            self.db.executescript(SCHEMA)
            # damage in a page that opening does not read would otherwise surface later, as a traceback
            if (check := self.db.execute("PRAGMA quick_check(1)").fetchone()[0]) != "ok":
                raise sqlite3.DatabaseError(check.replace("\n", " "))
        except sqlite3.DatabaseError as error:
            # the primary result code; quick_check's finding (raised above) has none: damage
            if getattr(error, "sqlite_errorcode", sqlite3.SQLITE_CORRUPT) & 0xFF not in (
                sqlite3.SQLITE_CORRUPT,
                sqlite3.SQLITE_NOTADB,
            ):  # a full disk, a read-only folder: the database may be whole, and deleting it loses records
                raise CapasError(
                    f"{self.path}: cannot open the study database ({error}): free space on its disk or make "
                    "its folder writable, or use another --out directory"
                ) from None
            raise CapasError(
                f"{self.path}: not a readable study database ({error}); delete it and its -wal and -shm "
                "files (finished runs are read back from their run directories), or use another --out directory"
            ) from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        # a study refused after it opened its new database and before any run started (a Ray cluster
        # it could not join): the database holds nothing to keep; without it the folder is removed too
        try:
            unused = (
                error is not None
                and self.made
                and self.db.execute("SELECT 1 FROM runs WHERE status != 'pending' OR attempts > 0").fetchone()
                is None
            )
        except sqlite3.Error:
            unused = False
        self.close()
        if unused:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        if isinstance(error, sqlite3.OperationalError):  # a disk that filled up while the study ran
            raise CapasError(
                f"{self.path}: cannot write the study database ({error}); the runs it recorded are kept: "
                "free space on its disk, then rerun the same command to go on"
            ) from None

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """Statements that commit together or not at all. In autocommit mode `with self.db:` alone opens
        no transaction: each statement in it would commit by itself."""
        with self.db:  # commits at the end, rolls back on an error
            self.db.execute("BEGIN IMMEDIATE")
            yield

    def get_meta(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def add_run(self, run_id: str, variant: str, seed: int, config: dict, config_hash: str) -> None:
        """A new pending run; replaces a row of the same id (a run whose config changed before it finished)."""
        with self._transaction():  # the run and its stale epochs go together
            self.db.execute("DELETE FROM epochs WHERE run_id = ?", (run_id,))
            self.db.execute(
                "INSERT OR REPLACE INTO runs (id, variant, seed, status, config, config_hash) VALUES (?, ?, ?, 'pending', ?, ?)",
                (run_id, variant, seed, json.dumps(config), config_hash),
            )

    def start(self, run_id: str) -> None:
        self.db.execute(
            "UPDATE runs SET status = 'running', attempts = attempts + 1, started = ?, error = NULL WHERE id = ?",
            (time.time(), run_id),
        )

    def add_epoch(self, run_id: str, metrics: dict) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO epochs (run_id, epoch, metrics) VALUES (?, ?, ?)",
            (run_id, int(metrics["epoch"]), json.dumps(metrics)),
        )

    def finish(self, run_id: str, result: dict) -> None:
        """Record a finished run with its whole history (the run's metrics.jsonl is authoritative)."""
        with self._transaction():
            self.db.execute("DELETE FROM epochs WHERE run_id = ?", (run_id,))
            self.db.executemany(
                "INSERT INTO epochs (run_id, epoch, metrics) VALUES (?, ?, ?)",
                [(run_id, int(m["epoch"]), json.dumps(m)) for m in result["history"]],
            )
            self.db.execute(
                "UPDATE runs SET status = 'done', finished = ?, seconds = ?, result = ?, error = NULL WHERE id = ?",
                (time.time(), result.get("wall_seconds"), json.dumps(result), run_id),
            )

    def fail(self, run_id: str, error: str) -> None:
        self.db.execute(
            "UPDATE runs SET status = 'failed', finished = ?, error = ? WHERE id = ?",
            (time.time(), error, run_id),
        )

    def rename(self, run_id: str, variant: str) -> None:
        """Record a run under its variant's new name (one that gives the same folder)."""
        self.db.execute("UPDATE runs SET variant = ? WHERE id = ?", (variant, run_id))

    def reset(self, run_id: str) -> None:
        """Back to pending (an interrupted or failed run, to be resumed)."""
        self.db.execute("UPDATE runs SET status = 'pending' WHERE id = ?", (run_id,))

    def runs(self) -> dict[str, RunRow]:
        rows = self.db.execute(
            "SELECT id, variant, seed, status, config, config_hash, attempts, started, finished, seconds, result, error "
            "FROM runs ORDER BY id"
        ).fetchall()
        return {
            r[0]: RunRow(
                r[0],
                r[1],
                r[2],
                r[3],
                json.loads(r[4]),
                r[5],
                r[6],
                r[7],
                r[8],
                r[9],
                json.loads(r[10]) if r[10] else None,
                r[11],
            )
            for r in rows
        }

    def epochs(self, run_id: str) -> list[dict]:
        rows = self.db.execute(
            "SELECT metrics FROM epochs WHERE run_id = ? ORDER BY epoch", (run_id,)
        ).fetchall()
        return [json.loads(r[0]) for r in rows]
