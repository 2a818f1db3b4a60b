"""BatchNormalization's running statistics: recalibration before evaluation, and the flag on a run whose
evaluation-mode accuracy on training images falls far below its training-mode accuracy."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from capas.data import default_preprocess, make_splits
from capas.models import build_model
from capas.spec import ModelSpec, TrainConfig
from capas.train import evaluate, fit
from capas.train.batchnorm import GAP_FLAG_PP, mode_gap, recalibrate, warn_short_last_batch

# Keras momentum 0.999: the running statistics move 0.1% per batch, so after 38 batches they are
# still mostly their initial 0 and 1 while the convolution's outputs are on another scale.
LAGGING = {
    "name": "lagging-bn",
    "input_shape": [28, 28, 1],
    "layers": [
        {"Conv2D": {"filters": 8, "kernel_size": 3, "strides": 2}},
        {"BatchNormalization": {"momentum": 0.999}},
        {"Activation": {"activation": "relu"}},
        "Flatten",
        {"Dense": {"units": 10, "activation": "softmax"}},
    ],
}


@pytest.fixture(scope="module")
def splits():
    return make_splits("fashion-mnist", limit=600, test_limit=400)


def _fit(splits, batches: int, ema: dict | None = None):
    spec = ModelSpec.from_dict(LAGGING)
    preprocess = default_preprocess(spec.input_shape)
    model = build_model(spec, seed=0)
    cfg = TrainConfig(epochs=2, batch_size=32, optimizer={"lr": 0.003}, bn_recalibration=batches, ema=ema)
    result = fit(model, splits.train, splits.val, preprocess, cfg)
    return model, result, evaluate(model, splits.test, preprocess)


def test_recalibration_repairs_lagging_statistics_and_the_gap_flags_the_lag(splits):
    _, lagging, lagging_test = _fit(splits, 0)
    _, recalibrated, recalibrated_test = _fit(splits, 10)
    # training never reads the running statistics: both runs take the same steps
    assert [m["loss"] for m in lagging.history] == [m["loss"] for m in recalibrated.history]
    assert recalibrated_test.accuracy > lagging_test.accuracy + 0.10
    assert recalibrated.history[-1]["val_accuracy"] > lagging.history[-1]["val_accuracy"] + 0.10
    assert lagging.bn_gap["flagged"] and lagging.bn_gap["gap_pp"] > GAP_FLAG_PP
    assert not recalibrated.bn_gap["flagged"] and abs(recalibrated.bn_gap["gap_pp"]) < 2.0
    # same weights, same batches: training-mode accuracy does not depend on the running statistics
    assert lagging.bn_gap["train_mode_accuracy"] == recalibrated.bn_gap["train_mode_accuracy"]


def test_with_an_ema_the_averaged_model_is_the_one_recalibrated(splits):
    # the EMA's own running statistics are an average of lagging ones: recalibration must reach
    # the model that is validated and kept, not only the live weights that the average replaces
    model, lagging, lagging_test = _fit(splits, 0, ema={"decay": 0.9})
    model, recalibrated, recalibrated_test = _fit(splits, 10, ema={"decay": 0.9})
    assert recalibrated.history[-1]["val_accuracy"] > lagging.history[-1]["val_accuracy"] + 0.10
    assert recalibrated_test.accuracy > lagging_test.accuracy + 0.10
    # the kept model's statistics are those of its own weights
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    recalibrate(
        model, splits.train, default_preprocess((28, 28, 1)), TrainConfig(batch_size=32, bn_recalibration=10)
    )
    assert torch.allclose(bn.running_mean, before)


def test_recalibration_uses_the_given_batches_and_leaves_models_without_batchnorm_alone(splits):
    spec = ModelSpec.from_dict(LAGGING)
    preprocess = default_preprocess(spec.input_shape)
    model = build_model(spec, seed=0)
    cfg = TrainConfig(batch_size=32, bn_recalibration=3)
    assert recalibrate(model, splits.train, preprocess, cfg) == 3
    bn = model.layers["batch_normalization"]
    assert int(bn.num_batches_tracked) == 3 and bn.momentum == pytest.approx(0.001)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    model.eval()
    gap = mode_gap(model, splits.train, preprocess, cfg)
    assert gap["images"] == 600 and not model.training  # the model's mode is kept
    assert all((before[k] == v).all() for k, v in bn.state_dict().items())  # measuring changes nothing
    plain = ModelSpec.from_dict({**LAGGING, "layers": [LAGGING["layers"][0], *LAGGING["layers"][2:]]})
    model = build_model(plain)
    assert recalibrate(model, splits.train, preprocess, cfg) == 0
    assert mode_gap(model, splits.train, preprocess, cfg) is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])  # fmt: skip
def test_batchnorm_without_scale_trains_its_bias_on_every_device(device):
    # airbench's BatchNorm (scale: false): on CUDA, batch_norm's backward without a weight returned an
    # empty bias gradient and training stopped at its first step (found on an H200, PyTorch 2.11)
    def norm_net(scale: bool) -> torch.nn.Module:
        layers = [
            {"Conv2D": {"filters": 4, "kernel_size": 3, "use_bias": False}},
            {"BatchNormalization": {"scale": scale, "momentum": 0.6}},
            "GlobalAveragePooling2D",
            {"Dense": {"units": 2}},
        ]
        spec = ModelSpec.from_dict({"name": "norm", "input_shape": [8, 8, 3], "layers": layers})
        return build_model(spec, seed=0).to(device).train()

    x = torch.randn(6, 3, 8, 8, device=device)
    grads = []
    for scale in (False, True):  # a trainable gamma starts at 1: the same function, the same bias gradient
        model = norm_net(scale)
        norm = next(m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
        assert (norm.weight is None) == (not scale)
        model(x).square().sum().backward()
        assert norm.bias.grad is not None and norm.bias.grad.shape == (4,)
        grads.append(norm.bias.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("flatten", [True, False])
def test_one_value_per_channel_trains_as_in_keras(flatten):
    """A last training batch of one image after Dense or global pooling was PyTorch's "Expected more
    than 1 value per channel when training" traceback; Keras normalizes the value to 0 (biased variance
    0), gives beta, and moves its moving statistics toward (the value, 0)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    layers = [{"BatchNormalization": {"momentum": 0.9}}]  # after Flatten: BatchNorm1d, else BatchNorm2d
    spec = ModelSpec.from_dict(
        {"input_shape": [1, 1, 4], "layers": ["Flatten", *layers] if flatten else layers}
    )
    model = build_model(spec, seed=0).train()
    bn = list(model.layers.values())[-1]
    with torch.no_grad():
        bn.bias.fill_(0.5)
    x = torch.arange(1.0, 5.0).reshape(1, 4, 1, 1)
    out = model(x)
    out.sum().backward()
    layer = keras.layers.BatchNormalization(momentum=0.9, beta_initializer=keras.initializers.Constant(0.5))
    expected = layer(x.reshape(1, 1, 1, 4), training=True)  # torch tensors on Keras' torch backend

    def tensor(value) -> torch.Tensor:
        return torch.as_tensor(value).detach().cpu()

    assert torch.allclose(out.flatten(), tensor(expected).flatten())
    assert torch.allclose(bn.running_mean, tensor(layer.moving_mean.value))
    assert torch.allclose(bn.running_var, tensor(layer.moving_variance.value))
    assert torch.equal(bn.bias.grad, torch.ones(4)) and torch.equal(bn.weight.grad, torch.zeros(4))


