"""Training end to end on real Fashion-MNIST images: accuracy, determinism, resume, early stopping, run directories."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import typing

import pytest
import torch

from capas.atomic import write_text
from capas.data import ArrayDataset, default_preprocess, iterate_batches, make_splits
from capas.errors import CapasError
from capas.inference import eval_batch_size, evaluate, model_device
from capas.models import build_model
from capas.predict import evaluate_run, predict, run_splits
from capas.runs import load_run
from capas.spec import DataConfig, ModelSpec, TrainConfig
from capas.spec.io import parse_config
from capas.spec.train import FinetuneConfig, MuonConfig, _Config
from capas.train import Callback, fit, train
from capas.train.optim import Plateau


def test_training_beats_chance_by_a_wide_margin(tiny_run):
    test = json.loads((tiny_run / "test.json").read_text())
    assert test["test_accuracy"] > 0.5  # ten classes: chance is 0.1
    assert sum(map(sum, test["confusion_matrix"])) == 400  # test_limit
    metrics = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert test["stopped"] == "max epochs" and test["epochs_run"] == 2 and test["best_epoch"] == 2
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["splits"]["sizes"] == {"train": 2000, "val": 200, "test": 400}
    assert config["environment"]["torch"] == torch.__version__
    assert not (tiny_run / "checkpoint.safetensors").exists()


def _trained_device(run_dir) -> str:
    """The device a run trained and was tested on (a GPU when the suite runs on one)."""
    return json.loads((run_dir / "config.json").read_text())["device"]


def test_run_directory_loads_back_with_the_same_predictions(tiny_run):
    run = load_run(tiny_run, device=_trained_device(tiny_run))
    _, evaluation = evaluate_run(run)
    test = json.loads((tiny_run / "test.json").read_text())
    assert evaluation.confusion(10).tolist() == test["confusion_matrix"]
    assert evaluation.loss == pytest.approx(test["test_loss"], rel=1e-5)
    splits = make_splits("fashion-mnist", limit=2000, test_limit=400)
    images = list(splits.test.images[:5])
    assert [p.index for p in predict(run, images)] == evaluation.predictions[:5].tolist()


class _BatchSizes(torch.nn.Module):
    """A run's model, noting the size of every batch it is called on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x):
        self.sizes.append(len(x))
        return self.model(x)


def test_predict_runs_many_images_in_evaluation_batches(tiny_run):
    """capas predict on thousands of files ran them as one batch (out of memory for large inputs)."""
    run = load_run(tiny_run)
    images = list(make_splits("fashion-mnist", limit=600).train.images)
    alone = predict(run, images[:3])
    counted = dataclasses.replace(run, model=_BatchSizes(run.model))
    predictions = predict(counted, images)
    size = eval_batch_size(run.preprocess, model_device(run.model))
    assert counted.model.sizes == [size, len(images) - size]
    assert [p.index for p in predictions[:3]] == [p.index for p in alone]
    assert predict(run, []) == []


def _small(seed=0, **train):
    spec = ModelSpec.from_dict(
        {
            "name": "small",
            "input_shape": [28, 28, 1],
            "layers": [
                {"Conv2D": {"filters": 4, "kernel_size": 3, "strides": 2, "activation": "relu"}},
                "Flatten",
                {"Dropout": {"rate": 0.2}},
                {"Dense": {"units": 10, "activation": "softmax"}},
            ],
        }
    )
    return (
        spec,
        DataConfig(limit=600, test_limit=400),
        TrainConfig(epochs=3, batch_size=32, seed=seed, **train),
    )


