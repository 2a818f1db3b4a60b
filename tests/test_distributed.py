"""One run over 2 real processes on the CPU (gloo) matches one process with the same global batch:
launched with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) and with `--nproc 2`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from capas.cli import app
from capas.data import default_preprocess, make_splits
from capas.errors import CapasError
from capas.inference import evaluate
from capas.models import build_model
from capas.models.modules import KerasBatchNorm2d
from capas.spec import DataConfig, ModelSpec, TrainConfig
from capas.train import fit, train
from capas.train.distributed import Distributed, check, free_port, launch

# 600 images: the training split's last batch is partial, so the uneven split of a batch is covered too
ARGS = [
    "--data",
    "fashion-mnist",
    "--limit",
    "600",
    "--test-limit",
    "200",
    "--epochs",
    "2",
    "--batch-size",
    "32",
]
ARGS += ["--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--device", "cpu", "--seed", "3"]


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory, small_spec) -> Path:
    # the small spec has no Dropout or BatchNorm: the two ways of training compute the same function
    path = tmp_path_factory.mktemp("spec") / "ddp.yaml"
    path.write_text(yaml.safe_dump(small_spec))
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory, small_spec) -> Path:
    """The reference: the same run in this one process."""
    out = tmp_path_factory.mktemp("single") / "run"
    cfg = TrainConfig(
        epochs=2, batch_size=32, seed=3, device="cpu", optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9}
    )
    train(
        ModelSpec.from_dict(small_spec), DataConfig(name="fashion-mnist", limit=600, test_limit=200), cfg, out
    )
    return out


def _command(spec_file: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "capas", "train", str(spec_file), *ARGS, "--out", str(out), *extra]


def _assert_same_run(run: Path, reference: Path) -> None:
    weights, expected = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert weights.keys() == expected.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
    history = [yaml.safe_load(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    single = [yaml.safe_load(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == len(single) == 2
    for mine, theirs in zip(history, single, strict=True):  # reduced over both processes
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4), key
    test, expected_test = (yaml.safe_load((p / "test.json").read_text()) for p in (run, reference))
    assert test["test_loss"] == pytest.approx(expected_test["test_loss"], rel=1e-4)
    assert test["confusion_matrix"] == expected_test["confusion_matrix"]
    assert not (run / "checkpoint.safetensors").exists()
    configs = [json.loads((path / "config.json").read_text()) for path in (run, reference)]
    assert [config["processes"] for config in configs] == [2, 1]  # how each was trained


def test_two_processes_under_torchrun_environment_match_one(spec_file, single, tmp_path):
    out = tmp_path / "ddp"
    port = str(free_port())
    processes = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }
        processes.append(
            subprocess.Popen(
                _command(spec_file, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    outputs = [p.communicate(timeout=120)[0].decode() for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert "test accuracy" in outputs[0] and "test accuracy" not in outputs[1]  # rank 0 alone reports
    _assert_same_run(out, single)


def test_nproc_2_spawns_the_processes_itself(spec_file, single, tmp_path):
    out = tmp_path / "nproc"
    done = subprocess.run(
        _command(spec_file, out, "--nproc", "2"), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "test accuracy" in done.stdout
    # each epoch's line, on stdout as with one process (it went to stderr: `> log.txt` lost the curve)
    assert "epoch   2  loss" in done.stdout and "epoch   2" not in done.stderr
    _assert_same_run(out, single)


def test_a_batch_that_does_not_split_over_the_processes_is_refused(spec_file, tmp_path):
    result = CliRunner().invoke(
        app, ["train", str(spec_file), "--batch-size", "33", "--nproc", "2", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2
    assert "batch_size 33 does not split over 2 processes" in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_sigterm_to_the_nproc_driver_alone_stops_its_processes(spec_file, tmp_path):
    """A scheduler's SIGTERM (or a kill) reaches the driver alone, not its processes as a terminal's
    Ctrl-C does: the processes trained on to the last epoch and the driver waited for them."""
    out = tmp_path / "run"
    driver = subprocess.Popen(
        _command(spec_file, out, "--nproc", "2", "--epochs", "500"), stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    driver.send_signal(signal.SIGTERM)
    _, errors = driver.communicate(timeout=30)
    assert driver.returncode == 143, errors
    assert errors.strip().endswith("interrupted; finished work is kept, rerun the same command to resume")
    assert not (out / "test.json").exists() and (out / "checkpoint.safetensors").exists()


def test_an_out_folder_that_is_not_a_run_is_refused_before_the_processes_start(spec_file, tmp_path):
    """Rank 0 refused it once both processes had started (17 s here), followed by PyTorch's
    "Terminating process … via signal SIGTERM" and "error: training process 0 exited with status 1"."""
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["train", str(spec_file), *ARGS, "--nproc", "2", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.count("error") == 1 and "not a run directory (it holds notes.txt)" in result.output
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_launch_from_a_script_without_the_main_guard_names_it(spec_file, tmp_path):
    """Each spawned process imports the main script again: unguarded, it called launch once more and
    multiprocessing's 40-line RuntimeError ("…bootstrapping phase…") came out of every process before
    "training process 0 exited with status 1". Now the script's launch() says what to do, once."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from capas.spec import DataConfig, TrainConfig, load_spec\n"
        "from capas.train.distributed import launch\n"
        f"launch(load_spec({str(spec_file)!r}), DataConfig(name='digits'), TrainConfig(batch_size=32), "
        f"{str(tmp_path / 'run')!r}, 2, progress=False)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "bootstrapping" not in done.stderr
    assert done.stderr.count("launch() ran again") == 1
    assert done.stderr.splitlines()[-1].startswith("capas.errors.CapasError: launch() ran again in each")
    assert 'under `if __name__ == "__main__":`' in done.stderr
    assert "exited with status" not in done.stderr


