"""train.cache_frozen: the frozen backbone rows' output computed once, the same training as without it."""

from __future__ import annotations

import json

import pytest
import torch

from capas.data import make_splits
from capas.errors import CapasError
from capas.models import build_model, preprocess_for
from capas.spec import DataConfig, ModelSpec, TrainConfig
from capas.train import fit, frozen_cache, train

TOP = ["GlobalAveragePooling2D", {"Dense": {"units": 10, "activation": "softmax"}}]
BACKBONE = {"name": "mobilenet_v3_small", "weights": "none", "frozen": "all"}


def spec_with(backbone: dict = BACKBONE) -> ModelSpec:
    return ModelSpec.from_dict({"name": "t", "input_shape": [32, 32, 3], "backbone": backbone, "layers": TOP})


@pytest.fixture(scope="module")
def splits():
    return make_splits("fashion-mnist", limit=60, test_limit=10)


class Inputs:
    """What the model's forward passes were given: (input shape, start_row)."""

    def __init__(self, model):
        self.shapes = []
        model.register_forward_pre_hook(lambda module, args, kwargs: self.shapes.append(
            (tuple(args[0].shape[1:]), kwargs.get("start_row", 0))), with_kwargs=True)  # fmt: skip


def _train(splits, cache: bool, hflip, compile=False, backbone=BACKBONE, drop_last=False):
    spec = spec_with(backbone)
    model = build_model(spec, seed=0)
    inputs = Inputs(model)
    cfg = TrainConfig(
        epochs=3,
        batch_size=16,
        optimizer={"name": "adam", "lr": 1e-3},
        augment={"hflip": hflip},
        finetune={"after_epochs": 1, "unfreeze": 3, "backbone_lr_scale": 0.5},
        cache_frozen=cache,
        compile=compile,
        drop_last=drop_last,
        device="cpu",
    )
    result = fit(model, splits.train, splits.val, preprocess_for(spec), cfg)
    return model, result, inputs.shapes


@pytest.mark.parametrize("hflip", [False, True, "alternate"])
def test_the_cached_training_is_the_training_without_the_cache(splits, hflip):
    plain, plain_result, plain_inputs = _train(splits, False, hflip)
    cached, cached_result, cached_inputs = _train(splits, True, hflip)
    rows = len(cached.backbone) - 3  # the rows fine-tuning leaves frozen
    # every step and every epoch's validation (one batch) ran from the first row not cached
    from_row = [shape for shape in cached_inputs if shape[1] == rows]
    assert len(from_row) == 3 * -(-len(splits.train) // 16) + 3
    assert all(shape[0] != (3, 32, 32) for shape in from_row)
    assert all(shape == ((3, 32, 32), 0) for shape in plain_inputs)
    record = cached_result.frozen_cache
    assert record["rows"] == rows and record["images"] == len(splits.train)
    assert record["views"] == (2 if hflip else 1) and record["seconds"] > 0
    assert plain_result.frozen_cache is None
    # the same batches, flips and losses: equal up to float rounding
    for a, b in zip(plain_result.history, cached_result.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a, b)
        # after an epoch's updates, which differ by rounding (below): 1.3e-4 apart with one thread
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3), (a, b)
        # the barely trained model's logits are near ties: such a difference can flip one image
        assert abs(a["val_accuracy"] - b["val_accuracy"]) <= 1 / len(splits.val) + 1e-6, (a, b)
    for (name, a), b in zip(plain.state_dict().items(), cached.state_dict().values(), strict=True):
        # the cache computed the rows' output in other batches than the training's. With one thread
        # that rounds differently, and Adam turns a rounding difference in a near-zero gradient into
        # a step of the full rate (5e-4 for the backbone): the unfrozen rows' BatchNormalization
        # biases, to which the loss above is nearly blind, moved ~4e-3 either way and differed by 6e-3
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-2, msg=name)