def test_same_command_twice_gives_the_same_metrics(tmp_path):
    spec, data, cfg = _small()
    first = train(spec, data, cfg, tmp_path / "a")
    second = train(spec, data, cfg, tmp_path / "b")
    assert first["confusion_matrix"] == second["confusion_matrix"]
    assert first["test_loss"] == second["test_loss"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


class _Crash(Callback):
    """Simulates the process dying in the middle of epoch `epoch`."""

    def __init__(self, epoch: int):
        self.epoch, self.batches = epoch, 0

    def on_fit_start(self, epochs, steps_per_epoch, start_epoch):
        self.limit = (self.epoch - 1 - start_epoch) * steps_per_epoch + steps_per_epoch // 2

    def on_batch_end(self, images, loss, correct):
        self.batches += 1
        if self.batches > self.limit:
            raise KeyboardInterrupt


def test_an_interrupted_run_resumes_to_the_same_result(tmp_path):
    spec, data, cfg = _small(seed=3)
    reference = train(spec, data, cfg, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train(spec, data, cfg, tmp_path / "cut", callbacks=[_Crash(epoch=3)])
    assert (tmp_path / "cut" / "checkpoint.safetensors").exists()
    assert not (tmp_path / "cut" / "test.json").exists()
    resumed = train(spec, data, cfg, tmp_path / "cut")
    assert resumed["confusion_matrix"] == reference["confusion_matrix"]
    assert resumed["test_loss"] == reference["test_loss"]
    history = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in history] == [1, 2, 3]


class _CrashBeforeTest(Callback):
    """Simulates the process dying after the last epoch's checkpoint, while it tests."""

    def on_fit_end(self, result):
        raise KeyboardInterrupt


def test_a_resumed_run_counts_the_wall_time_of_its_earlier_processes(tmp_path):
    """test.json's wall_seconds was the last process' alone: a run killed while testing and rerun
    recorded 0.03 s of wall time for 0.5 s of training steps."""
    spec, data, cfg = _small()
    with pytest.raises(KeyboardInterrupt):
        train(spec, data, cfg, tmp_path / "run", callbacks=[_CrashBeforeTest()])
    resumed = train(spec, data, cfg, tmp_path / "run")
    assert resumed["epochs_run"] == 3 and resumed["wall_seconds"] >= resumed["train_seconds"] > 0


def test_a_checkpoint_from_before_the_process_count_was_recorded_resumes(tmp_path):
    """Checkpoints written before their identity held `processes` (a study interrupted before an
    upgrade) resume as one process' run, not refused as 'made with other settings'. One that lacks
    other settings (capas before 2026-11-27 recorded neither splits nor train.winograd) is refused as
    an older capas' checkpoint, not with the advice to rerun with settings the user did rerun with."""
    from safetensors import safe_open
    from safetensors.torch import load, save_file

    spec, data, cfg = _small(seed=3)
    reference = train(spec, data, cfg, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train(spec, data, cfg, tmp_path / "cut", callbacks=[_Crash(epoch=3)])
    checkpoint = tmp_path / "cut" / "checkpoint.safetensors"
    # read into memory: the file is rewritten in place below, and safetensors < 0.8 maps what load_file
    # returns, so reading those tensors after the rewrite was a SIGBUS
    tensors = load(checkpoint.read_bytes())
    with safe_open(str(checkpoint), framework="pt") as file:
        meta = json.loads(file.metadata()["capas"])
    del meta["identity"]["processes"]
    older = json.loads(json.dumps(meta))
    del older["identity"]["splits"], older["identity"]["train"]["winograd"]
    save_file(tensors, str(checkpoint), metadata={"capas": json.dumps(older)})
    with pytest.raises(
        CapasError, match=r"older capas, which did not record splits, train.winograd: .*--restart"
    ):
        train(spec, data, cfg, tmp_path / "cut")
    # capas before 2026-11-25 recorded no settings: it resumed unchecked (a KeyError traceback, or
    # another --lr than the checkpoint's taken silently)
    del older["identity"]
    save_file(tensors, str(checkpoint), metadata={"capas": json.dumps(older)})
    with pytest.raises(CapasError, match=r"older capas, which did not record data, spec, splits, train: "):
        train(spec, data, cfg, tmp_path / "cut")
    save_file(tensors, str(checkpoint), metadata={"capas": json.dumps(meta)})
    resumed = train(spec, data, cfg, tmp_path / "cut")
    assert resumed["confusion_matrix"] == reference["confusion_matrix"]
    assert resumed["test_loss"] == reference["test_loss"]


def test_a_run_does_not_resume_on_a_folder_that_changed(tmp_path):
    """An image folder that gained images after the interruption was split again and the run
    resumed on it: images of its first epochs could land in the new test split."""
    import numpy as np
    from PIL import Image

    for label, name in enumerate("abc"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(np.full((8, 8), 40 * label + i, np.uint8)).save(
                tmp_path / "data" / name / f"{i}.png"
            )
    spec = ModelSpec.from_dict(
        {
            "name": "f",
            "input_shape": [8, 8, 1],
            "layers": ["Flatten", {"Dense": {"units": 3, "activation": "softmax"}}],
        }
    )
    data, cfg = DataConfig(name=f"folder:{tmp_path / 'data'}"), TrainConfig(epochs=3, batch_size=8)
    with pytest.raises(KeyboardInterrupt):
        train(spec, data, cfg, tmp_path / "run", callbacks=[_Crash(epoch=2)])
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "data" / "a" / "new.png")
    with pytest.raises(CapasError, match=r"other settings \(splits.sha256.test: "):
        train(spec, data, cfg, tmp_path / "run")


def test_early_stopping_keeps_the_best_epoch_weights():
    spec, _, _ = _small()
    cfg = TrainConfig(
        epochs=4,
        batch_size=32,
        optimizer={"name": "sgd", "lr": 0.5},
        early_stopping={"monitor": "val_loss", "patience": 10},
    )
    splits = make_splits("fashion-mnist", limit=600)
    preprocess = default_preprocess(spec.input_shape)
    model = build_model(spec, seed=0)
    result = fit(model, splits.train, splits.val, preprocess, cfg)
    losses = [m["val_loss"] for m in result.history]
    assert result.best_epoch == losses.index(min(losses)) + 1
    assert evaluate(model, splits.val, preprocess).loss == pytest.approx(min(losses), rel=1e-5)


def test_patience_stops_training_and_says_so():
    spec, _, _ = _small()
    cfg = TrainConfig(
        epochs=30,
        batch_size=32,
        optimizer={"lr": 0.05},
        early_stopping={"monitor": "val_accuracy", "patience": 1, "min_delta": 0.5},
    )
    splits = make_splits("fashion-mnist", limit=300)
    result = fit(build_model(spec), splits.train, splits.val, default_preprocess(spec.input_shape), cfg)
    assert result.stopped == "early stopping"
    assert len(result.history) == 2 and result.best_epoch == 1


def test_reduce_on_plateau_lowers_the_rate_of_the_next_epochs_and_resumes(tmp_path):
    spec, _, _ = _small()
    schedule = {"name": "plateau", "factor": 0.5, "patience": 1, "min_delta": 0.0}
    cfg = TrainConfig(epochs=5, batch_size=32, optimizer={"name": "sgd", "lr": 0.3}, schedule=schedule)
    splits = make_splits("fashion-mnist", limit=300)
    preprocess = default_preprocess(spec.input_shape)
    result = fit(build_model(spec, seed=0), splits.train, splits.val, preprocess, cfg)
    replay, expected = Plateau(cfg.schedule, 0.3), []
    for m in result.history:
        expected.append(0.3 * replay.scale)  # the rate an epoch trains at: set by the epochs before it
        replay.update(m["val_loss"])
    assert [m["lr"] for m in result.history] == pytest.approx(expected)
    assert min(expected) < 0.3  # the case really reduces the rate
    # interrupted after 3 epochs and resumed: the plateau's state comes back with the checkpoint
    ck = tmp_path / "ck.safetensors"
    fit(
        build_model(spec, seed=0),
        splits.train,
        splits.val,
        preprocess,
        cfg.model_copy(update={"epochs": 3}),
        checkpoint=ck,
    )
    resumed = fit(build_model(spec, seed=0), splits.train, splits.val, preprocess, cfg, checkpoint=ck)
    assert [m["lr"] for m in resumed.history] == pytest.approx(expected)


def test_sample_budget_stops_within_the_epoch():
    spec, _, _ = _small()
    splits = make_splits("fashion-mnist", limit=600)
    cfg = TrainConfig(epochs=5, batch_size=50, max_samples=300)
    result = fit(build_model(spec), splits.train, splits.val, default_preprocess(spec.input_shape), cfg)
    assert result.stopped == "sample budget"
    assert result.images == 300 and len(result.history) == 1


class _Batches(Callback):
    def __init__(self):
        self.sizes = []

    def on_batch_end(self, images, loss, correct):
        self.sizes.append(images)


@pytest.mark.parametrize("drop_last", [False, True])
def test_drop_last_leaves_out_each_epochs_short_batch_and_the_schedule_still_ends(drop_last):
    """600 training images in batches of 256: 256, 256, 88, or with drop_last two full batches (a new
    shuffle each epoch); the linear schedule's last step is still the run's last (its final rate)."""
    spec, _, _ = _small()
    splits = make_splits("fashion-mnist", limit=600)
    cfg = TrainConfig(
        epochs=2,
        batch_size=256,
        drop_last=drop_last,
        optimizer={"name": "sgd", "lr": 0.1},
        schedule={"name": "linear", "warmup_fraction": 0.25, "final_factor": 0.07},
    )
    batches = _Batches()
    model = build_model(spec)
    result = fit(
        model, splits.train, splits.val, default_preprocess(spec.input_shape), cfg, callbacks=[batches]
    )
    assert len(splits.train) == 600
    assert batches.sizes == ([256, 256] if drop_last else [256, 256, 88]) * 2
    assert result.images == sum(batches.sizes)
    assert result.history[-1]["lr"] == pytest.approx(0.1 * 0.07)


def test_drop_last_with_fewer_images_than_a_batch_is_refused():
    spec, _, _ = _small()
    splits = make_splits("fashion-mnist", limit=100)
    cfg = TrainConfig(epochs=1, batch_size=128, drop_last=True)
    with pytest.raises(
        CapasError, match=r"holds 100 images, less than one batch of 128: .*turn drop_last off"
    ):
        fit(build_model(spec), splits.train, splits.val, default_preprocess(spec.input_shape), cfg)


def test_epoch_images_per_second_is_training_throughput():
    """metrics.jsonl's images_per_s counts the training steps' time, as test.json's does; the epoch's
    seconds include its validation (here on 20× as many images as it trains on)."""
    spec, _, _ = _small()
    splits = make_splits("fashion-mnist", limit=100, test_limit=2000)
    cfg = TrainConfig(epochs=1, batch_size=50)
    result = fit(build_model(spec), splits.train, splits.test, default_preprocess(spec.input_shape), cfg)
    (epoch,) = result.history
    assert epoch["images_per_s"] == pytest.approx(result.images / result.train_seconds)
    assert epoch["seconds"] > result.train_seconds


def test_label_smoothing_is_in_the_training_loss_only():
    """As the README says: the smoothed loss trains; val_loss is plain cross-entropy."""
    spec, _, _ = _small()
    splits = make_splits("fashion-mnist", limit=100)
    preprocess = default_preprocess(spec.input_shape)
    model = build_model(spec)
    cfg = TrainConfig(epochs=1, batch_size=50, label_smoothing=0.5)
    result = fit(model, splits.train, splits.val, preprocess, cfg)
    assert result.history[0]["val_loss"] == pytest.approx(evaluate(model, splits.val, preprocess).loss)


class _Starts(Callback):
    """The epoch each fit started from."""

    def __init__(self):
        self.epochs = []

    def on_fit_start(self, epochs, steps_per_epoch, start_epoch):
        self.epochs.append(start_epoch)


@pytest.mark.parametrize(
    ("train", "stopped"),
    [
        ({"early_stopping": {"monitor": "val_accuracy", "patience": 1, "min_delta": 0.5}}, "early stopping"),
        ({"max_samples": 300}, "sample budget"),
    ],
)
def test_a_run_that_stopped_resumes_stopped(tmp_path, train, stopped):
    """Killed after the checkpoint of the epoch that stopped it (while testing or writing the run), a
    rerun trains no further: the same epochs, images and weights as the run that was not killed."""
    spec, _, _ = _small()
    splits = make_splits("fashion-mnist", limit=300)
    preprocess = default_preprocess(spec.input_shape)
    cfg = TrainConfig(epochs=5, batch_size=50, optimizer={"lr": 0.05}, **train)
    ck = tmp_path / "ck.safetensors"
    first = build_model(spec, seed=0)
    result = fit(first, splits.train, splits.val, preprocess, cfg, checkpoint=ck)
    assert result.stopped == stopped and len(result.history) < cfg.epochs
    again, starts = build_model(spec, seed=0), _Starts()
    resumed = fit(again, splits.train, splits.val, preprocess, cfg, checkpoint=ck, callbacks=[starts])
    assert starts.epochs == [len(result.history)]  # "resuming from the checkpoint of epoch 2"
    assert resumed.stopped == stopped and resumed.history == result.history
    assert (resumed.images, resumed.best_epoch) == (result.images, result.best_epoch)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_time_budget_stops_within_the_epoch():
    """max_seconds counts the training steps and stops at the step that reaches it, not after the epoch."""
    spec, _, _ = _small()
    splits = make_splits("fashion-mnist", limit=600)
    cfg = TrainConfig(epochs=5, batch_size=50, max_seconds=1e-9)
    result = fit(build_model(spec), splits.train, splits.val, default_preprocess(spec.input_shape), cfg)
    assert result.stopped == "time budget"
    assert result.images == 50 and len(result.history) == 1


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "rmsprop", "adadelta"])
@pytest.mark.parametrize("schedule", ["constant", "step", "cosine", "onecycle", "plateau"])
def test_every_optimizer_and_schedule_trains(optimizer, schedule):
    spec, _, _ = _small()
    splits = make_splits("fashion-mnist", limit=200)
    lr = 1.0 if optimizer == "adadelta" else None  # Keras 2's Adadelta rate, as the seed's model used
    cfg = TrainConfig(
        epochs=2,
        batch_size=50,
        optimizer={"name": optimizer, "lr": lr, "momentum": 0.0},
        schedule={"name": schedule, **({"step_epochs": 1} if schedule == "step" else {})},
        label_smoothing=0.1,
    )
    model, preprocess = build_model(spec, seed=0), default_preprocess(spec.input_shape)
    before = evaluate(model, splits.train, preprocess).loss
    result = fit(model, splits.train, splits.val, preprocess, cfg)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in result.history)
    # 8 steps lower the training loss (a fixed threshold near ln(10) held on a CPU and not on a GPU)
    assert evaluate(model, splits.train, preprocess).loss < before


