"""Studies on a real local Ray instance (2 CPUs, shared by the module's tests): a study completes with
the same results as the local pool, a SIGKILLed Ray worker is retried, an interrupted driver resumes
without repeating finished runs, and a worker that cannot see the driver's disk ships its run back."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import sqlite3
import tempfile
import threading
import time
import traceback
import warnings
from concurrent.futures import Future
from pathlib import Path

import pytest
from rich.console import Console

ray = pytest.importorskip("ray")

from capas.errors import CapasError  # noqa: E402
from capas.runs import load_run  # noqa: E402
from capas.study.executors import PoolExecutor, RunTask  # noqa: E402
from capas.study.ray_executor import (  # noqa: E402
    PROBE,
    RayExecutor,
    _deliver,
    _worker_run,
    check_reachable,
    code_version,
)
from capas.study.run import run_study  # noqa: E402
from capas.study.spec import load_study  # noqa: E402
from capas.study.store import Store  # noqa: E402

RUNS = 4  # 2 variants × 2 seeds


@pytest.fixture(scope="module")
def local_ray():
    """One Ray instance for the module: starting one costs seconds."""
    # "local": a new instance, not a cluster that a `ray start` on this machine recorded
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def study_path(tiny_study, study_file):
    """study_path(**train_changes) -> the tiny study's file, trained in batches of 32."""
    return lambda **train: study_file(tiny_study(name="ray", train={"batch_size": 32, **train}))


def _quiet(folder: Path) -> Console:
    return Console(file=open(folder / "log.txt", "a"))


def test_an_address_nothing_answers_on_is_refused_at_once():
    """Ray retried such an address for minutes (13.7 for 127.0.0.1:1), a warning every few seconds. First in the
    module: with a Ray instance already started in this process, the executor uses it and no address."""
    assert not ray.is_initialized()
    with socket.socket() as closed:  # a port that was free a moment ago: nothing listens on it
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(CapasError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        RayExecutor(address=f"127.0.0.1:{port}")
    assert time.monotonic() - started < 5 and not ray.is_initialized()


@pytest.mark.parametrize("port", ["6379 ", "-5", "abc", "70000"])
def test_an_address_whose_port_is_not_a_port_number_is_refused_at_once(port):
    """The check passed any port that was not all digits to Ray, which retried '127.0.0.1:1 ' (a
    trailing space from a copy) or '127.0.0.1:-5' for minutes."""
    with pytest.raises(
        CapasError, match=rf"--address '127.0.0.1:{port}': the port '{port}' is not a port number"
    ):
        check_reachable(f"127.0.0.1:{port}")


def test_an_address_that_is_not_a_ray_head_is_refused_at_once():
    """A port that answers, but not as a Ray head (here a web server's): ray.init retried it for good,
    logging 'Failed to get cluster ID from GCS server' every 30 s."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def answer() -> None:
            client, _ = server.accept()
            with client:
                client.recv(1024)
                client.sendall(b"HTTP/1.0 400 Bad request\r\n\r\n")

        thread = threading.Thread(target=answer)
        thread.start()
        started = time.monotonic()
        with pytest.raises(CapasError, match=f"^127.0.0.1:{port} answers, but not as a Ray cluster's head"):
            RayExecutor(address=f"127.0.0.1:{port}")
        thread.join()
    assert time.monotonic() - started < 5 and not ray.is_initialized()


def test_without_an_address_a_new_local_instance_starts_beside_a_recorded_cluster(monkeypatch):
    """`ray start` records its cluster in Ray's temporary folder, and ray.init without an address
    joins it, refusing num_cpus: "capas study --executor ray" failed on the machine of a `ray start
    --head`, or of one that was killed. Also before the module's Ray instance starts."""
    assert not ray.is_initialized()
    folder = Path(tempfile.mkdtemp(prefix="capas-ray-", dir="/tmp"))  # short: Ray's socket paths live in it
    monkeypatch.setenv("RAY_TMPDIR", str(folder))
    (folder / "ray").mkdir()
    (folder / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")  # a cluster that has since died
    try:
        executor = RayExecutor(1)
        assert executor.owned and executor.workers == 1
        executor.close()
        assert not ray.is_initialized()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_cluster_whose_workers_run_another_capas_is_refused_before_any_run(tmp_path, study_path):
    """The check before the first run: a real Ray instance whose workers import a copy of capas with one
    line added (as a node that installed another build would), joined as a user's `ray.init` leaves it.
    Also before the module's Ray instance starts."""
    import capas

    copy = tmp_path / "other"
    shutil.copytree(Path(capas.__file__).parent, copy / "capas")
    with (copy / "capas" / "errors.py").open("a") as source:
        source.write("# another build\n")
    ray.init(
        address="local",
        num_cpus=1,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(copy)}},
    )
    try:
        from typer.testing import CliRunner

        from capas import cli

        out = tmp_path / "s"
        result = CliRunner().invoke(
            cli.app, ["study", str(study_path()), "--executor", "ray", "--out", str(out)]
        )
        assert result.exit_code == 2, result.output
        message = " ".join(result.output.split())
        assert f"the driver {code_version()}: install the driver's capas on every node" in message
        assert f"({copy / 'capas'} on " in message and code_version() not in message.split("the driver")[0]
        assert not out.exists()  # refused before anything was written
        assert ray.is_initialized()  # the caller's instance is left running, as the caller started it
    finally:
        ray.shutdown()


