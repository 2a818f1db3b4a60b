"""Durable atomic writes: flushed before the rename and the folder after it; every artifact gets the
permissions an ordinary new file gets (0666 less the umask), whichever library wrote it."""

from __future__ import annotations

import os
import re
import signal
import stat
import warnings

import pytest
import torch
from safetensors.torch import save_file

from capas import atomic


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_file_of_a_run_directory_has_the_ordinary_mode(tiny_run):
    # tiny_run was written by capas.train.train under this process' umask
    files = [p for p in tiny_run.iterdir() if p.is_file() and p.name != ".capas.lock"]
    assert {p.name for p in files} >= {"model.safetensors", "reference.safetensors", "config.json"}
    expected = 0o666 & ~atomic.umask()
    assert {p.name: _mode(p) for p in files} == {p.name: expected for p in files}


def test_safetensors_and_json_get_0644_under_umask_022(tmp_path, umask_022):
    weights = atomic.write_with(
        tmp_path / "w.safetensors", lambda tmp: save_file({"a": torch.zeros(3)}, str(tmp))
    )
    config = atomic.write_json(tmp_path / "c.json", {"a": 1})
    assert (_mode(weights), _mode(config)) == (0o644, 0o644)
    os.umask(0o077)
    assert _mode(atomic.write_text(tmp_path / "private.txt", "x")) == 0o600


def test_the_file_is_flushed_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """os.fsync and os.replace recorded in order (real files, real calls: the spy only watches)."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        calls.append(("fsync", target))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = atomic.write_text(tmp_path / "f.txt", "hello")
    assert path.read_text() == "hello"
    kinds = [kind for kind, _ in calls]
    assert kinds == ["fsync", "replace", "fsync"], calls
    folder, name = os.path.split(calls[0][1])  # the temporary file, before the rename, in its hidden folder
    assert (os.path.basename(folder).startswith(".f.txt."), name) == (True, "f.txt")
    assert calls[2][1] == str(tmp_path)  # the folder that holds the new name
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temporary file left


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic.write_text(tmp_path / "f.txt", "old")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic.write_with(path, broken)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_retraining_that_crashes_while_writing_leaves_the_old_run_whole(tmp_path, monkeypatch):
    """The new run is written beside the old one and swapped in whole: a crash after the new
    model.json left it beside the old weights (neither run loaded)."""
    from capas.runs import load_run
    from capas.spec import DataConfig, ModelSpec, TrainConfig
    from capas.train import train

    spec = ModelSpec.from_dict(
        {
            "name": "d",
            "input_shape": [8, 8, 1],
            "layers": ["Flatten", {"Dense": {"units": 10, "activation": "softmax"}}],
        }
    )
    wide = ModelSpec.from_dict(
        {**spec.to_dict(), "layers": ["Flatten", {"Dense": {"units": 16}}, {"Dense": {"units": 10}}]}
    )
    data, cfg, out = DataConfig(name="digits"), TrainConfig(epochs=1, threads=1), tmp_path / "run"
    before = train(spec, data, cfg, out)["test_accuracy"]
    written = atomic.write_json

    def crash_after_model_json(path, *args, **kwargs):
        written(path, *args, **kwargs)
        if path.name == "model.json":
            raise KeyboardInterrupt  # as Ctrl-C there would

    monkeypatch.setattr(atomic, "write_json", crash_after_model_json)
    with pytest.raises(KeyboardInterrupt):
        train(wide, data, cfg, out)
    monkeypatch.undo()
    run = load_run(out)  # the old run, whole
    assert run.spec.to_dict() == spec.to_dict() and run.read_json("test.json")["test_accuracy"] == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # nothing left beside it
    train(wide, data, cfg, out)
    assert load_run(out).spec.to_dict() == wide.to_dict()


@pytest.mark.parametrize("library", ["python", "safetensors"])
def test_a_file_the_disk_cannot_take_is_one_line_naming_it(tmp_path, files_up_to_4k, library):
    """It was an OSError, or safetensors' own error, traceback and all."""
    from capas.errors import CapasError

    path = atomic.write_text(tmp_path / "w.safetensors", "old")

    def writer(tmp):
        if library == "python":
            tmp.write_bytes(bytes(8192))
        else:
            save_file({"a": torch.zeros(2048)}, str(tmp))

    with (
        files_up_to_4k(),
        pytest.raises(CapasError, match=r"w\.safetensors: cannot write it \(File too large\)$"),
    ):
        atomic.write_with(path, writer)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_a_run_directory_the_disk_cannot_take_names_the_file_asked_for(tmp_path, files_up_to_4k):
    """`capas compress --out run` on a full disk named the staging folder's file, .run.k2x9…/model.safetensors."""
    from capas.errors import CapasError
    from capas.runs import staging

    out = tmp_path / "run"
    with (
        files_up_to_4k(),
        pytest.raises(CapasError) as error,
        staging(out) as tmp,
    ):
        atomic.write_bytes(tmp / "model.safetensors", bytes(8192))
    assert str(error.value) == f"{out / 'model.safetensors'}: cannot write it (File too large)"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["r" * 250, "é" * 127])  # 250 and 254 bytes: names a folder may hold