def test_the_frozen_rows_cache_is_refused_before_the_processes_start():
    """It was refused by each process once both had started (a minute here), then "training process
    1 exited with status 1"; now as the batch size is, before any starts."""
    with pytest.raises(CapasError, match=r"train\.cache_frozen trains in one process"):
        check(TrainConfig(cache_frozen=True), 2)


BATCHNORM = {
    "name": "bn",
    "input_shape": [8, 8, 1],
    "layers": [
        {"Conv2D": {"filters": 4, "kernel_size": 3}},
        {"BatchNormalization": {}},
        "Flatten",
        {"Dense": {"units": 10, "activation": "softmax"}},
    ],
}


def _evaluate_rank(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    spec = ModelSpec.from_dict(BATCHNORM)
    model = build_model(spec, seed=0).eval()
    if rank:  # on the CPU each rank's statistics moved with its own share of the last batches
        model.layers["batch_normalization"].running_mean += 1.0
    split = make_splits("digits", limit=100).test
    for name, data in (("all", split), ("one", split.subset(torch.arange(1)))):
        result = Distributed(rank, 2, rank).evaluate(model, data, default_preprocess(spec.input_shape))
        (out / f"{name}-{rank}.txt").write_text(repr(result.loss))
    torch_dist.barrier()  # leave together, as capas' own processes do (distributed.py: SIGABRT otherwise)
    torch_dist.destroy_process_group()


def test_the_processes_evaluate_the_model_rank_0_saves(tmp_path):
    """Validation and test are sharded: each rank scored its half with its own BatchNorm statistics,
    so test.json's loss and accuracy (2.1506, 22.56% in a 2-process run) were not those of the saved
    model (2.1559, 22.01% by capas evaluate). Every rank now evaluates rank 0's. A split of one
    image (a validation split of --limit 10) left rank 0 none: torch.cat's ValueError."""
    mp.start_processes(_evaluate_rank, args=(free_port(), tmp_path), nprocs=2, start_method="spawn")
    spec = ModelSpec.from_dict(BATCHNORM)
    split = make_splits("digits", limit=100).test
    for name, data in (("all", split), ("one", split.subset(torch.arange(1)))):
        saved = evaluate(build_model(spec, seed=0), data, default_preprocess(spec.input_shape))
        for rank in range(2):
            loss = float((tmp_path / f"{name}-{rank}.txt").read_text())
            assert loss == pytest.approx(saved.loss, rel=1e-6), (name, rank)


DROPOUT = {
    "name": "drop",
    "input_shape": [8, 8, 1],
    "layers": [
        {"Dropout": {"rate": 0.5}},
        "Flatten",
        {"Dense": {"units": 10, "activation": "softmax"}},
    ],
}


def _dropout_rank(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    spec = ModelSpec.from_dict(DROPOUT)
    model = build_model(spec, seed=0)
    kept = []  # per step: this rank's share of the batch, and which of its values the Dropout kept
    model.layers["dropout"].register_forward_hook(
        lambda module, inputs, output: kept.append((inputs[0] != 0, output != 0)) if module.training else None
    )
    splits = make_splits("digits", limit=64)
    cfg = TrainConfig(epochs=1, batch_size=16, device="cpu", threads=1)
    fit(
        model,
        splits.train,
        splits.val,
        default_preprocess(spec.input_shape),
        cfg,
        dist=Distributed(rank, 2, rank),
    )
    torch.save(kept, out / f"kept-{rank}.pt")
    torch_dist.barrier()  # leave together: rank 1 was once killed by SIGABRT when rank 0 left first
    torch_dist.destroy_process_group()


def test_each_process_draws_its_own_dropout_masks(tmp_path):
    """Every process seeded the global generator alike, so the k-th image of rank 1's share got the
    mask of the k-th image of rank 0's: half the masks of every batch were copies (here 100% of the
    values both kept or both dropped, where independent masks agree on half)."""
    mp.start_processes(_dropout_rank, args=(free_port(), tmp_path), nprocs=2, start_method="spawn")
    first, second = (torch.load(tmp_path / f"kept-{rank}.pt", weights_only=True) for rank in range(2))
    assert len(first) == len(second) == 4
    for (nonzero_0, kept_0), (nonzero_1, kept_1) in zip(first, second, strict=True):
        both = nonzero_0 & nonzero_1  # where the input is zero, the output is zero whatever the mask
        agree = (kept_0 == kept_1)[both].float().mean().item()
        assert 0.3 < agree < 0.7, agree


def test_launch_validates_a_config_changed_after_it_was_made(tmp_path):
    """The processes validated the config they were sent, so an assignment pydantic does not check
    (`cfg.epochs = 0`) came back as "a training process failed: For further information visit
    https://errors.pydantic.dev/…" once both had started."""
    spec = ModelSpec.from_dict(BATCHNORM)
    cfg = TrainConfig(batch_size=32)
    cfg.epochs = 0
    with pytest.raises(CapasError, match=r"^launch\(\): cfg: keyword 'epochs': .* \(given 0\)$"):
        launch(spec, DataConfig(name="digits"), cfg, tmp_path / "run", 2)
    assert not (tmp_path / "run").exists()


KERAS_BATCHNORM = {
    "name": "bn_kinds",
    "input_shape": [8, 8, 1],
    "layers": [
        {"Conv2D": {"filters": 4, "kernel_size": 3}},
        {"BatchNormalization": {"scale": False}},
        {"BatchNormalization": {"trainable": False}},
        "Flatten",
        {"Dense": {"units": 10, "activation": "softmax"}},
    ],
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])  # fmt: skip
def test_ddp_trains_through_capas_own_batchnorm_layers(device):
    """On GPUs, wrap() made every BatchNorm PyTorch's SyncBatchNorm: a `scale: false` layer's bias got
    no gradient (so it never trained), the frozen layer trained (CapasNet.train() kept the replaced
    module in eval mode), and the moving variance was PyTorch's unbiased one, not Keras'."""
    model = build_model(ModelSpec.from_dict(KERAS_BATCHNORM), seed=0).to(device)
    torch_dist.init_process_group(
        "gloo" if device == "cpu" else "nccl",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        device_id=None if device == "cpu" else torch.device(device),
    )
    try:
        net = Distributed(0, 1, 0).wrap(model)
        model.train()
        shifting, frozen = model.layers["batch_normalization"], model.layers["batch_normalization_1"]
        assert type(shifting) is type(frozen) is KerasBatchNorm2d
        assert not frozen.training
        net(torch.rand(6, 1, 8, 8, device=device)).sum().backward()
        assert shifting.bias.grad is not None and shifting.bias.grad.abs().sum() > 0
        assert torch.equal(frozen.running_var, torch.ones_like(frozen.running_var))
    finally:
        torch_dist.destroy_process_group()