def test_a_model_whose_output_does_not_fit_the_classes_is_refused(tmp_path):
    spec = ModelSpec.from_dict(
        {"name": "five", "input_shape": [28, 28, 1], "layers": ["Flatten", {"Dense": {"units": 5}}]}
    )
    with pytest.raises(CapasError, match="outputs \\(5,\\) but fashion-mnist has 10 classes"):
        train(spec, DataConfig(limit=100), TrainConfig(epochs=1), tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "tail",
    [
        [{"Dense": {"units": 10, "activation": "sigmoid"}}],
        [{"Dense": {"units": 10}}, {"Activation": {"activation": "hard_sigmoid"}}],
        [{"Dense": {"units": 10, "activation": "sigmoid"}}, {"Dropout": {"rate": 0.1}}],
        # a linear Activation computes nothing either: it hid the sigmoid
        [{"Dense": {"units": 10, "activation": "sigmoid"}}, {"Activation": {"activation": "linear"}}],
    ],
)
def test_a_model_that_ends_in_a_sigmoid_is_refused(tmp_path, tail):
    """Dense(10, sigmoid) trained with its sigmoids taken as logits (1 epoch on digits: 15% test
    accuracy, 88% with softmax) and predicted softmax(sigmoid) probabilities, at most 0.23; the Keras
    import refuses such models for the same reason. A Dropout after it (an identity when predicting)
    hid it: 7% on digits."""
    spec = ModelSpec.from_dict({"name": "sig", "input_shape": [28, 28, 1], "layers": ["Flatten", *tail]})
    with pytest.raises(
        CapasError, match=r"sig: the last layer \((Dense|Activation)\) ends in a (hard_)?sigmoid"
    ):
        train(spec, DataConfig(limit=100), TrainConfig(epochs=1), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_a_model_with_nothing_to_train_is_refused(tmp_path):
    """Every layer with weights `trainable: false`: PyTorch's 'optimizer got an empty parameter list'
    traceback once the data had loaded."""
    dense = {"Dense": {"units": 10, "activation": "softmax", "trainable": False}}
    spec = ModelSpec.from_dict({"name": "still", "input_shape": [28, 28, 1], "layers": ["Flatten", dense]})
    with pytest.raises(CapasError, match=r"^still: nothing to train: no layer has trainable weights"):
        train(spec, DataConfig(limit=100), TrainConfig(epochs=1), tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "augment, message",
    [
        ({"crop_padding": 10**30}, r"crop_padding \(10{30}\) is not below the images' side"),
        ({"cutout": 10**30}, r"cutout \(10{30}\) is more than the images' side"),
        ({"cutout": 29}, r"cutout \(29\) is more than the images' side \(28 pixels"),
        # the whole side: zeros left about 7% of the images all blank with their labels, and reflect,
        # which needs a narrower border, was padded with zeros silently
        ({"crop_padding": 28}, r"crop_padding \(28\) is not below the images' side \(28 pixels.*at most 27"),
        ({"crop_padding": 28, "crop_fill": "reflect"}, r"crop_padding \(28\) is not below the images' side"),
    ],
)
def test_an_augmentation_larger_than_the_images_is_refused(tmp_path, augment, message):
    """`crop_padding: 1e30` (or `cutout`) was PyTorch's overflow traceback in the first step; a cutout
    of twice the side blanks every image whole, and trained on nothing but zeros."""
    spec = ModelSpec.from_dict(
        {"name": "aug", "input_shape": [28, 28, 1], "layers": ["Flatten", {"Dense": {"units": 10}}]}
    )
    with pytest.raises(CapasError, match=rf"^train.augment.{message}"):
        train(spec, DataConfig(limit=100), TrainConfig(epochs=1, augment=augment), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_tampered_run_directories_are_named(tiny_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    spec = json.loads((broken / "model.json").read_text())
    spec["layers"][0]["Conv2D"]["filters"] = 9
    (broken / "model.json").write_text(json.dumps(spec))
    with pytest.raises(CapasError, match=r"do not fit the architecture.*wrong shapes"):
        load_run(broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(CapasError, match=r"model\.safetensors"):
        load_run(broken)
    (broken / "preprocess.json").unlink()
    with pytest.raises(CapasError, match=r"missing preprocess\.json"):
        load_run(broken)


def _tampered(tiny_run, tmp_path, name, change):
    """A copy of the tiny run whose JSON file `name` went through `change` (a function of its data)."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    data = json.loads((broken / name).read_text())
    change(data)
    (broken / name).write_text(json.dumps(data))
    return broken


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda d: d.update(classes=["a", "b", "c"]), ["3 class names", "10 outputs"]),
        (lambda d: d.update(classes=[str(i) for i in range(12)]), ["12 class names", "10 outputs"]),
        (
            lambda d: d.update(classes="0123456789"),
            ["'classes' must be a list of class names", "'0123456789'"],
        ),
        (lambda d: d.update(classes=list(range(10))), ["'classes' must be a list of class names"]),
        (lambda d: d["preprocess"].update(channels=3), ["channels 3", "input_shape [28, 28, 1]"]),
        (lambda d: d["preprocess"].update(size=[16, 16]), ["size [16, 16]", "input_shape [28, 28, 1]"]),
    ],
    ids=["too-few", "too-many", "a-string", "numbers", "channels", "size"],
)
def test_preprocess_json_that_does_not_fit_model_json_is_named(tiny_run, tmp_path, change, words):
    """Class names that were not one per output made predict fail with an IndexError (or split a
    string into characters); a size or channel count other than the model's, a RuntimeError in it."""
    broken = _tampered(tiny_run, tmp_path, "preprocess.json", change)
    with pytest.raises(CapasError, match=f"^{re.escape(str(broken))}/preprocess\\.json: ") as error:
        load_run(broken)
    for word in words:
        assert word in str(error.value)


def _conv_filters(data, filters):
    data["layers"][0]["Conv2D"]["filters"] = filters


def test_a_checkpoint_of_another_model_is_named_in_one_line(tmp_path):
    """A checkpoint without recorded settings (an older capas, fit called directly) that holds another
    architecture is a CapasError naming the file and the mismatch, not load_state_dict's traceback."""
    spec, _, cfg = _small()
    splits = make_splits("fashion-mnist", limit=100)
    preprocess = default_preprocess(spec.input_shape)
    ck = tmp_path / "ck.safetensors"
    fit(
        build_model(spec),
        splits.train,
        splits.val,
        preprocess,
        cfg.model_copy(update={"epochs": 1}),
        checkpoint=ck,
    )
    wider = spec.to_dict()
    _conv_filters(wider, 8)
    other = build_model(ModelSpec.from_dict(wider))
    with pytest.raises(
        CapasError, match=r"ck.safetensors: the checkpoint holds another model .*wrong shapes"
    ):
        fit(other, splits.train, splits.val, preprocess, cfg, checkpoint=ck)


def test_out_may_be_a_link_to_the_run_directory(tmp_path):
    """A symbolic link as out trains into the folder it points to; finishing the run raised
    IsADirectoryError (the link renamed onto a folder) after the whole training, and lost it."""
    spec, data, cfg = _small()
    (tmp_path / "disk").mkdir()
    (tmp_path / "latest").symlink_to(tmp_path / "disk")
    train(spec, data, cfg.model_copy(update={"epochs": 1}), tmp_path / "latest")
    assert (tmp_path / "latest").is_symlink() and (tmp_path / "disk" / "model.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "latest"]  # nothing left beside


def test_a_folder_that_is_not_a_run_is_refused_as_out(tmp_path):
    """Training replaces its run directory whole: a folder of other files (a dataset, a home folder)
    given as out is refused before anything is deleted."""
    spec, data, cfg = _small()
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.txt").write_text("years of work")
    with pytest.raises(
        CapasError, match=r"mine: a folder that is not a run directory \(it holds sub, thesis.txt\)"
    ):
        train(spec, data, cfg, folder)
    assert (folder / "thesis.txt").read_text() == "years of work" and (folder / "sub").is_dir()


def test_a_run_is_trained_again_only_if_its_folder_holds_nothing_but_the_run(tmp_path):
    """A run's folder (model.json) was taken whole, whatever else it held: a user's notes, a run
    trained inside it (--out run/sub), a study; a folder holding only capas' lock counted as a run, and
    every study folder holds one: `--out STUDY` deleted the study. What only derives from the run (an
    export in its default place) goes with it."""
    spec, data, cfg = _small()
    run = tmp_path / "run"
    train(spec, data, cfg, run)
    (run / "model.onnx").write_bytes(b"an export of these weights")
    train(spec, data, cfg, run)  # a derived file: replaced with the run
    assert not (run / "model.onnx").exists()
    (run / "sub").mkdir()
    (run / "notes.txt").write_text("what I changed")
    with pytest.raises(
        CapasError, match=r"run: a run directory that also holds notes.txt, sub, which are not part of a run"
    ):
        train(spec, data, cfg, run)
    assert (run / "notes.txt").read_text() == "what I changed" and (run / "model.json").is_file()
    study = tmp_path / "study"
    study.mkdir()
    for name in (".capas.lock", "study.sqlite", "report.md"):
        (study / name).write_text("")
    with pytest.raises(CapasError, match=r"study: a folder that is not a run directory \(it holds report.md"):
        train(spec, data, cfg, study)
    assert (study / "study.sqlite").exists()


@pytest.mark.parametrize("inside", ["runs/r1", "c0/r1", "c0"])
def test_out_inside_the_image_folder_it_trains_on_is_refused(tmp_path, inside):
    """The run became a class folder (or a folder inside one) of its own dataset: training passed, and
    evaluate, a retraining and every later use of the folder were refused."""
    spec, _, cfg = _small()
    (tmp_path / "images" / "c0").mkdir(parents=True)
    with pytest.raises(CapasError, match=r"inside the image folder .*images of the run's data"):
        train(spec, DataConfig(name=f"folder:{tmp_path / 'images'}"), cfg, tmp_path / "images" / inside)
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["c0"] and not any(
        (tmp_path / "images" / "c0").iterdir()
    )


@pytest.mark.parametrize(
    ("name", "change", "words"),
    [
        ("config.json", "truncate", ["invalid JSON at line"]),
        ("model.json", "truncate", ["invalid JSON at line"]),
        ("preprocess.json", "truncate", ["invalid JSON at line"]),
        ("model.json", lambda d: _conv_filters(d, -8), ["layer 0 (Conv2D)", "'filters'"]),
        ("preprocess.json", lambda d: d["preprocess"].update(channels=5), ["'channels'", "1 or 3", "5"]),
        ("preprocess.json", lambda d: d.pop("classes"), ["'classes'"]),
        ("preprocess.json", lambda d: d.update(preprocess=[28, 28]), ["preprocess", "mapping"]),
        ("config.json", lambda d: d["train"].update(precision="float16"), ["train.precision", "'float16'"]),
        ("config.json", lambda d: d["train"].update(tta=["flip"]), ["train.tta", "['flip']"]),
        ("config.json", lambda d: d.update(train=5), ["'train'", "mapping"]),
    ],
    ids=[
        "config-truncated",
        "model-truncated",
        "preprocess-truncated",
        "model-negative-filters",
        "preprocess-channels-5",
        "preprocess-no-classes",
        "preprocess-not-a-mapping",
        "config-precision",
        "config-tta-list",
        "config-train-not-a-mapping",
    ],
)
def test_a_damaged_run_file_is_named_in_one_line(tiny_run, tmp_path, name, change, words):
    """The message said 'damaged model.json, preprocess.json or config.json', or pasted pydantic's
    multi-line text with its URL, or (model.json) named the layer but not the file."""
    if change == "truncate":
        broken = _tampered(tiny_run, tmp_path, name, lambda d: None)
        (broken / name).write_text((broken / name).read_text()[:50])
    else:
        broken = _tampered(tiny_run, tmp_path, name, change)
    with pytest.raises(CapasError, match=f"^{re.escape(str(broken / name))}: ") as error:
        load_run(broken)
    message = str(error.value)
    assert "\n" not in message and "pydantic" not in message, message
    for word in words:
        assert word in message, message


CONFIG_FLOATS = [
    (cls, keyword)
    for cls in _Config.__subclasses__()
    for keyword, field in cls.model_fields.items()
    if float in (field.annotation, *typing.get_args(field.annotation))
]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize(
    ("cls", "keyword"), CONFIG_FLOATS, ids=[f"{cls.__name__}.{keyword}" for cls, keyword in CONFIG_FLOATS]
)
def test_every_config_float_must_be_finite(cls, keyword, value):
    """`--lr inf` trained to a loss of NaN and wrote a run of NaN weights, with exit code 0."""
    required = {FinetuneConfig: {"after_epochs": 1}, MuonConfig: {"lr": 0.1}}.get(cls, {})
    with pytest.raises(CapasError, match=f"^train: keyword '{keyword}': Input should be a finite number"):
        parse_config(cls, {**required, keyword: value}, "train")


def test_nested_config_floats_and_threads_are_bounded():
    with pytest.raises(
        CapasError, match=r"keyword 'optimizer\.lr': Input should be a finite number \(given inf\)"
    ):
        parse_config(TrainConfig, {"optimizer": {"lr": float("inf")}}, "train")
    # 100,000 threads: PyTorch took them, then no thread could be started ("can't start new thread")
    with pytest.raises(CapasError, match=r"keyword 'threads': Input should be less than or equal to 1024"):
        parse_config(TrainConfig, {"threads": 100_000}, "train")
    assert parse_config(TrainConfig, {"threads": 1024}, "train").threads == 1024


def test_rates_are_bounded_so_the_optimizer_step_stays_a_float32(tmp_path):
    """`--lr 1e308` was PyTorch's "value cannot be converted to type float without overflow"
    traceback in Adam's first step; the ceiling's largest combination trains (to whatever loss)."""
    from capas.spec.train import MAX_FACTOR, MAX_LR

    with pytest.raises(
        CapasError,
        match=r"keyword 'optimizer\.lr': Input should be at most 1e\+30, where an optimizer step stays a float32",
    ):
        parse_config(TrainConfig, {"optimizer": {"lr": 1e308}}, "train")
    spec = ModelSpec.from_dict(
        {
            "input_shape": [8, 8, 1],
            "layers": [
                {"Conv2D": {"filters": 2, "kernel_size": 3}},
                "BatchNormalization",
                "Flatten",
                {"Dense": {"units": 10, "activation": "softmax"}},
            ],
        }
    )
    for name in ("adam", "adamw", "sgd", "rmsprop", "adadelta"):
        optimizer = {"name": name, "lr": MAX_LR, "weight_decay": MAX_FACTOR, "batchnorm_lr_scale": MAX_FACTOR}
        config = TrainConfig(epochs=1, batch_size=32, optimizer=optimizer, threads=1)
        train(spec, DataConfig(name="digits", limit=100, test_limit=50), config, tmp_path / name)


@pytest.mark.parametrize(
    ("optimizer", "words"),
    [
        ({"name": "sgd", "nesterov": True}, "nesterov needs name: sgd and a momentum above 0"),
        ({"name": "adam", "nesterov": True, "momentum": 0.9}, "adam has no momentum setting"),
        ({"name": "adadelta", "momentum": 0.5}, "momentum (0.5) is for sgd and rmsprop"),
        ({"name": "rmsprop", "rho": 0.5}, "rho (0.5) is Adadelta's decay; rmsprop keeps Keras' rho 0.9"),
        ({"name": "adam", "rho": 0.5}, "rho (0.5) is Adadelta's decay; adam does not take it"),
        ({"name": "sgd", "epsilon": 0.5}, "epsilon (0.5) is for adam, adamw, rmsprop and adadelta"),
    ],
)
def test_settings_an_optimizer_does_not_take_are_refused(optimizer, words):
    """Nesterov without momentum was torch.optim.SGD's ValueError from inside training (a traceback
    after the data had loaded); a momentum for Adam or Adadelta, a rho for RMSprop or Adam and an
    epsilon for SGD were silently ignored, and config.json recorded them as if they had trained."""
    with pytest.raises(CapasError, match=re.escape(words)):
        parse_config(TrainConfig, {"optimizer": optimizer}, "training config")


@pytest.mark.parametrize(
    ("cls", "keywords"),
    [
        (TrainConfig, {"epochs": True}),
        (TrainConfig, {"batch_size": True}),
        (TrainConfig, {"seed": False}),
        (TrainConfig, {"threads": True}),
        (TrainConfig, {"max_samples": True}),
        (TrainConfig, {"bn_recalibration": True}),
        (TrainConfig, {"schedule": {"step_epochs": True}}),
        (TrainConfig, {"early_stopping": {"patience": True}}),
        (TrainConfig, {"ema": {"every": True}}),
        (TrainConfig, {"augment": {"cutout": True}}),
        (TrainConfig, {"finetune": {"after_epochs": True}}),
        (TrainConfig, {"progressive_resizing": {"size_increment": True}}),
        (DataConfig, {"limit": True}),
        (DataConfig, {"split_seed": True}),
    ],
)
def test_a_boolean_is_not_a_count_in_configs(cls, keywords):
    """`epochs: true` trained one epoch: pydantic takes true for 1."""
    with pytest.raises(CapasError, match="Input should be a whole number, not true or false"):
        parse_config(cls, keywords, "config")


@pytest.mark.parametrize(
    ("cls", "keywords", "keyword"),
    [
        (TrainConfig, {"optimizer": {"lr": True}}, "optimizer.lr"),
        (TrainConfig, {"optimizer": {"weight_decay": True}}, "optimizer.weight_decay"),
        (TrainConfig, {"label_smoothing": False}, "label_smoothing"),
        (TrainConfig, {"max_seconds": True}, "max_seconds"),
        (TrainConfig, {"schedule": {"name": "step", "gamma": True}}, "schedule.gamma"),
        (TrainConfig, {"ema": {"decay": False}}, "ema.decay"),
        (TrainConfig, {"early_stopping": {"min_delta": True}}, "early_stopping.min_delta"),
        (
            TrainConfig,
            {"progressive_resizing": {"initial_scale": True}},
            "progressive_resizing.initial_scale",
        ),
        (DataConfig, {"val_fraction": True}, "val_fraction"),
    ],
)
def test_a_boolean_is_not_a_number_in_configs(cls, keywords, keyword):
    """YAML's yes/no/on/off are booleans, which pydantic took for 1.0 and 0.0: `lr: yes` trained at
    a learning rate of 1, `max_seconds: on` stopped after one second."""
    with pytest.raises(CapasError, match=f"keyword '{keyword}': Input should be a number, not true or false"):
        parse_config(cls, keywords, "config")


@pytest.mark.parametrize(
    ("keywords", "expected"),
    [
        (
            {"optimizer": {"nme": "sgd"}},
            "unknown keyword 'optimizer.nme' (did you mean 'name'?); allowed: name, lr, momentum,",
        ),
        (
            {"early_stopping": {"patiense": 2}},
            "unknown keyword 'early_stopping.patiense' (did you mean 'patience'?); allowed: monitor, patience, min_delta",
        ),
        (
            {"augment": {"flip": True}},
            "unknown keyword 'augment.flip' (did you mean 'hflip'?); allowed: crop_padding,",
        ),
    ],
)
def test_an_unknown_nested_keyword_gets_the_closest_and_the_allowed_names(keywords, expected):
    """A typo at the top of a config named the closest and allowed keys, one inside `optimizer:` or
    `early_stopping:` only itself."""
    with pytest.raises(CapasError) as error:
        parse_config(TrainConfig, keywords, "training config")
    assert expected in str(error.value)


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    from capas.atomic import write_with

    target = write_text(tmp_path / "x.json", "old")

    def failing(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_with(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_bfloat16_mixed_precision_trains_and_predicts_as_recorded(tmp_path):
    spec, data, cfg = _small(precision="bfloat16")
    result = train(spec, data, cfg, tmp_path / "bf16")
    assert result["test_accuracy"] > 0.5  # chance is 0.1
    run = load_run(tmp_path / "bf16", device=_trained_device(tmp_path / "bf16"))
    assert run.precision == "bfloat16"
    assert all(p.dtype == torch.float32 for p in run.model.parameters())  # mixed: weights stay float32
    _, evaluation = evaluate_run(run)  # prediction runs in the precision the run was trained and tested in
    assert evaluation.accuracy == result["test_accuracy"]
    assert evaluation.loss == pytest.approx(result["test_loss"], rel=1e-5)
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    (tmp_path / "bf16" / "config.json").write_text(json.dumps({**config, "train": {"precision": "half"}}))
    with pytest.raises(CapasError, match=r"config\.json.*'half' is not float32 or bfloat16"):
        load_run(tmp_path / "bf16")
    float32 = evaluate(
        run.model, make_splits("fashion-mnist", limit=600, test_limit=400).test, run.preprocess
    )
    assert float32.loss == pytest.approx(result["test_loss"], rel=0.05)  # bfloat16 rounds, it does not break


def test_evaluate_runs_where_the_model_is():
    # issue 13: after fit moved a model to its device, evaluate(model, ...) without a device follows it
    spec, _, _ = _small()
    splits = make_splits("fashion-mnist", limit=300)
    preprocess = default_preprocess(spec.input_shape)
    model = build_model(spec, seed=0)
    assert model_device(model) == torch.device("cpu")
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameters: the CPU
    explicit = evaluate(model, splits.test, preprocess, "cpu")
    assert evaluate(model, splits.test, preprocess).loss == explicit.loss
    assert model.training  # evaluate gives back the mode it found, also when it fails (it stayed in eval)
    eleven = ArrayDataset(
        splits.test.images, torch.full_like(splits.test.labels, 10), (*splits.test.classes, "x")
    )
    with pytest.raises(IndexError):
        evaluate(model, eleven, preprocess)
    assert model.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluate_after_fit_on_cuda():
    spec, _, _ = _small()
    splits = make_splits("fashion-mnist", limit=300)
    preprocess = default_preprocess(spec.input_shape)
    model = build_model(spec, seed=0)
    fit(model, splits.train, splits.val, preprocess, TrainConfig(epochs=1, device="cuda"))
    assert model_device(model).type == "cuda"
    assert 0.0 <= evaluate(model, splits.test, preprocess).accuracy <= 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_from_device_resident_data_is_the_same_training(monkeypatch):
    # issue 13: fit copies a dataset that fits to the GPU once; the batches, and so the weights, are
    # the ones host-side data gives (deterministic algorithms on, the default)
    from capas.train import loop

    spec, _, _ = _small()
    splits = make_splits("fashion-mnist", limit=600)
    preprocess = default_preprocess(spec.input_shape)
    cfg = TrainConfig(epochs=2, device="cuda", batch_size=64, augment={"hflip": True, "crop_padding": 2})
    gathered = []
    monkeypatch.setattr(
        loop,
        "iterate_batches",
        lambda data, *a, **k: gathered.append(data.images.device) or iterate_batches(data, *a, **k),
    )
    resident = build_model(spec, seed=0)
    fit(resident, splits.train, splits.val, preprocess, cfg)
    assert {d.type for d in gathered} == {"cuda"} and splits.train.images.device.type == "cpu"
    monkeypatch.setattr(loop, "_resident", lambda data, device: data)
    gathered.clear()
    host = build_model(spec, seed=0)
    fit(host, splits.train, splits.val, preprocess, cfg)
    assert {d.type for d in gathered} == {"cpu"}
    for (name, a), b in zip(resident.state_dict().items(), host.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_fused_optimizers_only_where_the_parameters_are_on_cuda():
    from capas.spec.train import OptimizerConfig
    from capas.train.optim import make_optimizer

    spec, _, _ = _small()
    model = build_model(spec, seed=0)
    for name in ("sgd", "adam", "adamw"):
        optimizer = make_optimizer(model, OptimizerConfig(name=name))
        assert not optimizer.defaults.get("fused"), name
        if torch.cuda.is_available():
            optimizer = make_optimizer(model.to("cuda"), OptimizerConfig(name=name))
            assert optimizer.defaults["fused"], name
            model.to("cpu")


def test_evaluate_gives_accuracy_as_the_exact_fraction_of_images_right():
    """19 of 20 right is 0.95, not float32's 0.94999998808: a recipe at exactly its 95% target (9,500 of
    10,000) must compare as reaching it, and test.json should record the fraction, not its rounding."""

    class FirstPixel(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 2, 2) -> (B, 2) logits
            return torch.stack([1 - x[:, 0, 0, 0], x[:, 0, 0, 0]], 1)

    labels = torch.tensor([1] * 10 + [0] * 10)
    images = (labels * 255).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    labels[0] = 0  # the one image the model gets wrong
    data = ArrayDataset(images, labels, ("0", "1"))
    evaluation = evaluate(FirstPixel(), data, default_preprocess((2, 2, 1)), "cpu")
    assert evaluation.accuracy == 19 / 20
    assert evaluation.test_results(["0", "1"])["per_class_accuracy"] == {"0": 10 / 11, "1": 1.0}


def test_predict_files_gives_the_probabilities_evaluation_gives_the_same_files(tmp_path):
    """An image folder of 40×40 photos for an 8×8 model: predict decoded each file shrunk (a box
    reduction, JPEG's DCT scaling) where training and evaluate resize the full-size image, so
    the same file got other probabilities ("preprocessed exactly as in training")."""
    from PIL import Image

    from capas.data.folder import load_folder
    from capas.inference import tta_logits
    from capas.predict import predict_files

    generator = torch.Generator().manual_seed(0)
    files = []
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(6):
            pixels = torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8, generator=generator).numpy()
            files.append(tmp_path / "data" / name / f"{i}.{'jpg' if i % 2 else 'png'}")
            Image.fromarray(pixels).save(files[-1])
    spec = ModelSpec.from_dict(
        {"name": "shrink", "input_shape": [8, 8, 3], "layers": ["Flatten", {"Dense": {"units": 2}}]}
    )
    data = DataConfig(name=f"folder:{tmp_path / 'data'}")
    train(spec, data, TrainConfig(epochs=1, threads=1), tmp_path / "run")
    run = load_run(tmp_path / "run")
    dataset = load_folder(tmp_path / "data")  # what training and evaluate read, in file-name order
    (x, _), *_ = iterate_batches(dataset, len(dataset), preprocess=run.preprocess)
    with torch.no_grad():
        expected = torch.softmax(tta_logits(run.model, x, run.tta), dim=1)
    got = torch.tensor([p.probabilities for p in predict_files(run, sorted(files))])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # one path, not a list of them: it was read as the files 'https://rp2.alfred511.top/huggingface/', 't', 'm', 'p'…
    with pytest.raises(CapasError, match=r"paths: a list of image files.*got one path"):
        predict_files(run, str(files[0]))


def test_a_run_trained_on_digits_refuses_a_dataset_of_other_classes(tmp_path):
    """Digits' (and MNIST's) class names are 0..9, which were taken for the placeholders of a Keras
    import without class names: a digit classifier was scored on Fashion-MNIST's clothes."""
    spec = ModelSpec.from_dict(
        {"name": "digits", "input_shape": [8, 8, 1], "layers": ["Flatten", {"Dense": {"units": 10}}]}
    )
    train(spec, DataConfig(name="digits"), TrainConfig(epochs=1, threads=1), tmp_path / "run")
    run = load_run(tmp_path / "run")
    with pytest.raises(CapasError, match=r"fashion-mnist has classes \['T-shirt/top'.* trained on \['0'"):
        evaluate_run(run, DataConfig(name="fashion-mnist"))


def test_a_class_without_test_images_has_no_per_class_accuracy():
    """A class absent from the test split (a rare class of a folder, a small --test-limit) was recorded
    in test.json with accuracy 0.0, as if every one of its images had been missed."""

    class FirstPixel(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 2, 2) -> (B, 3) logits
            return torch.stack([1 - x[:, 0, 0, 0], x[:, 0, 0, 0], torch.zeros(len(x))], 1)

    labels = torch.tensor([0, 0, 1, 1])
    images = (labels * 255).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    evaluation = evaluate(
        FirstPixel(), ArrayDataset(images, labels, ("a", "b", "c")), default_preprocess((2, 2, 1))
    )
    results = evaluation.test_results(["a", "b", "c"])
    assert results["per_class_accuracy"] == {"a": 1.0, "b": 1.0, "c": None}
    assert results["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 0]]


@pytest.mark.parametrize("spelling", ["", "/", "/../data", " copied"])
def test_evaluate_on_the_recorded_folder_named_again_holds_out_the_same_test_images(tmp_path, spelling):
    """A run trained with its own test_fraction and split_seed, evaluated with --data naming its folder,
    was scored on the default held-out split: images it had trained on, reported as test accuracy.
    Also when --data spells the folder's path otherwise (folder:data/, as shell completion leaves it),
    and for a copy of the folder (or a relative path named from another directory), which capas
    cannot tell from another folder."""
    from PIL import Image

    for label, name in enumerate("ab"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(torch.full((4, 4), 20 * i + label, dtype=torch.uint8).numpy()).save(
                tmp_path / "data" / name / f"{i}.png"
            )
    spec = ModelSpec.from_dict(
        {"name": "held", "input_shape": [4, 4, 1], "layers": ["Flatten", {"Dense": {"units": 2}}]}
    )
    folder = f"folder:{tmp_path / 'data'}"
    train(
        spec,
        DataConfig(name=folder, test_fraction=0.5, split_seed=3),
        TrainConfig(epochs=1),
        tmp_path / "run",
    )
    run = load_run(tmp_path / "run")
    tested = json.loads((tmp_path / "run" / "config.json").read_text())["splits"]["sha256"]["test"]
    if spelling == " copied":
        shutil.copytree(tmp_path / "data", tmp_path / "copy")
        folder, spelling = f"folder:{tmp_path / 'copy'}", ""
    assert run_splits(run, DataConfig(name=folder + spelling)).info["sha256"]["test"] == tested


@pytest.mark.parametrize(
    ("position", "wrong", "says"),
    [
        (0, "examples/keras-mnist.yaml", r"spec: expected a ModelSpec \(load_spec\(path\)\)"),
        (1, "digits", r"data: expected a DataConfig \(DataConfig\(name=\.\.\.\)\), got str 'digits'"),
        (2, {"epochs": 1}, r"cfg: expected a TrainConfig \(TrainConfig\(epochs=\.\.\.\)\)"),
    ],
    ids=["spec", "data", "cfg"],
)
def test_train_names_an_argument_of_the_wrong_type(tmp_path, position, wrong, says):
    """The library's train() given a path, a dataset name or a dict where its typed configs go failed
    deep inside with "'str' object has no attribute 'name'"."""
    spec = ModelSpec.from_dict(
        {"name": "t", "input_shape": [8, 8, 1], "layers": ["Flatten", {"Dense": {"units": 10}}]}
    )
    arguments = [spec, DataConfig(name="digits"), TrainConfig(epochs=1, threads=1)]
    arguments[position] = wrong
    with pytest.raises(CapasError, match=says):
        train(*arguments, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _epochs_assigned(cfg: TrainConfig) -> TrainConfig:
    cfg.epochs = -1
    return cfg


def _lr_assigned(cfg: TrainConfig) -> TrainConfig:
    cfg.optimizer.lr = -5.0
    return cfg


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (
            _epochs_assigned,
            r"^train\(\): cfg: keyword 'epochs': Input should be greater than or equal to 1 \(given -1\)$",
        ),
        (
            lambda cfg: cfg.model_copy(update={"batch_size": 0}),
            r"^train\(\): cfg: keyword 'batch_size': .* \(given 0\)$",
        ),
        (
            _lr_assigned,
            r"^train\(\): cfg: keyword 'optimizer.lr': Input should be greater than 0 \(given -5.0\)$",
        ),
    ],
    ids=["assigned", "model_copy", "nested"],
)
def test_train_validates_a_config_changed_after_it_was_made(tmp_path, change, says):
    """pydantic validates a config when it is made, not a later assignment or model_copy(update=...):
    epochs = -1 wrote a run of 0 epochs claiming 'max epochs', batch_size 0 was a ZeroDivisionError
    deep in the loop, a negative lr torch's traceback."""
    spec = ModelSpec.from_dict(
        {"name": "t", "input_shape": [8, 8, 1], "layers": ["Flatten", {"Dense": {"units": 10}}]}
    )
    cfg = change(TrainConfig(epochs=1, threads=1))
    with pytest.raises(CapasError, match=says):
        train(spec, DataConfig(name="digits"), cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_fit_validates_a_config_changed_after_it_was_made():
    """fit, public as train is, trained with `batch_size = 0` set after the config was made until
    Python's ZeroDivisionError in the loop."""
    spec, _, _ = _small()
    splits = make_splits("digits", limit=100)
    cfg = TrainConfig(epochs=1, threads=1)
    cfg.batch_size = 0
    with pytest.raises(CapasError, match=r"^fit\(\): cfg: keyword 'batch_size': .* \(given 0\)$"):
        fit(build_model(spec), splits.train, splits.val, default_preprocess(spec.input_shape), cfg)


def test_a_file_given_as_a_run_directory_is_named_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(CapasError, match=r"notes.txt: not a run directory \(a file\)$"):
        load_run(tmp_path / "notes.txt")
    with pytest.raises(CapasError, match=r"nowhere: not a run directory \(no such folder\)$"):
        load_run(tmp_path / "nowhere")