def test_a_long_name_is_written_and_replaced(tmp_path, name):
    """A run directory named with 250 characters failed after the whole training: its hidden staging
    folder, '.NAME.' and 8 random characters, was too long a name (ENAMETOOLONG)."""
    from capas.runs import staging

    for text in ("first", "second"):  # the second time, the old run is renamed aside first
        with staging(tmp_path / name) as tmp:
            atomic.write_text(tmp / "a.txt", text)
        atomic.write_text(tmp_path / "file" / name, text)
    assert (tmp_path / name / "a.txt").read_text() == (tmp_path / "file" / name).read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["file", name])


def test_a_run_another_command_put_at_out_meanwhile_is_kept(tmp_path):
    """compress --out X while `capas train --out X` started: whichever finished last deleted the
    other's run, and both said they had written X."""
    from capas.errors import CapasError
    from capas.runs import staging

    out = tmp_path / "run"
    with (
        pytest.raises(CapasError, match=r"run: appeared while this command ran .* nothing was written"),
        staging(out, replace=False) as tmp,
    ):
        atomic.write_text(tmp / "model.json", "mine")
        atomic.write_text(out / "model.json", "theirs")  # the other command, meanwhile
    assert (out / "model.json").read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["run"]
    (out / "model.json").unlink()
    with staging(out, replace=False) as tmp:  # an empty folder is taken (import-keras accepts one)
        atomic.write_text(tmp / "model.json", "mine")
    assert (out / "model.json").read_text() == "mine"


