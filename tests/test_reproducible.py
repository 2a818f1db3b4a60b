"""Reproducibility and devices: results independent of the worker layout, determinism as a recorded
training setting, resumes refused under other settings, worker counts, GPU counts and --device."""

from __future__ import annotations

import contextlib
import json
import os
from unittest import mock

import pytest
import torch
import yaml
from rich.console import Console
from typer.testing import CliRunner

import capas.train.loop
from capas.cli import app
from capas.data import make_splits
from capas.errors import CapasError
from capas.models import build_model, preprocess_for
from capas.spec import DataConfig, ModelSpec, TrainConfig, load_spec
from capas.study import executors
from capas.study.executors import default_workers, make_executor, ray_slots
from capas.study.run import run_study
from capas.study.store import Store
from capas.train import Callback, distributed, fit, train
from capas.train.reproducible import reproducible

runner = CliRunner()

SMALL = {
    "name": "small",
    "input_shape": [28, 28, 1],
    "layers": [
        {"Conv2D": {"filters": 8, "kernel_size": 3, "activation": "relu"}},
        {"MaxPooling2D": {"pool_size": 2}},
        "Flatten",
        {"Dense": {"units": 10, "activation": "softmax"}},
    ],
}


def test_a_study_gives_the_same_runs_with_one_worker_or_two(tmp_path):
    """One worker ran each run with all of torch's threads, two with one each: the conv reductions split
    differently and the Flatten run's test loss differed in the 7th digit. Studies now fix train.threads."""
    doc = {
        "name": "layout",
        "base": {
            "name": "Flatten",
            "spec": SMALL,
            "train": {"epochs": 1, "batch_size": 32},
            "data": {"name": "fashion-mnist", "limit": 600},
        },
        "seeds": 1,
        "variations": [
            {
                "name": "head",
                "alternatives": [{"name": "GAP", "replace": {"layer": 2, "with": "GlobalAveragePooling2D"}}],
            }
        ],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    console = Console(file=open(tmp_path / "log.txt", "w"))  # noqa: SIM115
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"workers-{workers}"
        run_study(path, out=out, workers=workers, console=console)
        with Store(out / "study.sqlite") as store:
            runs[workers] = {
                rid: (
                    row.result["test_loss"],
                    row.result["test_accuracy"],
                    [m["loss"] for m in row.result["history"]],
                )
                for rid, row in store.runs().items()
            }
        config = json.loads((out / "runs" / "Flatten" / "seed-0" / "config.json").read_text())
        assert config["train"]["threads"] == 1  # recorded in the run
    assert sorted(runs[1]) == ["Flatten/seed-0", "GAP/seed-0"]
    assert runs[1] == runs[2]


class _Watch(Callback):
    """Records the global settings as the training loop sees them."""

    def __init__(self):
        self.seen = []

    def on_batch_end(self, images, loss, correct):
        self.seen.append(
            (
                torch.are_deterministic_algorithms_enabled(),
                torch.backends.cudnn.deterministic,
                torch.get_num_threads(),
                os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                torch.utils.deterministic.fill_uninitialized_memory,
            )
        )


@pytest.mark.parametrize("deterministic", [True, False])
def test_determinism_and_threads_apply_while_fit_trains_and_are_restored(deterministic):
    splits = make_splits("fashion-mnist", limit=200)
    spec = ModelSpec.from_dict(SMALL)
    model = build_model(spec)
    # fit seeds torch's generator each epoch: a caller's draws after it were the same whatever it seeded
    rng = torch.get_rng_state()
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.get_num_threads(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    watch = _Watch()
    cfg = TrainConfig(epochs=1, batch_size=64, deterministic=deterministic, threads=1)
    fit(model, splits.train, splits.val, preprocess_for(spec), cfg, callbacks=[watch])
    assert watch.seen and {s[:3] for s in watch.seen} == {(deterministic, deterministic, 1)}
    if deterministic:  # what cuBLAS needs on a GPU (harmless on the CPU)
        assert watch.seen[0][3] == ":4096:8"
    assert {s[4] for s in watch.seen} == {False}  # new tensors are not filled first
    after = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.get_num_threads(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    assert after == before
    assert torch.equal(torch.get_rng_state(), rng)


AIRBENCH_LIKE = {
    "name": "airbench-like",
    "input_shape": [28, 28, 1],
    "layers": [
        {"Conv2D": {"filters": 16, "kernel_size": 3, "padding": "same", "use_bias": False}},
        {"MaxPooling2D": {"pool_size": 2}},
        {"BatchNormalization": {"momentum": 0.6, "scale": False}},
        {"Activation": {"activation": "gelu"}},
        {"Conv2D": {"filters": 32, "kernel_size": 3, "padding": "same", "use_bias": False}},
        {"MaxPooling2D": {"pool_size": 2}},
        {"BatchNormalization": {}},
        {"Activation": {"activation": "gelu"}},
        "GlobalMaxPooling2D",
        {"Dropout": {"rate": 0.2}},
        {"Dense": {"units": 10, "activation": "softmax"}},
    ],
}


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_two_deterministic_trainings_give_identical_weights(precision):
    """With new tensors left unfilled (above) and the heap kept (capas.cpu.kept_heap), a rerun of the
    same training still ends bit for bit where the first did, and where a training with both undone
    (new tensors filled first, glibc's default heap) ends: no operation reads memory it did not write."""
    splits = make_splits("fashion-mnist", limit=600)
    spec = ModelSpec.from_dict(AIRBENCH_LIKE)
    cfg = TrainConfig(
        epochs=2,
        batch_size=128,
        precision=precision,
        augment={"hflip": "alternate", "crop_padding": 2, "crop_fill": "reflect"},
    )
    weights = []
    for as_before in (False, False, True):
        model = build_model(spec, seed=0)
        with contextlib.ExitStack() as undone:
            if as_before:
                undone.enter_context(mock.patch.object(capas.train.loop, "kept_heap", contextlib.nullcontext))
                undone.enter_context(mock.patch.object(capas.train.loop, "reproducible", _filling))
            fit(model, splits.train, splits.val, preprocess_for(spec), cfg)
        weights.append(model.state_dict())
    for other in weights[1:]:
        assert weights[0].keys() == other.keys()
        for name, value in weights[0].items():
            assert torch.equal(value, other[name]), name


@contextlib.contextmanager
def _filling(cfg):
    """capas' reproducible() with deterministic mode's filling of new tensors back on."""
    with reproducible(cfg):
        torch.utils.deterministic.fill_uninitialized_memory = cfg.deterministic
        yield


def test_the_run_records_its_determinism_and_threads(tiny_run):
    recorded = json.loads((tiny_run / "config.json").read_text())["train"]
    assert (recorded["deterministic"], recorded["threads"]) == (True, None)


def test_cli_turns_determinism_off_and_records_it(tmp_path):
    spec = tmp_path / "small.yaml"
    spec.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "run"
    args = ["train", str(spec), "--limit", "200", "--epochs", "1", "--out", str(out)]
    result = runner.invoke(app, [*args, "--nondeterministic", "--threads", "1"])
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "config.json").read_text())["train"]
    assert (recorded["deterministic"], recorded["threads"]) == (False, 1)


class _Interrupt(Callback):
    """Stops a run in its second epoch, after the first epoch's checkpoint was written."""

    def on_epoch_end(self, metrics):
        self.epoch = metrics["epoch"]

    def on_batch_end(self, images, loss, correct):
        if getattr(self, "epoch", 0) >= 1:
            raise KeyboardInterrupt


def test_train_refuses_to_resume_under_other_settings_and_restarts_when_asked(tmp_path):
    spec_file = tmp_path / "small.yaml"
    spec_file.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(
            load_spec(spec_file),
            DataConfig(name="fashion-mnist", limit=300),
            TrainConfig(epochs=3, batch_size=64),
            out,
            callbacks=[_Interrupt()],
        )
    assert (out / "checkpoint.safetensors").exists()
    args = ["train", str(spec_file), "--data", "fashion-mnist", "--limit", "300", "--epochs", "3"]
    args += ["--batch-size", "64", "--out", str(out)]

    changed = runner.invoke(app, [*args, "--lr", "0.05", "--seed", "1"])
    message = " ".join(changed.output.split())
    assert changed.exit_code == 2, changed.output
    assert "holds an unfinished run made with other settings" in message
    assert "train.optimizer.lr: None -> 0.05; train.seed: 0 -> 1" in message and "--restart" in message
    assert not (out / "test.json").exists()  # nothing was trained or written

    restarted = runner.invoke(app, [*args, "--lr", "0.05", "--seed", "1", "--restart"])
    assert restarted.exit_code == 0, restarted.output
    recorded = json.loads((out / "config.json").read_text())["train"]
    assert (recorded["optimizer"]["lr"], recorded["seed"]) == (0.05, 1)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3  # all three epochs, from the start


def test_train_resumes_under_the_same_settings(tmp_path):
    spec = ModelSpec.from_dict(SMALL)
    data, cfg, out = (
        DataConfig(name="fashion-mnist", limit=300),
        TrainConfig(epochs=2, batch_size=64),
        tmp_path / "r",
    )
    with pytest.raises(KeyboardInterrupt):
        train(spec, data, cfg, out, callbacks=[_Interrupt()])
    results = train(spec, data, cfg, out)
    assert results["epochs_run"] == 2 and not (out / "checkpoint.safetensors").exists()


def test_default_workers_follow_gpus_with_cuda_and_threads_without():
    # a 3×3 study on one GPU and 16 cores used to start 9 workers, each with its own CUDA context
    assert default_workers(9, threads=1, cuda=True, cores=16, gpus=1) == 1
    assert default_workers(9, threads=1, cuda=True, cores=16, gpus=2) == 2
    assert default_workers(9, threads=1, cuda=True, cores=16, gpus=1, runs_per_gpu=3) == 3
    assert default_workers(9, threads=1, cuda=False, cores=16, gpus=1) == 9
    assert default_workers(9, threads=4, cuda=False, cores=16, gpus=0) == 4
    assert default_workers(9, threads=1, cuda=False, cores=2, gpus=0) == 2
    assert default_workers(1, threads=1, cuda=False, cores=16, gpus=0) == 1
    assert default_workers(4, threads=32, cuda=False, cores=16, gpus=0) == 1


def test_make_executor_uses_the_gpu_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(executors, "available_cores", lambda: 16)
    with make_executor(None, 9, threads=1, cuda=True) as executor:  # no run submitted: no process starts
        assert executor.workers == 2


def test_ray_counts_gpus_per_run_in_the_worker_total():
    assert ray_slots(cpus=16, gpus=1, cpus_per_run=1, gpus_per_run=1) == 1
    assert ray_slots(cpus=16, gpus=4, cpus_per_run=2, gpus_per_run=0.5) == 8
    assert ray_slots(cpus=16, gpus=0, cpus_per_run=1, gpus_per_run=0) == 16
    assert ray_slots(cpus=16, gpus=0, cpus_per_run=1, gpus_per_run=1) == 0  # refused by RayExecutor


@pytest.fixture
def one_gpu(monkeypatch):
    """A machine that reports one CUDA GPU (nothing touches it: the check comes first)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_torchrun_with_more_processes_than_gpus_says_so(one_gpu, monkeypatch):
    for name, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    with (
        pytest.raises(
            CapasError, match=r"^torchrun --nproc-per-node 2 with device cuda needs 2 GPUs; 1 found$"
        ),
        distributed.process_group("cuda"),
    ):
        pass


def test_nproc_with_more_processes_than_gpus_says_the_same(one_gpu):
    spec = ModelSpec.from_dict(SMALL)
    with pytest.raises(CapasError, match=r"^--nproc 2 with device cuda needs 2 GPUs; 1 found$"):
        distributed.launch(spec, DataConfig(), TrainConfig(device="cuda", batch_size=64), "unused", 2)


def _missing_device() -> str:
    if not torch.cuda.is_available():
        return "cuda"
    if not torch.backends.mps.is_available():
        return "mps"
    pytest.skip("every device kind is available here")


@pytest.mark.parametrize("command", ["evaluate", "predict", "serve"])
def test_device_option_names_an_unavailable_or_unknown_device(command, tiny_run, tmp_path):
    extra = [str(tmp_path / "none.png")] if command == "predict" else []
    missing = _missing_device()
    result = runner.invoke(app, [command, str(tiny_run), *extra, "--device", missing])
    assert (
        result.exit_code == 2
        and f"device '{missing}': " in result.output
        and "use auto or cpu" in result.output
    )
    unknown = runner.invoke(app, [command, str(tiny_run), *extra, "--device", "tpu"])
    assert unknown.exit_code == 2 and "device" in unknown.output and "mps" in unknown.output


def test_evaluate_loads_the_run_on_the_device_asked_for(tiny_run):
    result = runner.invoke(app, ["evaluate", str(tiny_run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    test = json.loads((tiny_run / "test.json").read_text())
    assert f"test accuracy {test['test_accuracy']:.4f}" in result.output
