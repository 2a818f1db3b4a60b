"""The command line: each command runs for real, bad input exits non-zero with one message and no traceback."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

import hostile
from capas.cli import app
from capas.inference import choose_precision
from capas.runs import load_run
from capas.spec import load_spec
from capas.spec.summary import summarize

EXAMPLES = Path(__file__).parent.parent / "examples"
runner = CliRunner()


def test_summary_prints_keras_figures():
    result = runner.invoke(app, ["summary", str(EXAMPLES / "seed000-flatten.yaml")])
    assert result.exit_code == 0, result.output
    assert "Total params: 1,164,042 (4.44 MB)" in result.output
    assert "flatten" in result.output and "(Flatten)" in result.output and "(None, 86528)" in result.output


def _summary_process(spec: Path, columns: int) -> str:
    """`capas summary` as a user runs it, its output piped (not a terminal)."""
    env = {**os.environ, "COLUMNS": str(columns)}
    result = subprocess.run(
        [sys.executable, "-m", "capas", "summary", str(spec)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("name", ["seed000-gap.yaml", "keras-mnist.yaml", "seed000-flatten.yaml"])
def test_summary_fits_80_columns_piped_with_every_number_whole(name):
    output = _summary_process(EXAMPLES / name, 80)
    table = output.split(" Total params")[0]
    assert max(len(line) for line in table.splitlines()) <= 80
    for row in summarize(load_spec(EXAMPLES / name)).rows:
        # the row's numbers, whole, on the line that starts with its index
        line = next(line for line in table.splitlines() if line.split()[:1] == [str(row.index)])
        assert line.split()[-3:] == [
            f"{row.trainable + row.non_trainable:,}",
            line.split()[-2],
            f"{row.macs:,}",
        ]
        assert row.name[:12] in line


def test_the_command_prints_in_a_terminal_that_is_not_utf8(tmp_path):
    """In an ISO-8859-1 locale (PYTHONIOENCODING stands for it here) the command shows '?' for what the
    terminal cannot show ('日本'; help's '×' too), not a UnicodeEncodeError; the summary's rules are ASCII."""
    pyproject = tomllib.loads((EXAMPLES.parent / "pyproject.toml").read_text(encoding="utf-8"))
    module, function = pyproject["project"]["scripts"]["capas"].split(":")  # the installed `capas`
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: café 日本\ninput_shape: [8, 8, 1]\nlayers: [Flatten, {Dense: {units: 2, activation: softmax}}]\n",
        encoding="utf-8",
    )
    env = {**os.environ, "PYTHONIOENCODING": "latin-1"}
    result = subprocess.run(
        [sys.executable, "-c", f"from {module} import {function}; {function}()", "summary", str(spec)],
        capture_output=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr.decode("latin-1")
    assert 'Model: "café ??"' in result.stdout.decode("latin-1")


def test_summary_keeps_keras_table_when_wide():
    output = _summary_process(EXAMPLES / "seed000-gap.yaml", 160)
    assert "global_average_pooling2d (GlobalAveragePooling2D)" in output
    assert "115,605,504" in output and "Mult-adds" in output


def test_summary_prints_model_and_layer_names_as_written(tmp_path):
    """The wide table read names as rich markup: a model '[bold]x' printed (and went into a run's
    summary.txt) as 'x', a layer '[red]f' as 'f'."""
    spec = tmp_path / "marks.yaml"
    spec.write_text(
        'name: "[bold]x"\ninput_shape: [8, 8, 1]\nlayers:\n  - Flatten: {name: "[red]f:smile:"}\n  - Dense: {units: 2}\n'
    )
    output = _summary_process(spec, 160)  # nor Rich's emoji codes: ':smile:' printed as 😄
    assert 'Model: "[bold]x"' in output and "[red]f:smile: (Flatten)" in output, output
    assert 'Model: "[bold]x"' in summarize(load_spec(spec)).text()


def test_bad_spec_exits_2_with_one_message_and_no_traceback(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "name: bad\ninput_shape: [28, 28, 1]\nlayers:\n  - Conv2D: {filters: 8, kernel_size: 3, paddin: same}\n"
    )
    # a real process, as a user runs it
    result = subprocess.run(
        [sys.executable, "-m", "capas", "summary", str(spec)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert "layer 0 (Conv2D): unknown keyword 'paddin' (did you mean 'padding'?)" in " ".join(
        result.stderr.split()
    )


def train_with_config(tmp_path: Path, config: str, *options: str):
    """`capas train` of the seed-000 spec with this --config text, into tmp_path/run."""
    path = tmp_path / "train.yaml"
    path.write_text(config)
    command = [
        "train",
        str(EXAMPLES / "seed000-gap.yaml"),
        "--config",
        str(path),
        "--out",
        str(tmp_path / "run"),
    ]
    return runner.invoke(app, [*command, *options])


@pytest.mark.parametrize(("key", "allowed"), [("winograd", "'auto'"), ("compile", "'frozen'")])
def test_a_setting_of_several_kinds_gets_one_message_with_what_each_allows(tmp_path, key, allowed):
    """winograd is true, false or 'auto': pydantic reports each kind apart (as `winograd.bool`…);
    the user reads one keyword and everything it takes."""
    result = train_with_config(tmp_path, f"train:\n  {key}: maybe\n")
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert f"training config: keyword '{key}': Input should be a valid boolean" in message
    assert f"or {allowed} (given 'maybe')" in message
    assert "bool" not in message.replace("boolean", "")
    assert not (tmp_path / "run").exists()


def test_an_unknown_nested_keyword_named_like_a_type_is_named_in_full(tmp_path):
    result = train_with_config(tmp_path, "train:\n  optimizer: {name: sgd, bool: 1}\n")
    assert result.exit_code == 2
    assert "unknown keyword 'optimizer.bool'" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "name", ["nowhere.yaml", "no:thumbs_up:.yaml", (EXAMPLES / "keras-mnist.yaml").read_text()]
)
def test_missing_spec_file_is_named(name):
    """A spec's text given as its name (`capas summary "$(cat spec.yaml)"`), longer than a file name
    may be, was an OSError's traceback ("File name too long")."""
    result = runner.invoke(app, ["summary", name])
    assert result.exit_code == 2, result.output
    assert f"{name}: no such file" in result.output


@pytest.mark.parametrize("option", ["--out", "--data-dir"])
def test_a_path_option_longer_than_a_file_name_may_be_is_one_message(tmp_path, option):
    """`--out` or `--data-dir` with a 300-character name was an OSError's traceback."""
    long = str(tmp_path / ("n" * 300))
    args = ["--data", "fashion-mnist", "--limit", "100", "--epochs", "1", "--out", str(tmp_path / "run")]
    args += [option, long]
    result = runner.invoke(app, ["train", str(EXAMPLES / "seed000-gap.yaml"), *args])
    assert result.exit_code == 2, result.output
    assert "error: " in result.output and "File name too long" in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(not Path("/dev/fd").is_dir(), reason="needs /dev/fd, as a shell's <(…) does")
def test_a_spec_read_from_a_pipe_is_read():
    """`capas summary <(sed … spec.yaml)` said "/dev/fd/63: no such file"."""
    read, write = os.pipe()
    os.write(write, (EXAMPLES / "seed000-gap.yaml").read_bytes())
    os.close(write)
    try:
        result = runner.invoke(app, ["summary", f"/dev/fd/{read}"])
    finally:
        os.close(read)
    assert result.exit_code == 0, result.output
    assert "300,042" in result.output


def test_train_evaluate_predict(tmp_path, tiny_run):
    spec = tmp_path / "small.yaml"
    spec.write_text(
        "name: small\ninput_shape: [8, 8, 1]\nlayers:\n"
        "  - Conv2D: {filters: 4, kernel_size: 3, activation: relu}\n  - Flatten\n"
        "  - Dense: {units: 10, activation: softmax}\n"
    )
    out = tmp_path / "run"
    options = ["--data", "digits", "--epochs", "3", "--optimizer", "sgd", "--lr", "3", "--threads", "1"]
    result = runner.invoke(app, ["train", str(spec), *options, "--precision", "auto", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and "confusion matrix" in result.output
    # without early stopping the run keeps its last epoch's weights, which test.json's best_epoch
    # names; the best epoch printed is the one of the lowest val_loss (2 here, in float32), as in a
    # study report, and the weights are not claimed to be its
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lowest = min(range(3), key=lambda i: history[i]["val_loss"]) + 1
    assert json.loads((out / "test.json").read_text())["best_epoch"] == 3
    ended = "" if lowest == 3 else " by val_loss"
    ended += ", max epochs" + ("" if lowest == 3 else ": the weights are the last epoch's, 3")
    assert f"(best epoch {lowest}{ended})" in " ".join(result.output.split())
    assert '"name": "sgd"' in (out / "config.json").read_text()
    chosen, why = choose_precision("auto", "cpu")  # bfloat16 on a CPU with AVX512-BF16 or AMX, else float32
    assert f"precision auto: {chosen} ({why})" in " ".join(result.output.split())
    assert json.loads((out / "config.json").read_text())["train"]["precision"] == chosen  # what it ran in
    assert json.loads((out / "test.json").read_text())["precision"] == chosen
    assert load_run(out).precision == chosen

    result = runner.invoke(app, ["evaluate", str(tiny_run)])
    assert result.exit_code == 0, result.output
    assert "fashion-mnist: test accuracy" in result.output and "(400 images)" in result.output

    from PIL import Image

    from capas.data import load_dataset

    _, test = load_dataset("fashion-mnist")
    image = tmp_path / "boot.png"
    Image.fromarray(test.images[0, 0].numpy()).convert("RGB").resize((56, 56)).save(
        image
    )  # colour, other size
    result = runner.invoke(app, ["predict", str(tiny_run), str(image), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert "boot.png" in result.output
    # Pillow's warning about a file, as one line that names it (it named Pillow's file and line)
    (tmp_path / "exif.jpg").write_bytes(hostile.corrupt_exif_jpeg())
    result = runner.invoke(app, ["predict", str(tiny_run), str(tmp_path / "exif.jpg")])
    assert result.exit_code == 0, result.output
    assert f"warning: {tmp_path / 'exif.jpg'}: Corrupt EXIF data." in result.output.replace("\n", "")

    (tmp_path / "junk.png").write_bytes(b"not an image")
    result = runner.invoke(app, ["predict", str(tiny_run), str(tmp_path / "junk.png")])
    assert result.exit_code == 2 and "junk.png: not a readable image" in result.output


def test_predict_keeps_one_batch_of_inputs(tiny_run, monkeypatch):
    """predict preprocessed every image before the first batch ran: 2,000 files for a 224×224 model
    held 400 MB of inputs."""
    import torch

    import capas.inference
    from capas.predict import predict

    monkeypatch.setattr(capas.inference, "CPU_BATCH_VALUES", 3 * 28 * 28)  # three images a batch
    run = load_run(tiny_run, device="cpu")
    drawn, batches = [], []

    def images():
        for index in range(7):
            drawn.append(index)
            yield torch.zeros(1, 20, 20, dtype=torch.uint8)

    run.model.register_forward_pre_hook(lambda module, args: batches.append((len(args[0]), len(drawn))))
    assert len(predict(run, images())) == 7
    assert list(dict.fromkeys(batches)) == [(3, 3), (3, 6), (1, 7)]  # (batch, images drawn when it ran)


def test_bad_training_option_is_named(tmp_path):
    result = runner.invoke(
        app,
        ["train", str(EXAMPLES / "keras-mnist.yaml"), "--optimizer", "adamm", "--out", str(tmp_path / "r")],
    )
    assert result.exit_code == 2
    assert "optimizer.name" in result.output and "'adamm'" in result.output
    result = runner.invoke(app, ["train", str(EXAMPLES / "keras-mnist.yaml"), "--data", "fashion-mnistt"])
    assert result.exit_code == 2 and "fashion-mnist" in result.output
    result = runner.invoke(app, ["train", str(EXAMPLES / "keras-mnist.yaml"), "--precision", "float16"])
    assert result.exit_code == 2 and "precision" in result.output and "bfloat16" in result.output


def test_option_help_takes_defaults_from_the_settings_not_from_copies():
    # a default written into help text drifts from the settings it restates
    source = (Path(__file__).parent.parent / "src" / "capas" / "cli.py").read_text()
    assert re.findall(r"help=\"[^\"]*default:? \d", source) == []
    from capas.deploy.serve.settings import ServeSettings

    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    max_batch = ServeSettings.model_fields["max_batch"]  # the settings the server runs with
    assert f"{max_batch.description} (default {max_batch.default})" in " ".join(result.output.split())


def test_a_seed_beyond_what_torch_takes_is_refused_naming_it(tmp_path):
    """A seed past 2**32 - 1 was an overflow's traceback from torch.manual_seed."""
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["train", str(EXAMPLES / "seed000-gap.yaml"), "--seed", str(2**64), "--out", str(out)]
    )
    assert result.exit_code == 2 and "keyword 'seed'" in result.output and "4294967295" in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("config", "options", "message"),
    [
        # "such as a mapping of keywords" before
        ("train: 5\n", [], "train must be a mapping such as {epochs: 10}, got 5"),
        ("data: digits\n", [], "data must be a mapping such as {name: digits}, got 'digits'"),
        (
            "train:\n  optimizer: adam\n",
            [],
            "train.optimizer must be a mapping such as {name: adam}, got 'adam'",
        ),
        ("train:\n  schedule: cosine\n", ["--schedule", "step"], "train.schedule must be a mapping"),
        ("train:\n  early_stopping: 3\n", ["--patience", "2"], "train.early_stopping must be a mapping"),
        # a typo trained ten epochs of the defaults and exited 0
        ("trian:\n  epochs: 1\n", [], "unknown section 'trian' (did you mean 'train'?)"),
    ],
)
def test_a_config_section_that_is_not_a_mapping_or_unknown_is_named(tmp_path, config, options, message):
    out = tmp_path / "run"
    result = train_with_config(tmp_path, config, *options)
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not out.exists()


def test_out_that_is_a_file_is_named(tmp_path):
    (tmp_path / "afile").write_text("x")
    for out, message in (
        (tmp_path / "afile", "a file, not a folder"),
        (tmp_path / "afile" / "sub", "cannot create"),
    ):
        command = [
            "train",
            str(EXAMPLES / "seed000-gap.yaml"),
            "--data",
            "digits",
            "--epochs",
            "1",
            "--out",
            str(out),
        ]
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


@pytest.mark.parametrize("shape", ["32,32", "32,32,0", "32;32;3", "32,32,3,1"])
def test_a_study_input_shape_that_is_not_three_sizes_names_the_option(tmp_path, shape):
    """`--input-shape 32,32` was blamed on the study file ("base.spec: 'input_shape' must be ...")."""
    result = runner.invoke(
        app,
        [
            "study",
            str(EXAMPLES / "studies" / "global-pooling.yaml"),
            "--input-shape",
            shape,
            "--out",
            str(tmp_path / "s"),
        ],
    )
    message = " ".join(result.output.split())
    assert (
        result.exit_code == 2 and "--input-shape: expected height,width,channels such as 32,32,3" in message
    )
    assert f"got {shape!r}" in message and not (tmp_path / "s").exists()


def test_a_model_too_large_for_memory_is_one_line(tmp_path):
    """A batch larger than any address space (128 × 400,000² × 3 floats): an allocator's traceback before."""
    spec = tmp_path / "huge.yaml"
    spec.write_text(
        "name: huge\ninput_shape: [400000, 400000, 3]\n"
        "layers: [{Conv2D: {filters: 2, kernel_size: 3}}, GlobalAveragePooling2D, {Dense: {units: 10}}]\n"
    )
    command = ["train", str(spec), "--data", "digits", "--epochs", "1", "--out", str(tmp_path / "run")]
    # a process of its own: glibc's heap stays changed after the failed allocation (the kept-heap
    # tests then saw mappings where they expect none)
    result = subprocess.run(
        [sys.executable, "-m", "capas", *command], capture_output=True, text=True, timeout=120
    )
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2 and "out of memory" in output and "batch size" in output, output
    assert "Traceback" not in output


def test_evaluate_data_dir_applies_to_the_recorded_dataset(tiny_run, tmp_path):
    """--data-dir without --data was ignored: the run's own dataset is now looked for there first."""
    import shutil

    for path in Path("/usr/share/datasets/fashion-mnist").glob("*.gz"):
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"")  # damaged: the error must name this copy
    result = runner.invoke(app, ["evaluate", str(tiny_run), "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and str(tmp_path / "t10k-labels-idx1-ubyte.gz") in " ".join(
        result.output.split()
    )


@pytest.mark.parametrize(
    "command",
    [["evaluate"], ["compress", "--quantize", "int8", "--out", "x"], ["export", "--onnx", "--out", "x.onnx"]],
    ids=lambda command: command[0],
)
def test_an_empty_data_option_is_refused_as_train_refuses_it(tiny_run, tmp_path, monkeypatch, command):
    """`--data ''` was taken as no --data: evaluate, compress and export used the run's own dataset."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [command[0], str(tiny_run), *command[1:], "--data", ""])
    assert result.exit_code == 2 and "unknown dataset ''" in result.output, result.output
    assert not any(tmp_path.iterdir())  # nothing written


def test_evaluate_names_a_damaged_or_missing_data_config(tiny_run, tmp_path):
    """An invalid `data` in config.json was pydantic's traceback; a missing config.json was said to
    record no dataset."""
    import json
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_run, damaged)
    config = json.loads((damaged / "config.json").read_text())
    config["data"]["limit"] = 3
    (damaged / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["evaluate", str(damaged)])
    assert result.exit_code == 2 and "config.json: data: keyword 'limit'" in " ".join(result.output.split())
    (damaged / "config.json").unlink()
    result = runner.invoke(app, ["evaluate", str(damaged)])
    assert result.exit_code == 2 and "config.json is missing" in result.output and "--data" in result.output


@pytest.mark.parametrize("edit", ["x", {"sizes": [1]}, {"sha256": {"train": "0"}}])
def test_evaluate_names_damaged_splits_in_config(tiny_run, tmp_path, edit):
    """A hand-edited `splits` in config.json was an AttributeError, TypeError or KeyError traceback."""
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_run, damaged)
    config = json.loads((damaged / "config.json").read_text())
    splits = {**config["splits"], **edit} if isinstance(edit, dict) else edit
    (damaged / "config.json").write_text(json.dumps({**config, "splits": splits}))
    result = runner.invoke(app, ["evaluate", str(damaged)])
    assert result.exit_code == 2 and "config.json: splits" in " ".join(result.output.split()), result.output


@pytest.mark.parametrize("limit", [[], ["--limit", "10"]])
def test_evaluate_refuses_a_folder_whose_test_split_changed(tmp_path, monkeypatch, limit):
    """An image folder that gained images after training was split again and its new 'test' split,
    partly training images, scored as a test accuracy; the run's recorded test digest now refuses it.
    With --data, also for a run trained with a limit: the held-out test split doesn't depend on it."""
    import numpy as np
    from PIL import Image

    for label, name in enumerate("abc"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(10):
            pixels = np.full((8, 8), 40 * label + i, np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: folder\ninput_shape: [8, 8, 1]\nlayers:\n  - Flatten\n"
        "  - Dense: {units: 3, activation: softmax}\n"
    )
    run, data = tmp_path / "run", f"folder:{tmp_path / 'data'}"
    train = ["train", str(spec), "--data", data, "--epochs", "1", "--threads", "1", "--out", str(run), *limit]
    assert runner.invoke(app, train).exit_code == 0
    assert runner.invoke(app, ["evaluate", str(run)]).exit_code == 0
    assert runner.invoke(app, ["evaluate", str(run), "--data", data]).exit_code == 0
    # a cache that cannot be written: capas' warning in one line, as the commands' own, not with its
    # source file and line
    (tmp_path / "cache").write_text("a file, not a folder")
    monkeypatch.setenv("CAPAS_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, ["evaluate", str(run)])
    assert result.exit_code == 0 and "warning: could not cache the decoded images at" in result.output
    assert "UserWarning" not in result.output and ".py:" not in result.output
    for i in range(5):  # 35 images: a held-out test split of 7, not 6
        Image.fromarray(np.full((8, 8), 200 + i, np.uint8)).save(tmp_path / "data" / "a" / f"new{i}.png")
    for command in (["evaluate", str(run)], ["evaluate", str(run), "--data", data]):
        result = runner.invoke(app, command)
        output = " ".join(result.output.split())
        assert result.exit_code == 2 and "no longer the one" in output and "trained on" in output, output
    config = json.loads((run / "config.json").read_text())
    del config["splits"]["sha256"]  # a run made before the digests were recorded: its test split's size tells
    (run / "config.json").write_text(json.dumps(config))
    assert "no longer the one" in runner.invoke(app, ["evaluate", str(run)]).output
    # as many images as it was tested on, other ones: such a run cannot tell (it was evaluated silently)
    for i in range(5):
        (tmp_path / "data" / "a" / f"new{i}.png").unlink()
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "data" / "a" / "0.png")
    result = runner.invoke(app, ["evaluate", str(run)])
    output = " ".join(result.output.split())
    assert result.exit_code == 0 and "warning: " in output and "records no digest of its test split" in output


@pytest.mark.parametrize("out", ["", "."])
def test_out_that_is_the_current_folder_is_refused(tmp_path, monkeypatch, out):
    """The finished run replaces its folder whole: trained into the current folder (`--out "$UNSET"`
    is `--out ""`, which is "."), it left the user's shell in a deleted folder that looked empty."""
    spec = tmp_path / "small.yaml"
    spec.write_text(
        "name: small\ninput_shape: [8, 8, 1]\nlayers:\n  - Flatten\n  - Dense: {units: 10, activation: softmax}\n"
    )
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = runner.invoke(app, ["train", str(spec), "--data", "digits", "--epochs", "1", "--out", out])
    assert result.exit_code == 2
    assert ".: the current folder" in " ".join(result.output.split())
    assert work.is_dir() and not any(work.iterdir())


@pytest.mark.parametrize(
    "options", [["--address", "head:6379"], ["--cpus-per-run", "2"], ["--gpus-per-run", "1"]]
)
def test_ray_options_without_the_ray_executor_are_refused(tmp_path, tiny_study, study_file, options):
    """They only mean something to Ray: a local study ignored --cpus-per-run and --gpus-per-run and
    trained as if they had not been given."""
    study = study_file(tiny_study(seeds=1))
    result = runner.invoke(app, ["study", str(study), "--out", str(tmp_path / "study"), *options])
    assert result.exit_code == 2
    assert f"{options[0]} goes with --executor ray" in " ".join(result.output.split())
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize(
    "options, said",
    [
        (["--cpus-per-run", "0"], "--cpus-per-run must be positive"),
        (["--address", "127.0.0.1:{port}"], "cannot reach the Ray cluster at 127.0.0.1:{port}"),
    ],
)
def test_bad_ray_options_are_refused_before_the_study_folder_is_made(
    tmp_path, tiny_study, study_file, options, said
):
    """Both were refused after the study had printed its plan and made its folder, which kept an empty
    study.sqlite and the lock."""
    pytest.importorskip("ray")
    with socket.socket() as closed:  # a port that was free a moment ago: nothing listens on it
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    options = [option.format(port=port) for option in options]
    study = study_file(tiny_study(seeds=1))
    out = tmp_path / "study"
    result = runner.invoke(app, ["study", str(study), "--out", str(out), "--executor", "ray", *options])
    assert result.exit_code == 2
    assert said.format(port=port) in " ".join(result.output.split())
    assert "runs ->" not in result.output and not out.exists()


@pytest.mark.parametrize(
    ("name", "said"), [("train", "rerun the same command to resume"), ("compress", "nothing was written")]
)
def test_ctrl_c_says_resume_only_where_a_rerun_resumes(capsys, name, said):
    """Every command said 'rerun the same command to resume'; compress, export and the others start over."""
    import typer

    from capas.cli import friendly

    def interrupted():
        raise KeyboardInterrupt

    interrupted.__name__ = name
    with pytest.raises(typer.Exit) as stopped:
        friendly(interrupted)()
    assert stopped.value.exit_code == 130
    assert (
        capsys.readouterr().err.strip()
        == f"interrupted; {'finished work is kept, ' * (name == 'train')}{said}"
    )


def test_sigterm_cleans_up_as_ctrl_c_does_and_exits_143(tmp_path, monkeypatch):
    """SIGTERM (docker stop, a scheduler, timeout) ended the process where it stood: an import, a
    compression or a finished training being written left its hidden .OUT.* folder beside OUT, and
    nothing was said. It now unwinds as Ctrl-C does."""
    import signal

    import capas.interop.keras as keras

    write_run = keras.write_run

    def terminated_while_writing(*args, **kwargs):  # the moment a scheduler's SIGTERM can come
        write_run(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(keras, "write_run", terminated_while_writing)
    received = []
    previous = signal.signal(signal.SIGTERM, lambda *args: received.append(args))  # not pytest's death
    try:
        flat = Path(__file__).parent / "fixtures" / "keras" / "flat.keras"
        result = runner.invoke(app, ["import-keras", str(flat), "--out", str(tmp_path / "imported")])
        assert signal.getsignal(signal.SIGTERM).__name__ == "<lambda>"  # the caller's handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not received
    assert result.exit_code == 143 and result.output.strip() == "interrupted; nothing was written"
    assert list(tmp_path.iterdir()) == []


def test_class_names_and_paths_print_as_written_not_as_markup(tmp_path):
    """Class names are folder names and paths are the user's: '[bold]' vanished from predict's and
    evaluate's output as rich markup, and a path holding '[/]' crashed predict with a MarkupError."""
    import numpy as np
    from PIL import Image

    for label, name in enumerate(["[bold]", "b"]):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((8, 8), 100 * label + i, np.uint8)).save(
                tmp_path / "data" / name / f"{i}.png"
            )
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: marks\ninput_shape: [8, 8, 1]\nlayers:\n  - Flatten\n  - Dense: {units: 2}\n")
    run = tmp_path / "run[/]"  # train printed its run directory as markup: a traceback once trained
    train = ["train", str(spec), "--data", f"folder:{tmp_path / 'data'}", "--epochs", "1", "--threads", "1"]
    result = runner.invoke(app, [*train, "--out", str(run)])
    assert result.exit_code == 0 and f"directory:{run}" in "".join(result.output.split()), result.output
    result = runner.invoke(app, ["evaluate", str(run)])
    assert result.exit_code == 0 and "0 [bold]" in result.output, result.output
    (tmp_path / "x[").mkdir()
    image = tmp_path / "x[/]y.png"  # the folder 'x[' and the file ']y.png'
    image.write_bytes((tmp_path / "data" / "[bold]" / "0.png").read_bytes())
    result = runner.invoke(app, ["predict", str(run), str(image), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert f"{image}: " in result.output and "[bold] 0." in result.output and "b 0." in result.output
    # serve's warning quotes --host: '[fe80::1]' vanished from it as a rich tag
    result = runner.invoke(app, ["serve", str(run), "--host", "[fe80::1]", "--port", "1"])
    assert "serving on [fe80::1] without a token" in " ".join(result.output.split()), result.output


def test_summary_of_a_run_with_a_damaged_summary_txt_prints_the_table(tiny_run, tmp_path):
    """summary.txt only adds a note above the table, which model.json gives: bytes that are not UTF-8
    in it were a UnicodeDecodeError traceback."""
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_run, damaged)
    (damaged / "summary.txt").write_bytes(b"\xff\xfe\x00")
    result = runner.invoke(app, ["summary", str(damaged)])
    assert result.exit_code == 0 and "Total params" in result.output, result.output
    # summary.txt is UTF-8 (its table's rules are '━'): in a locale that is not (C without Python's UTF-8
    # mode, ISO-8859-1), read as the locale's text it matched no table and the run's note was left out
    noted = tmp_path / "noted"
    shutil.copytree(tiny_run, noted)
    summary = noted / "summary.txt"
    summary.write_text("the note of the run\n" + summary.read_text(encoding="utf-8"), encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run(
        [sys.executable, "-m", "capas", "summary", str(noted)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the note of the run\n"), result.stdout


def test_version_option_prints_the_package_version():
    import capas

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"capas {capas.__version__}\n"


def test_a_confusion_matrix_wider_than_the_terminal_is_left_out_not_squeezed(monkeypatch):
    """1,000 classes printed a 240 KB wall of table borders into 80 columns, and took 30 s to draw."""
    import io

    from rich.console import Console

    import capas.cli as cli

    monkeypatch.setattr(cli, "console", Console(file=io.StringIO(), width=80))
    classes = [f"class{i}" for i in range(200)]
    cli._print_confusion(
        classes, [[int(i == j) for j in range(200)] for i in range(200)], " (test.json holds it)"
    )
    printed = " ".join(cli.console.file.getvalue().split())
    assert printed == (
        "confusion matrix of 200 classes left out: it needs 1,097 columns, the terminal has 80 (test.json holds it)"
    )
    cli._print_confusion(
        classes[:10], [[100 * (i == j) for j in range(10)] for i in range(10)]
    )  # fits: a table
    assert "confusion matrix (rows: true class, columns: predicted)" in cli.console.file.getvalue()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux' /dev/full")
def test_an_output_that_cannot_be_written_is_one_line_not_a_traceback():
    """`capas info > /dev/full` (a full disk) ended in OSError's traceback."""
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "capas", "info"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1
    assert done.stderr.strip() == "error: cannot write the output (No space left on device)", done.stderr