@pytest.mark.slow  # run by `bash scripts/test.sh -m slow` (README): the suite stays under 10 minutes
def test_ray_study_matches_the_local_pool(local_ray, tmp_path, study_path):
    path = study_path()
    on_ray = run_study(path, out=tmp_path / "ray", executor=RayExecutor(), console=_quiet(tmp_path))
    assert on_ray.trained == RUNS and not on_ray.failed
    assert ray.is_initialized()  # an instance the executor did not start is left running
    with Store(tmp_path / "ray" / "study.sqlite") as store:
        rows = store.runs()
        assert {row.status for row in rows.values()} == {"done"}
        assert all(len(store.epochs(rid)) == 1 for rid in rows)  # epoch events reached the driver
    assert {row.result["worker"]["storage"] for row in rows.values()} == {"shared"}
    assert not list((tmp_path / "ray").rglob(f"*{PROBE}"))
    assert (tmp_path / "ray" / "report.md").read_text().count("GAP") >= 1

    pool = run_study(path, out=tmp_path / "pool", executor=PoolExecutor(2), console=_quiet(tmp_path))
    with Store(tmp_path / "pool" / "study.sqlite") as store:
        pooled = store.runs()
    assert set(pooled) == set(rows)
    for rid, row in rows.items():  # one torch thread per run in both: the same numbers
        for key in ("test_accuracy", "test_loss", "val_loss"):
            assert row.result[key] == pytest.approx(pooled[rid].result[key], rel=1e-5), (rid, key)
    assert [v.name for v in on_ray.report.variants] == [v.name for v in pool.report.variants]