@pytest.mark.parametrize("flatten", [True, False])
def test_an_empty_batch_trains_through_and_moves_no_statistic(flatten):
    """With --nproc 2, a last training batch of one image leaves rank 0 an empty share: that was a
    ZeroDivisionError in the moving variance's correction. Its BatchNorm still takes part in the
    graph (DDP waits for every parameter's gradient), with zero gradients."""
    layers = [{"BatchNormalization": {"momentum": 0.9}}]
    spec = ModelSpec.from_dict(
        {"input_shape": [2, 2, 4], "layers": ["Flatten", *layers] if flatten else layers}
    )
    model = build_model(spec, seed=0).train()
    bn = list(model.layers.values())[-1]
    out = model(torch.zeros(0, 4, 2, 2))
    assert out.shape[0] == 0
    out.sum().backward()
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    assert torch.equal(bn.bias.grad, torch.zeros_like(bn.bias)) and torch.equal(
        bn.weight.grad, torch.zeros_like(bn.weight)
    )


def _airbench_bn(momentum: float) -> ModelSpec:
    layers = list(LAGGING["layers"])
    layers[1] = {"BatchNormalization": {"momentum": momentum, "scale": False}}
    return ModelSpec.from_dict({**LAGGING, "layers": layers})


@pytest.mark.parametrize(
    ("images", "batch_size", "momentum", "setting", "variance"),
    [
        (59_400, 512, 0.6, {}, 41),  # the wide Fashion-MNIST preset with val_fraction 0.01: warned
        (57_600, 512, 0.6, {}, None),  # the preset: a last batch of 256, 1.6× the variance
        (59_400, 512, 0.6, {"drop_last": True}, None),  # every batch full
        (59_400, 512, 0.6, {"bn_recalibration": 20}, None),  # statistics recomputed before evaluation
        (1_025, 128, 0.99, {}, None),  # Keras' momentum: a last batch of 1 after 128, 3.5×
        (1_025, 256, 0.99, {}, 6),  # after 256, 6.1×
        (1_065, 152, 0.99, {}, 4),  # after 152, 4.005×: the least batch Keras' momentum is warned at
        (1_058, 151, 0.99, {}, None),  # after 151, 3.985×
        (100, 512, 0.6, {}, None),  # one batch, short or not: every step sees it alone
    ],
)
def test_a_short_last_batch_is_warned_of_where_it_makes_the_running_statistics_noisy(
    images, batch_size, momentum, setting, variance
):
    model = build_model(_airbench_bn(momentum), seed=0)
    cfg = TrainConfig(batch_size=batch_size, **setting)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_short_last_batch(model, images, cfg)
    messages = [str(w.message) for w in caught]
    if variance is None:
        assert messages == []
    else:
        (message,) = messages
        assert (
            f"a batch of {images % batch_size} of the {images:,} training images (batch_size {batch_size})"
            in message
        )
        assert f"momentum {momentum:g} weighs it {1 - momentum:.0%}" in message
        assert f": {variance}× the variance full batches leave; set train.drop_last: true" in message
    assert model.training  # left in the mode it was built in


def test_training_with_a_short_last_batch_warns_once_and_not_with_drop_last(splits):
    spec = _airbench_bn(0.6)
    preprocess = default_preprocess(spec.input_shape)
    assert len(splits.train) == 600  # in batches of 512: one full, one of 88 (4.1× the variance)
    for drop_last, expected in ((False, 1), (True, 0)):
        cfg = TrainConfig(epochs=2, batch_size=512, drop_last=drop_last, optimizer={"lr": 0.003})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(build_model(spec, seed=0), splits.train, splits.val, preprocess, cfg)
        assert sum("each epoch ends on a batch of" in str(w.message) for w in caught) == expected