def test_the_cached_training_leaves_out_the_short_batch_as_the_training_without_the_cache(splits):
    _, plain_result, _ = _train(splits, False, "alternate", drop_last=True)
    cached, cached_result, cached_inputs = _train(splits, True, "alternate", drop_last=True)
    rows = len(cached.backbone) - 3
    steps = [shape for shape in cached_inputs if shape[1] == rows]
    assert len(splits.train) % 16 and len(steps) == 3 * (len(splits.train) // 16) + 3  # + validations
    assert cached_result.images == plain_result.images == 3 * 16 * (len(splits.train) // 16)
    for a, b in zip(plain_result.history, cached_result.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a, b)


def test_cached_rows_compile_with_the_frozen_rows(splits):
    # six frozen rows, three of them unfrozen after the first epoch: the cache holds rows 0-2, and
    # rows 3-5 run compiled while they stay frozen (short graphs: Inductor compiles each in seconds)
    backbone = {**BACKBONE, "frozen": 6}
    from torch._dynamo.utils import counters

    _, plain_result, _ = _train(splits, False, "alternate", backbone=backbone)
    graphs = counters["stats"]["unique_graphs"]
    cached, cached_result, _ = _train(splits, True, "alternate", compile="frozen", backbone=backbone)
    assert counters["stats"]["unique_graphs"] > graphs, "the cached training compiled nothing"
    assert cached_result.frozen_cache["rows"] == 3
    # the eager training without the cache: equal up to float rounding (the compiled rows fold their
    # BatchNorm into the convolutions)
    for a, b in zip(plain_result.history, cached_result.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3), (a, b)
    assert cached._compiled_frozen is None  # dropped when training ended, as without the cache


@pytest.mark.parametrize(
    ("backbone", "settings", "words"),
    [
        (BACKBONE, {"augment": {"crop_padding": 2}}, "augment.crop_padding"),
        (BACKBONE, {"augment": {"cutout": 4}}, "augment.cutout"),
        (BACKBONE, {"finetune": {"after_epochs": 1, "unfreeze": "all"}}, "no backbone row stays frozen"),
        ({**BACKBONE, "frozen": 0}, {}, "no backbone row stays frozen"),
        ({**BACKBONE, "bn_frozen": False}, {}, "backbone.bn_frozen"),
        (None, {}, "needs a model with a backbone"),
        (BACKBONE, {"progressive_resizing": {}}, "train.progressive_resizing"),
    ],
)
def test_what_the_cache_cannot_hold_is_refused_before_training(splits, backbone, settings, words):
    if backbone is None:
        spec = ModelSpec.from_dict(
            {
                "name": "t",
                "input_shape": [32, 32, 3],
                "layers": [{"Conv2D": {"filters": 4, "kernel_size": 3}}, *TOP],
            }
        )
    else:
        spec = spec_with(backbone)
    model = build_model(spec, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=2, batch_size=16, cache_frozen=True, device="cpu", **settings)
    with pytest.raises(CapasError, match=r"train\.cache_frozen") as error:
        fit(model, splits.train, splits.val, preprocess_for(spec), cfg)
    assert words in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_cache_larger_than_half_the_memory_is_refused(splits, monkeypatch):
    monkeypatch.setattr(frozen_cache, "_available_memory", lambda: 100_000)
    spec = spec_with()
    cfg = TrainConfig(epochs=1, batch_size=16, cache_frozen=True, augment={"hflip": True}, device="cpu")
    with pytest.raises(
        CapasError,
        match=r"takes [\d.]+ MB for 60 images × 2 views, more than half the memory available \(0\.1 MB\)",
    ):
        fit(build_model(spec, seed=0), splits.train, splits.val, preprocess_for(spec), cfg)


def test_runs_record_the_cache_and_leave_an_all_frozen_top_to_the_feature_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPAS_CACHE", str(tmp_path / "cache"))
    spec, data = spec_with(), DataConfig(name="fashion-mnist", limit=60, test_limit=12)
    # the whole backbone frozen, nothing augmented: the features on disk already hold what it would keep
    plain = train(spec, data, TrainConfig(epochs=1, batch_size=30, cache_frozen=True), tmp_path / "a")
    assert plain["feature_cache"]["cache"] == "written" and "frozen_cache" not in plain
    cfg = TrainConfig(epochs=1, batch_size=30, cache_frozen=True, augment={"hflip": "alternate"})
    flipped = train(spec, data, cfg, tmp_path / "b")
    assert "feature_cache" not in flipped
    assert flipped["frozen_cache"]["views"] == 2 and flipped["frozen_cache"]["rows"] == len(
        build_model(spec).backbone
    )
    assert json.loads((tmp_path / "b" / "test.json").read_text())["frozen_cache"] == flipped["frozen_cache"]
    assert json.loads((tmp_path / "b" / "config.json").read_text())["train"]["cache_frozen"] is True


def test_a_run_resumed_with_no_epoch_left_does_not_compute_the_cache_again(splits, tmp_path):
    """A run killed after its last epoch's checkpoint (while testing or writing its run directory)
    computed the frozen rows' output of every image again on resuming, to train no epoch on it, and
    added that time to train_seconds."""
    spec, checkpoint = spec_with(), tmp_path / "checkpoint.safetensors"
    cfg = TrainConfig(epochs=1, batch_size=30, cache_frozen=True, augment={"hflip": True}, device="cpu")
    first = fit(
        build_model(spec, seed=0), splits.train, splits.val, preprocess_for(spec), cfg, checkpoint=checkpoint
    )
    resumed = fit(
        build_model(spec, seed=0), splits.train, splits.val, preprocess_for(spec), cfg, checkpoint=checkpoint
    )
    assert resumed.frozen_cache == first.frozen_cache and resumed.train_seconds == first.train_seconds