def _ray_task_pids() -> list[int]:
    """Ray worker processes running a run now: Ray titles them after the task (Linux's /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::_worker_run"):
                pids.append(int(entry.name))
        except OSError:  # the process ended meanwhile
            continue
    return pids


@pytest.mark.slow  # run by `bash scripts/test.sh -m slow` (README): the suite stays under 10 minutes
def test_a_killed_ray_worker_is_retried_and_the_study_finishes(local_ray, tmp_path, study_path):
    path = study_path(epochs=3)
    killed: list[int] = []

    def kill_one_running_worker() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            for pid in _ray_task_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_running_worker)
    killer.start()
    outcome = run_study(path, out=tmp_path / "study", executor=RayExecutor(), console=_quiet(tmp_path))
    killer.join()
    assert killed, "no Ray worker was seen running a task"
    assert outcome.trained == RUNS and not outcome.failed
    with Store(tmp_path / "study" / "study.sqlite") as store:
        rows = store.runs()
    assert {row.status for row in rows.values()} == {"done"}
    # every result came from a live process: the run of the killed one was executed again
    assert killed[0] not in {row.result["worker"]["pid"] for row in rows.values()}


def test_an_interrupted_driver_resumes_without_repeating_finished_runs(
    local_ray, tmp_path, study_path, monkeypatch
):
    # Ctrl-C as soon as the driver has recorded one run done: a real SIGINT, sent from the driver's
    # own thread right after that write, so that it lands while the other runs are still in flight
    path, out = study_path(epochs=6), tmp_path / "study"
    database = out / "study.sqlite"
    finish = Store.finish

    def finish_then_interrupt(store: Store, run_id: str, result: dict) -> None:
        finish(store, run_id, result)
        monkeypatch.setattr(Store, "finish", finish)  # once
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Store, "finish", finish_then_interrupt)
    # Python's own Ctrl-C handler: in the whole suite the signal raised nothing without it, though
    # signal.getsignal never saw the handler change (replaced below Python by some library)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_study(path, out=out, executor=RayExecutor(), console=_quiet(tmp_path))
    finally:
        signal.signal(signal.SIGINT, previous)
    with sqlite3.connect(database) as con:
        before = dict(con.execute("SELECT id, finished FROM runs WHERE status = 'done'").fetchall())
    assert 1 <= len(before) < RUNS

    resumed = run_study(path, out=out, executor=RayExecutor(), console=_quiet(tmp_path))
    assert resumed.skipped == len(before) and resumed.trained == RUNS - len(before) and not resumed.failed
    with sqlite3.connect(database) as con:
        after = dict(con.execute("SELECT id, finished FROM runs WHERE status = 'done'").fetchall())
    assert len(after) == RUNS and all(after[rid] == before[rid] for rid in before)


def test_a_ray_head_passes_the_check_of_its_address(local_ray):
    check_reachable(ray.get_runtime_context().gcs_address)  # its answer: an HTTP/2 SETTINGS frame


def test_a_cluster_lost_mid_study_is_one_line_naming_the_rerun(local_ray):
    """`ray stop` on the cluster while runs were out: the driver's next look at the progress queue
    raised Ray's ActorDiedError, a 25-line traceback (the rerun resumes from the runs' checkpoints)."""
    executor = RayExecutor()
    ray.kill(executor.queue.actor)  # as when the cluster's nodes stop: the queue actor dies with them
    with pytest.raises(CapasError, match=r"lost the Ray cluster .*rerun the same command"):
        executor.events()
    executor.close(cancel=True)


def test_a_worker_that_cannot_see_the_run_directory_ships_it_to_the_driver(local_ray, tmp_path, study_path):
    study = load_study(study_path())
    variant = study.variants[0]
    config = variant.run_config(0)
    out = tmp_path / "study" / "runs" / "Flatten" / "seed-0"
    task = RunTask(
        "Flatten/seed-0", variant.name, 0, config["spec"], config["train"], config["data"], {}, str(out)
    )
    events = ray.util.queue.Queue(actor_options={"num_cpus": 0})
    # no probe with this token in `out`: the worker behaves as on a node without the driver's disk
    ref = ray.remote(_worker_run).remote(
        task.to_dict(), events, "a-token-the-driver-never-wrote", 1, code_version()
    )
    future: Future = Future()
    _deliver(ref.future(), future, out)
    result = future.result(timeout=60)
    assert result["worker"]["storage"] == "shipped" and "files" not in result
    run = load_run(out)  # a complete run directory, written by the driver from the shipped bytes
    assert run.classes and (out / "test.json").is_file() and (out / "reference.safetensors").is_file()
    assert result["test_accuracy"] == pytest.approx(run.read_json("test.json")["test_accuracy"])
    events.shutdown(force=True)


def test_runs_that_use_fewer_threads_than_the_cpus_they_ask_for_warn_once(local_ray, tmp_path, study_path):
    """`--cpus-per-run 2` (the README's cluster example) reserved 2 CPUs per run while every run trained
    with the study's 1 thread (train.threads), silently: half the cluster idled."""
    variant = load_study(study_path()).variants[0]
    config = variant.run_config(0)
    executor = RayExecutor(cpus_per_run=2)
    said = []
    try:
        for seed in (0, 1):
            out = tmp_path / "runs" / f"seed-{seed}"
            task = RunTask(
                f"Flatten/seed-{seed}",
                variant.name,
                seed,
                config["spec"],
                config["train"],
                config["data"],
                {},
                str(out),
            )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                executor.submit(task.to_dict())
            said.append([str(warning.message) for warning in caught])
    finally:
        executor.close(cancel=True)
    assert (
        len(said[0]) == 1 and "trains with 1 thread" in said[0][0] and "base.train.threads: 2" in said[0][0]
    )
    assert said[1] == []  # once


def test_a_run_that_raises_on_ray_carries_its_workers_traceback(local_ray, tmp_path, study_path):
    """study.sqlite's runs.error held the driver's frames alone (future.result()), nothing of where in
    training the run failed; the local pool's errors carry their worker's traceback."""
    variant = load_study(study_path()).variants[0]
    config = variant.run_config(0)
    data = {**config["data"], "name": "folder:/nonexistent"}  # fails inside the worker's train()
    out = tmp_path / "study" / "runs" / "Flatten" / "seed-0"
    task = RunTask("Flatten/seed-0", variant.name, 0, config["spec"], config["train"], data, {}, str(out))
    events = ray.util.queue.Queue(actor_options={"num_cpus": 0})
    ref = ray.remote(_worker_run).remote(task.to_dict(), events, "a-token", 1, code_version())
    future: Future = Future()
    _deliver(ref.future(), future, out)
    error = future.exception(timeout=60)
    assert isinstance(error, CapasError) and "/nonexistent" in str(error)
    recorded = "".join(traceback.format_exception(error))
    assert "in execute_run" in recorded and "in _worker_run" in recorded, recorded
    events.shutdown(force=True)


def test_a_shipped_run_trains_beside_another_users_scratch_folder(tmp_path, study_path, monkeypatch):
    """Shipped runs trained under TMP/capas-ray/<token>: the first user to run one on a node made that
    folder (0755), and every other user's shipped runs there failed ("cannot create the run directory").
    Ray is not needed: the task's function runs here as a worker runs it."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    if os.geteuid() == 0:  # root writes into any folder: a file of that name refuses it as well
        (tmp_path / "tmp" / "capas-ray").write_text("another user's")
    else:
        (tmp_path / "tmp" / "capas-ray").mkdir(mode=0o555)
    variant = load_study(study_path()).variants[0]
    config = variant.run_config(0)
    out = tmp_path / "study" / "runs" / "Flatten" / "seed-0"
    task = RunTask(
        "Flatten/seed-0", variant.name, 0, config["spec"], config["train"], config["data"], {}, str(out)
    )
    result = _worker_run(
        task.to_dict(), queue.SimpleQueue(), "a-token-the-driver-never-wrote", 1, code_version()
    )
    assert result["worker"]["storage"] == "shipped" and "test.json" in result["files"]


def test_a_shipped_run_ships_its_compressed_run_too(tmp_path, study_path, monkeypatch):
    """A compress variant on a node without the driver's disk shipped its run directory but not the
    compressed run made beside it: the study recorded a path in the worker's scratch space, which the
    driver has not, and the scratch folders stayed. Ray is not needed: the task's function runs here
    as a worker runs it, and its result goes through the driver's side as a Ray task's would."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    variant = load_study(study_path()).variants[0]
    config = variant.run_config(0)
    out = tmp_path / "study" / "runs" / "Flatten" / "seed-0"
    extras = {"compress": {"quantize": "dynamic"}}
    task = RunTask(
        "Flatten/seed-0", variant.name, 0, config["spec"], config["train"], config["data"], extras, str(out)
    )
    shipped: Future = Future()
    shipped.set_result(_worker_run(task.to_dict(), queue.SimpleQueue(), "a-token", 1, code_version()))
    future: Future = Future()
    _deliver(shipped, future, out)
    result = future.result()
    assert result["compress"]["run"] == str(out.with_name("seed-0-dynamic"))
    compressed = load_run(out.with_name("seed-0-dynamic"))
    assert compressed.read_json("lineage.json")["method"] == "quantize-dynamic"
    assert not list((tmp_path / "tmp" / f"capas-ray-{os.getuid()}").iterdir())  # no scratch left


def test_a_worker_whose_capas_is_not_the_drivers_refuses_the_run(tmp_path, study_path):
    """A cluster's workers import the capas installed on their node (or as it was when `ray start`
    ran): a study trained on another capas than the driver's and reported it as the driver's, silently
    (both say version 0.1.0). Ray is not needed: the task's function runs here as a worker runs it."""
    variant = load_study(study_path()).variants[0]
    config = variant.run_config(0)
    out = tmp_path / "study" / "runs" / "Flatten" / "seed-0"
    task = RunTask(
        "Flatten/seed-0", variant.name, 0, config["spec"], config["train"], config["data"], {}, str(out)
    )
    assert code_version().startswith("0.1.0+")
    with pytest.raises(
        CapasError, match=r"runs capas 0\.1\.0\+\w{12} .*the driver 0\.1\.0\+000000000000: install"
    ):
        _worker_run(task.to_dict(), queue.SimpleQueue(), "a-token", 1, "0.1.0+000000000000")
    assert not out.exists()


def test_without_ray_the_executor_says_how_to_install_it(tmp_path, monkeypatch, study_path):
    from typer.testing import CliRunner

    from capas import cli
    from capas.study import ray_executor

    monkeypatch.setattr(ray_executor, "ray", None)  # as when the `ray` extra is not installed
    result = CliRunner().invoke(
        cli.app, ["study", str(study_path()), "--executor", "ray", "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 2 and "pip install 'capas[ray]'" in result.output
    assert not (tmp_path / "s").exists()  # refused before anything was written