def test_an_interrupt_between_the_two_renames_puts_the_old_run_back(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM after the old run was renamed aside and before the new one took its place
    deleted the new run and left the old one hidden (.run.old-*): no run at `out`, and a retrained run's
    checkpoint out of reach of the rerun."""
    from capas.runs import staging

    out = tmp_path / "run"
    atomic.write_text(out / "checkpoint.safetensors", "the old run's")
    rename = os.rename

    def interrupted_after_the_first(source, target):
        rename(source, target)
        if target != out.resolve():  # the old run has gone aside; the signal comes now
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), staging(out) as tmp:
        atomic.write_text(tmp / "model.json", "new")
        monkeypatch.setattr(os, "rename", interrupted_after_the_first)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert (out / "checkpoint.safetensors").read_text() == "the old run's"


def _killed(command) -> None:
    """Run `command` in a forked copy of this process, which it ends with SIGKILL (as kill -9, a power loss
    or the OOM killer would): nothing of Python's clean-up runs."""
    pid = os.fork()
    if pid == 0:
        try:
            command()
        finally:
            os._exit(1)  # not killed: the test fails below
    assert os.WTERMSIG(os.waitpid(pid, 0)[1]) == signal.SIGKILL


def test_a_kill_between_the_two_renames_is_recovered_by_the_next_command(tmp_path):
    """kill -9 after the old run was renamed aside and before the new one took its place left both hidden
    beside `out` for ever, and the rerun trained from the start: the retrained run's checkpoint was in
    the folder moved aside."""
    from capas.runs import staging
    from capas.spec import DataConfig, ModelSpec, TrainConfig
    from capas.train import CHECKPOINT, train
    from capas.train.loop import Callback

    spec = ModelSpec.from_dict(
        {"name": "d", "input_shape": [8, 8, 1], "layers": ["Flatten", {"Dense": {"units": 10}}]}
    )
    data, cfg, out = DataConfig(name="digits"), TrainConfig(epochs=2, threads=1), tmp_path / "run"

    class Interrupt(Callback):  # Ctrl-C in epoch 2: the checkpoint of epoch 1 stays in `out`
        def on_epoch_end(self, metrics: dict) -> None:
            if metrics["epoch"] == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(spec, data, cfg, out, callbacks=[Interrupt()])
    assert (out / CHECKPOINT).is_file()
    rename = os.rename

    def killed_after_the_first(source, target):
        rename(source, target)
        if ".old-" in os.fspath(target):
            os.kill(os.getpid(), signal.SIGKILL)

    def swap():
        os.rename = killed_after_the_first
        with staging(out) as tmp:
            atomic.write_text(tmp / "model.json", "the new run")

    _killed(swap)
    assert not out.exists() and len(list(tmp_path.iterdir())) == 2  # the two runs, hidden
    # and the empty folder an earlier kill left before its first rename: it counted as a second run
    # moved aside, and neither was moved back (the checkpoint stayed hidden, the run started over)
    (tmp_path / ".run.old-zzzzzzzz").mkdir()

    class Start(Callback):
        def on_fit_start(self, epochs: int, steps_per_epoch: int, start_epoch: int) -> None:
            starts.append(start_epoch)

    starts = []
    with pytest.warns(UserWarning) as shown:
        train(spec, data, cfg, out, callbacks=[Start()])
    assert starts == [1]  # resumed from the checkpoint moved back
    assert re.fullmatch(
        r"\S+/run: moved back the run a killed command had moved aside \(\.run\.old-(?!zzzzzzzz)\w{8}\); deleted "
        r"the hidden folders killed commands left beside it \((\.run\.\w{8}, \.run\.old-zzzzzzzz|\.run\.old-zzzzzzzz, \.run\.\w{8})\)",
        str(shown[0].message),
    )
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_the_next_command_deletes_only_the_folders_killed_commands_left(tmp_path):
    """kill -9 while a run was written left its hidden staging folder beside `out` for ever. A live
    command's folder, other runs' and others' are not touched."""
    from capas.runs import recover, staging

    out = tmp_path / "run"
    atomic.write_text(out / "model.json", "finished")

    def write():
        with staging(out) as tmp:
            atomic.write_text(tmp / "model.json", "half")
            os.kill(os.getpid(), signal.SIGKILL)

    _killed(write)
    kept = [".run.x", ".run.x.abcdefgh", ".run.old-abcdefgh.y", ".runs.abcdefgh"]  # not staging's of `out`
    for name in kept:
        (tmp_path / name).mkdir()
    with staging(out) as live, pytest.warns(UserWarning) as shown:
        recover(out)
        assert live.is_dir()  # another command, writing `out` now
    assert re.fullmatch(
        r"\S+/run: deleted the hidden folders killed commands left beside it \(\.run\.\w{8}\)",
        str(shown[0].message),
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "run"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recover(out)  # nothing left to do: nothing said


def test_the_next_write_of_a_file_deletes_what_a_killed_write_of_it_left(tmp_path):
    """kill -9 while a file was written (export's model.onnx in a run, a study's report, a cache) left its
    hidden temporary beside it for ever, and what the writer made beside that (safetensors' own .tmpXXXXXX).
    The next write of the same file deletes them; a live write's, other files' and other names are kept."""
    target = tmp_path / "model.onnx"

    def write():
        def half(tmp):
            tmp.write_bytes(b"half")
            (tmp.parent / ".tmpAbC123").write_bytes(b"the writer's own temporary")
            os.kill(os.getpid(), signal.SIGKILL)

        atomic.write_with(target, half)

    _killed(write)
    kept = [".model.onnx.abcdefgh", ".model.onnx.abcdefgh.tmp.x", ".model.onnxx.abcdefgh.tmp", ".tmpXyZ789"]
    for name in kept:
        (tmp_path / name).mkdir()
    kept.append(".model.onnx.abcdefg0.tmp")  # a file: not write_with's
    (tmp_path / kept[-1]).write_text("someone's")

    def last(tmp):
        atomic.write_text(target, "meanwhile")  # another write of the same file while this one runs
        tmp.write_text("last")

    atomic.write_with(target, last)
    assert target.read_text() == "last"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "model.onnx"])
