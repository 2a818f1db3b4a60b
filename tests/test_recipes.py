"""The fast recipes' building blocks (issue #16), each on tiny data: patch-whitening and Dirac
initialisation, frozen layers, BatchNorm without scale, the weight EMA, alternating flips,
reflected translation, test-time augmentation, the linear schedule and the CPU's bfloat16 check."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from capas.cpu import bfloat16_warning, cpu_features, cpu_flags, describe
from capas.data import ArrayDataset, iterate_batches, splits_for
from capas.data.batches import augment_batch, default_preprocess
from capas.errors import CapasError
from capas.inference import choose_precision, tta_logits
from capas.layers import LAYERS
from capas.models import build_model
from capas.models.init import fit_whitening, patch_whitening
from capas.models.modules import build_module
from capas.predict import evaluate_run, predict
from capas.runs import load_run
from capas.spec import (
    Augment,
    DataConfig,
    ModelSpec,
    OptimizerConfig,
    ProgressiveResizing,
    ScheduleConfig,
    TrainConfig,
)
from capas.spec.summary import summarize
from capas.train import depthwise, features, fit, resizing, train
from capas.train.ema import WeightAverage
from capas.train.optim import lr_factor, make_optimizer, orthogonalized

WHITENED = {
    "name": "whitened",
    "input_shape": [28, 28, 1],
    "layers": [
        {"Conv2D": {"filters": 18, "kernel_size": 3, "kernel_initializer": "whitening", "trainable": False}},
        {"Activation": {"activation": "gelu"}},
        {"Conv2D": {"filters": 24, "kernel_size": 3, "padding": "same", "kernel_initializer": "dirac"}},
        {"MaxPooling2D": {"pool_size": 2}},
        {"BatchNormalization": {"momentum": 0.6, "scale": False}},
        {"Activation": {"activation": "gelu"}},
        "GlobalMaxPooling2D",
        {"Dense": {"units": 10}},
    ],
}


def _correlated_images(n: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random images: neighbouring pixels strongly correlated, as in photographs."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, 3, 20, 20, generator=g)
    return torch.nn.functional.avg_pool2d(noise, 3, 1) * 2 + 0.1  # (n, 3, 18, 18)


def test_patch_whitening_gives_patches_unit_variance_and_no_correlation():
    images = _correlated_images()
    kernels, bias, eigenvalues, _, count = patch_whitening(images.split(16), (2, 2), 24)
    assert kernels.shape == (24, 3, 2, 2) and count == 64
    assert (eigenvalues[:-1] >= eigenvalues[1:]).all()  # decreasing
    out = torch.nn.functional.conv2d(images, kernels, bias)  # (n, 24, 17, 17)
    first = out[:, :12].permute(1, 0, 2, 3).reshape(12, -1).double()  # the 12 directions
    covariance = first @ first.T / first.shape[1]
    # eps (5e-4 of the mean eigenvalue) shrinks each direction's variance slightly below 1
    assert torch.allclose(covariance, torch.eye(12, dtype=torch.float64), atol=0.02)
    assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-3  # the bias centres the outputs
    assert torch.allclose(kernels[12:], -kernels[:12])  # the rest are the negatives
    # fewer filters than directions: the leading (largest-variance) ones
    fewer, *_ = patch_whitening([images], (2, 2), 5)
    assert torch.allclose(fewer, kernels[:5], atol=1e-6)


def test_the_recorded_whitening_is_numpys_and_reproduces_the_kernels():
    images = _correlated_images()  # (64, 3, 18, 18)
    spec = ModelSpec.from_dict(
        {
            "name": "w",
            "input_shape": [18, 18, 3],
            "layers": [
                {"Conv2D": {"filters": 12, "kernel_size": 2, "kernel_initializer": "whitening"}},
                "Flatten",
                {"Dense": {"units": 2}},
            ],
        }
    )
    model = build_model(spec, seed=0)
    record = fit_whitening(model, images.split(16))
    # numpy's reference: every 2×2 patch in the kernel's (C, kh, kw) order, its covariance, eigh
    windows = np.lib.stride_tricks.sliding_window_view(images.double().numpy(), (2, 2), axis=(2, 3))
    patches = windows.transpose(0, 2, 3, 1, 4, 5).reshape(-1, 12)  # (n·17·17, 12)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(patches, rowvar=False, bias=True))
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    assert np.allclose(record["eigenvalues"], eigenvalues, rtol=1e-4, atol=1e-8)
    # each kernel is ± its direction scaled by 1/sqrt(eigenvalue + the eps the run records)
    kernels = model.layers["conv2d"].conv.weight.detach().double().reshape(12, 12).numpy()
    gains = np.abs(np.sum(kernels * eigenvectors.T, axis=1))
    assert np.allclose(gains, 1 / np.sqrt(eigenvalues + record["eps"]), rtol=1e-3)


def test_whitening_is_for_the_first_layer_and_at_most_twice_the_patch():
    too_many = {**WHITENED, "layers": [{"Conv2D": {**WHITENED["layers"][0]["Conv2D"], "filters": 19}}]}
    with pytest.raises(CapasError, match="at most 2 × 3×3 × 1 channels = 18 filters"):
        ModelSpec.from_dict({**too_many, "layers": [*too_many["layers"], "Flatten"]})
    later = [{"Conv2D": {"filters": 4, "kernel_size": 3}}, WHITENED["layers"][0], "Flatten"]
    with pytest.raises(CapasError, match=r"layer 1 \(Conv2D\): kernel_initializer 'whitening'.*first layer"):
        ModelSpec.from_dict({**WHITENED, "layers": later})


@pytest.mark.parametrize("kernel", [3, 2, 4])
def test_dirac_convolution_passes_its_input_channels_through(kernel):
    # even kernels too: 'same' pads their odd pixel last (TensorFlow), so no shift by a pixel
    layer = LAYERS["Conv2D"](filters=6, kernel_size=kernel, padding="same", kernel_initializer="dirac")
    x = torch.randn(2, 4, 7, 7)
    y = build_module(layer, (7, 7, 4))(x)
    assert torch.allclose(y[:, :4], x, atol=1e-6)  # identity for the first 4 filters
    assert y[:, 4:].abs().sum() > 0  # the others keep glorot-uniform kernels


def test_summary_counts_frozen_layers_and_batchnorm_without_scale():
    spec = ModelSpec.from_dict(WHITENED)
    rows = {r.name: r for r in summarize(spec).rows}
    assert rows["conv2d"].frozen and not rows["conv2d_1"].frozen
    assert rows["batch_normalization"].trainable == 24  # beta only
    summary = summarize(spec)
    whitening = 3 * 3 * 1 * 18 + 18
    assert summary.non_trainable == whitening + 2 * 24  # the frozen conv + moving mean and variance
    model = build_model(spec)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == summary.trainable
    assert model.layers["batch_normalization"].weight is None


@pytest.fixture(scope="module")
def whitened_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "whitened"
    cfg = TrainConfig(
        epochs=2,
        batch_size=100,
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
        schedule={"name": "linear", "warmup_fraction": 0.2},
        augment={"hflip": "alternate", "crop_padding": 2, "crop_fill": "reflect"},
        ema={"decay": 0.9},
        tta="flip",
        label_smoothing=0.2,
    )
    results = train(ModelSpec.from_dict(WHITENED), DataConfig(name="fashion-mnist", limit=1000), cfg, out)
    return out, results


def test_a_run_with_every_trick_records_them_and_serves_with_nothing_else(whitened_run):
    out, results = whitened_run
    assert results["test_accuracy"] > 0.2  # 10 classes: chance is 0.1 (2 epochs of 900 images)
    config = json.loads((out / "config.json").read_text())
    record = config["whitening"]
    assert record["layer"] == "conv2d" and record["images"] == 1000 and len(record["eigenvalues"]) == 9
    assert config["train"]["tta"] == "flip" and config["train"]["ema"]["decay"] == 0.9
    run = load_run(out)
    assert run.tta == "flip"
    # the frozen whitening layer still holds the kernels computed from the training images
    conv = run.model.layers["conv2d"].conv
    spec = ModelSpec.from_dict(WHITENED)
    splits = splits_for(DataConfig(name="fashion-mnist", limit=1000))
    sample = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))
    images = default_preprocess(spec.input_shape)(splits.train.images[sample])
    kernels, bias, *_ = patch_whitening([images], (3, 3), 18)
    assert torch.allclose(conv.weight, kernels, atol=1e-5) and torch.allclose(conv.bias, bias, atol=1e-5)
    # evaluation and prediction from the run directory apply its test-time augmentation
    _, evaluation = evaluate_run(run)
    assert evaluation.accuracy == pytest.approx(results["test_accuracy"])
    raw = splits.test.images[:8]
    probabilities = torch.tensor([p.probabilities for p in predict(run, list(raw))])
    x = run.preprocess(raw)
    with torch.no_grad():
        flipped = 0.5 * run.model(x) + 0.5 * run.model(x.flip(3))
        plain = run.model(x)
    assert torch.allclose(probabilities, torch.softmax(flipped, 1), atol=1e-5)
    assert not torch.allclose(probabilities, torch.softmax(plain, 1), atol=1e-5)


def test_tta_averages_the_views_airbench_weighs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    x = torch.randn(2, 1, 6, 6)
    model(x)
    assert torch.equal(tta_logits(model, x, "none"), model(x))
    mirror = 0.5 * model(x) + 0.5 * model(x.flip(3))
    assert torch.allclose(tta_logits(model, x, "flip"), mirror)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [padded[..., :6, :6], padded[..., 2:, 2:]]
    shifted = sum(0.25 * model(v) + 0.25 * model(v.flip(3)) for v in views)
    assert torch.allclose(tta_logits(model, x, "flip_shift"), 0.5 * mirror + 0.5 * shifted, atol=1e-6)
    with pytest.raises(ValueError, match="allowed: none, flip, flip_shift"):
        tta_logits(model, x, "rotate")


def test_alternating_flips_mirror_each_image_on_every_other_epoch():
    cfg = Augment(hflip="alternate")
    index = torch.arange(1000)
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(1000, 1, 1, 4)
    g = torch.Generator()

    def augment(x, g, **kw):
        return augment_batch(x, cfg, g, **kw)

    flipped = [(augment(x, g, index=index, epoch=e, seed=7)[:, 0, 0, 0] == 3).clone() for e in range(3)]
    assert 400 < int(flipped[0].sum()) < 600  # a random half first
    assert torch.equal(flipped[1], ~flipped[0])  # the other half next epoch: every image both ways
    assert torch.equal(flipped[2], flipped[0])
    # the first choice belongs to the image, not to its place in the batch
    shuffled = torch.randperm(1000, generator=torch.Generator().manual_seed(1))
    again = augment(x, g, index=shuffled, epoch=0, seed=7)[:, 0, 0, 0] == 3
    assert torch.equal(again, flipped[0][shuffled])
    other_seed = augment(x, g, index=index, epoch=0, seed=8)[:, 0, 0, 0] == 3
    assert not torch.equal(other_seed, flipped[0])
    with pytest.raises(CapasError, match="dataset indices"):
        augment(x, g)


def test_reflected_translation_fills_borders_with_the_image():
    x = torch.arange(1.0, 26.0).view(1, 1, 5, 5).repeat(200, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    zeros = augment_batch(x, Augment(crop_padding=2), g)
    reflect = augment_batch(x, Augment(crop_padding=2, crop_fill="reflect"), g)
    assert (zeros == 0).any() and not (reflect == 0).any()
    moved = (reflect != x).flatten(1).any(1)
    assert 0.7 < moved.float().mean() < 1.0  # 24 of the 25 offsets move the image
    # every row of a translated image is a row of the reflected original
    padded = torch.nn.functional.pad(x[:1], (2, 2, 2, 2), mode="reflect")[0, 0]
    rows = {tuple(padded[r, c : c + 5].tolist()) for r in range(9) for c in range(5)}
    assert all(tuple(row.tolist()) in rows for row in reflect[:20, 0].reshape(-1, 5))


def test_cutout_blanks_one_square_per_image_clipped_at_the_borders():
    x = torch.ones(500, 3, 8, 8)
    out = augment_batch(x, Augment(cutout=4), torch.Generator().manual_seed(0))
    blank = out == 0
    assert torch.equal(blank[:, :1].expand_as(blank), blank)  # every channel alike
    counts = blank[:, 0].flatten(1).sum(1)
    assert counts.max() == 16 and counts.min() == 4  # a whole square inside, a quarter at a corner
    assert (counts < 16).any()  # centres near the borders are clipped
    for image in blank[:50, 0]:  # the blank pixels form one rectangle
        rows, cols = image.any(1).nonzero().flatten(), image.any(0).nonzero().flatten()
        assert image.sum() == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    assert torch.equal(out[~blank], x[~blank])
    assert not Augment(cutout=4).off and Augment().off


def test_iterate_batches_gives_alternating_flips_the_dataset_indices():
    images = torch.zeros(10, 1, 1, 2, dtype=torch.uint8)
    images[..., 1] = 255  # every image is [0, 255]
    data = ArrayDataset(images, torch.zeros(10, dtype=torch.int64), ("a",))
    pre = default_preprocess((1, 2, 1))

    def first_pixels(epoch):
        batches = iterate_batches(
            data, 3, preprocess=pre, augment=Augment(hflip="alternate"), shuffle=True, epoch=epoch, seed=3
        )
        return torch.cat([x[:, 0, 0, 0] for x, _ in batches])

    a, b = first_pixels(0), first_pixels(1)
    assert a.sum() + b.sum() == 10  # each image mirrored in exactly one of the two epochs


def _tiny_fit(cfg: TrainConfig, checkpoint=None):
    spec = ModelSpec.from_dict({**WHITENED, "layers": WHITENED["layers"][2:]})
    splits = splits_for(DataConfig(name="fashion-mnist", limit=300))
    model = build_model(spec, seed=0)
    fit(model, splits.train, splits.val, default_preprocess(spec.input_shape), cfg, checkpoint=checkpoint)
    return model


def test_weight_average_follows_the_keras_formula():
    model = torch.nn.Linear(2, 1)
    ema = WeightAverage(model, TrainConfig(ema={"decay": 0.9}).ema)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, 1, 10)
    assert torch.allclose(ema.state["weight"], 0.9 * start + 0.1 * (start + 1))
    with ema.applied(model):
        assert torch.allclose(model.weight, ema.state["weight"])
    assert torch.allclose(model.weight, start + 1)  # the live weights come back
    lookahead = WeightAverage(model, TrainConfig(ema={"decay": 0.5, "overwrite_every": 2}).ema)
    lookahead.update(model, 1, 10)
    assert torch.allclose(model.weight, start + 1)
    with torch.no_grad():
        model.weight.add_(2.0)
    lookahead.update(model, 2, 10)  # every 2nd step the average replaces the weights
    assert torch.allclose(model.weight, 0.5 * (start + 1) + 0.5 * (start + 3))


def test_airbench_lookahead_ramps_its_decay_and_updates_every_few_steps():
    model = torch.nn.Linear(2, 1)
    cfg = TrainConfig(ema={"decay": 0.8, "every": 5, "overwrite_every": 5, "ramp": 3}).ema
    lookahead = WeightAverage(model, cfg)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    for step in range(1, 5):  # between updates: nothing happens
        lookahead.update(model, step, 10)
    assert torch.allclose(lookahead.state["weight"], start)
    assert torch.allclose(model.weight, start + 1)
    lookahead.update(model, 5, 10)  # decay 0.8 · (5/10)^3 = 0.1
    assert torch.allclose(lookahead.state["weight"], 0.1 * start + 0.9 * (start + 1))
    assert torch.allclose(model.weight, lookahead.state["weight"])  # and put back
    with torch.no_grad():
        model.weight.add_(1.0)
    before = lookahead.state["weight"].clone()
    lookahead.update(model, 10, 10)  # the full decay at the end
    assert torch.allclose(lookahead.state["weight"], 0.8 * before + 0.2 * (before + 1))


def test_an_ema_that_would_never_be_taken_is_refused():
    """With fewer optimizer steps than ema.every, the run validated, tested and saved its starting weights."""
    steps = -(-300 // 64)  # --limit 300 trains on 300 images
    cfg = TrainConfig(epochs=1, batch_size=64, ema={"every": steps + 1}, device="cpu")
    with pytest.raises(
        CapasError, match=rf"^ema.every is {steps + 1} optimizer steps, and this training takes {steps} "
    ):
        _tiny_fit(cfg)
    _tiny_fit(
        TrainConfig(epochs=1, batch_size=64, ema={"every": steps}, device="cpu")
    )  # taken at the last step


def test_a_budget_that_stops_before_the_first_average_keeps_the_trained_weights():
    """max_samples (or max_seconds) stopping training within the first `every` steps left the average
    at the starting weights, which the run then validated, tested and saved, silently."""
    cfg = TrainConfig(epochs=2, batch_size=64, ema={"decay": 0.9, "every": 5}, max_samples=128, device="cpu")
    start = build_model(ModelSpec.from_dict({**WHITENED, "layers": WHITENED["layers"][2:]}), seed=0)
    with pytest.warns(
        UserWarning, match=r"before the weight average's first update \(ema.every 5 optimizer steps\)"
    ):
        trained = _tiny_fit(cfg)
    assert not torch.equal(trained.layers["dense"][0].weight, start.layers["dense"][0].weight)


def test_ema_overwrite_must_fall_on_an_update():
    with pytest.raises(ValidationError, match="overwrite_every"):
        TrainConfig(ema={"every": 5, "overwrite_every": 7})


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_batchnorm_rate_scale_leaves_its_decay_per_step_alone(name):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    cfg = OptimizerConfig(name=name, lr=0.1, weight_decay=0.5, batchnorm_lr_scale=64)
    optimizer = make_optimizer(model, cfg)
    (norm,) = [g for g in optimizer.param_groups if any(p is model[1].bias for p in g["params"])]
    assert norm["lr"] == pytest.approx(6.4) and len(norm["params"]) == 2  # BatchNorm's weight and bias
    linear_before = model[0].weight.detach().clone()
    bn_before = model[1].weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only the decay moves the weights
    optimizer.step()
    assert torch.allclose(model[0].weight, linear_before * (1 - 0.1 * 0.5))
    assert torch.allclose(model[1].weight, bn_before * (1 - 0.1 * 0.5))


@pytest.mark.parametrize("shape", [(16, 72), (72, 16), (24, 24)])
def test_newton_schulz_keeps_the_singular_vectors_and_brings_the_values_near_one(shape):
    g = torch.Generator().manual_seed(0)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=g))
    matrix = u @ torch.diag(torch.logspace(-1, 1, k)) @ v.T  # singular values over two decades
    result = orthogonalized(matrix, steps=5)
    values = torch.linalg.svdvals(result)
    assert values.max() < 1.25 and values.min() > 0.6  # Keller Jordan's iteration: about 0.7–1.2
    # the same singular vectors: result = U·S'·Vᵀ with S' diagonal and positive
    inner = u.T @ result @ v
    assert torch.allclose(inner, torch.diag(torch.diagonal(inner)), atol=1e-4)


def test_muon_moves_a_convolution_kernel_as_pytorchs_muon_moves_it_flattened():
    conv = torch.nn.Conv2d(4, 6, 3, bias=False)
    model = torch.nn.Sequential(conv, torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.randn(1, 4, 5, 5))
    muon = {"lr": 0.05, "momentum": 0.6, "ns_steps": 5, "normalize": False}
    optimizer = make_optimizer(model, OptimizerConfig(name="sgd", lr=0.1, weight_decay=0.5, muon=muon))
    flat = torch.nn.Parameter(conv.weight.detach().reshape(6, -1).clone())
    reference = torch.optim.Muon([flat], lr=0.05, momentum=0.6, nesterov=True, ns_steps=5, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # the momentum carries over from step to step
        grad = torch.randn(6, 4, 3, 3, generator=g)
        conv.weight.grad, flat.grad = grad.clone(), grad.reshape(6, -1).clone()
        for p in model[2].parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        reference.step()
        # PyTorch iterates in bfloat16, capas in float32
        assert torch.allclose(conv.weight.detach().reshape(6, -1), flat.detach(), atol=2e-3)
    assert not torch.allclose(conv.weight.detach().reshape(6, -1), flat.detach(), atol=1e-7)
    before = model[2].weight.detach().clone()
    conv.weight.grad = torch.zeros_like(conv.weight)
    model[2].weight.grad = torch.zeros_like(model[2].weight)
    kernel = conv.weight.detach().clone()
    optimizer.param_groups[1]["lr"] = 0.0  # the kernels' rate at 0: only decay could move them
    optimizer.step()
    assert torch.equal(conv.weight, kernel)  # no weight decay on the kernels Muon trains
    assert torch.allclose(model[2].weight, before * (1 - 0.1 * 0.5))  # the rest decays as sgd's


def test_muon_normalizes_its_kernels_and_leaves_depthwise_ones_to_sgd():
    conv = torch.nn.Conv2d(3, 8, 3, bias=False)
    depthwise = torch.nn.Conv2d(8, 8, 3, groups=8, bias=False)
    model = torch.nn.Sequential(conv, depthwise)
    optimizer = make_optimizer(model, OptimizerConfig(name="sgd", lr=0.1, muon={"lr": 1e-6}))
    (kernels,) = [g for g in optimizer.param_groups if g.get("orthogonalize")]
    assert kernels["params"] == [conv.weight]
    with torch.no_grad():
        conv.weight.mul_(5.0)
    model(torch.randn(2, 3, 7, 7)).square().sum().backward()
    optimizer.step()
    # rescaled to sqrt(filters), then a tiny step
    assert conv.weight.detach().norm().item() == pytest.approx(8**0.5, rel=1e-4)


def test_muon_needs_sgd_beside_it_and_kernels_to_train():
    with pytest.raises(ValidationError, match="muon trains beside sgd"):
        OptimizerConfig(name="adam", muon={"lr": 0.1})
    with pytest.raises(CapasError, match=r"optimizer\.muon: the model has no trainable Conv2D kernels"):
        make_optimizer(torch.nn.Linear(3, 2), OptimizerConfig(name="sgd", muon={"lr": 0.1}))


def test_muon_resumes_its_momentum_from_the_checkpoint(tmp_path):
    cfg = TrainConfig(
        epochs=2, batch_size=64, device="cpu", optimizer={"name": "sgd", "lr": 0.05, "muon": {"lr": 0.02}}
    )
    whole = _tiny_fit(cfg)
    checkpoint = tmp_path / "checkpoint.safetensors"
    _tiny_fit(cfg.model_copy(update={"epochs": 1}), checkpoint)
    resumed = _tiny_fit(cfg, checkpoint)
    for key, value in whole.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[key], atol=1e-6), key
    plain = _tiny_fit(cfg.model_copy(update={"optimizer": OptimizerConfig(name="sgd", lr=0.05)}))
    assert not torch.allclose(whole.layers["dense"][0].weight, plain.layers["dense"][0].weight)


def test_ema_is_the_final_model_and_resumes_from_its_checkpoint(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=64, ema={"decay": 0.95}, device="cpu")
    whole = _tiny_fit(cfg)
    plain = _tiny_fit(cfg.model_copy(update={"ema": None}))
    assert not torch.allclose(whole.layers["dense"][0].weight, plain.layers["dense"][0].weight)
    checkpoint = tmp_path / "checkpoint.safetensors"
    _tiny_fit(cfg.model_copy(update={"epochs": 1}), checkpoint)  # an interrupted run: 1 epoch saved
    resumed = _tiny_fit(cfg, checkpoint)
    for key, value in whole.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[key], atol=1e-6), key


@pytest.mark.parametrize(("precision", "atol"), [("float32", 1e-4), ("bfloat16", 0.05)])
def test_a_compiled_step_trains_as_the_eager_one_and_shares_its_checkpoints(tmp_path, precision, atol):
    # bfloat16: the spec ends GELU -> GlobalMaxPooling2D, whose compiled backward once gave NaN
    # compared by what the models compute with batch statistics: the convolution's bias before
    # BatchNorm has no effect there and a gradient of rounding noise alone, which Adam turns into steps
    # that differ between the two (and reach the running means that inference mode would use)
    images = torch.rand(32, 1, 28, 28)

    def outputs(model):
        with torch.no_grad():
            return model.train()(images)

    cfg = TrainConfig(epochs=2, batch_size=64, device="cpu", compile=True, precision=precision)
    eager = outputs(_tiny_fit(cfg.model_copy(update={"compile": False})))
    compiled = _tiny_fit(cfg)
    assert not any("_orig_mod" in key for key in compiled.state_dict())  # the model itself, not the wrapper
    assert torch.allclose(outputs(compiled), eager, atol=atol)
    checkpoint = tmp_path / "checkpoint.safetensors"
    _tiny_fit(cfg.model_copy(update={"epochs": 1}), checkpoint)  # compiled, interrupted after 1 epoch
    resumed = _tiny_fit(cfg.model_copy(update={"compile": False}), checkpoint)  # resumed eagerly
    assert torch.allclose(outputs(resumed), eager, atol=atol)


def test_compile_without_a_cpp_compiler_says_so_before_training():
    from torch._inductor import config

    # Inductor's own patch: pytest's monkeypatch deletes the setting when it undoes (a later compile
    # then fails on the missing key)
    cfg = TrainConfig(epochs=1, batch_size=64, device="cpu", compile=True)
    with (
        config.patch({"cpp.cxx": ("no-such-c++-compiler",)}),
        pytest.raises(CapasError, match=r"train\.compile.*C\+\+ compiler.*no-such-c\+\+-compiler"),
    ):
        _tiny_fit(cfg)
    assert config.cpp.cxx != ("no-such-c++-compiler",)


def test_progressive_resizing_follows_composers_schedule():
    cfg = ProgressiveResizing(initial_scale=0.5, delay_fraction=0.5, finetune_fraction=0.2, size_increment=4)
    sides = [resizing.size(cfg, step, 100, (32, 32))[0] for step in range(100)]
    assert set(sides[:50]) == {16}  # the first half at half the side
    assert set(sides[80:]) == {32}  # the last fifth at full size
    assert sides[50:80] == sorted(sides[50:80]) and len(set(sides[50:80])) == 4  # growing: 16, 20, 24, 28
    assert all(side % 4 == 0 for side in sides)
    # rounded down to whole increments, never below one increment nor above the input
    assert resizing.size(cfg, 0, 100, (28, 30)) == (12, 12)
    assert resizing.size(ProgressiveResizing(initial_scale=0.1), 0, 10, (28, 28)) == (4, 4)
    exact = ProgressiveResizing(initial_scale=0.58, size_increment=2)  # 0.58 × 100 = 57.999… in floats
    assert resizing.size(exact, 0, 10, (100, 100)) == (58, 58)
    # the full-size steps train at the size evaluation sees, a multiple of the increment or not (28
    # with increments of 8 trained its last fifth at 24×24, a 28×30 input at 28×28)
    coarse = ProgressiveResizing(size_increment=8)
    assert [resizing.size(coarse, step, 100, (28, 28))[0] for step in (60, 75, 99)] == [16, 24, 28]
    assert resizing.size(cfg, 99, 100, (28, 30)) == (28, 30)
    with pytest.raises(ValidationError, match="delay_fraction \\+ finetune_fraction must be at most 1"):
        TrainConfig(progressive_resizing={"delay_fraction": 0.6, "finetune_fraction": 0.5})


def test_progressive_resizing_trains_on_small_images_and_evaluates_full_size():
    seen = []
    spec = ModelSpec.from_dict({**WHITENED, "layers": WHITENED["layers"][2:]})
    model = build_model(spec, seed=0)
    model.register_forward_pre_hook(lambda module, args: seen.append((module.training, args[0].shape[-2:])))
    splits = splits_for(DataConfig(name="fashion-mnist", limit=300))
    schedule = {"initial_scale": 0.5, "delay_fraction": 0.5, "finetune_fraction": 0.25}
    cfg = TrainConfig(epochs=2, batch_size=64, device="cpu", progressive_resizing=schedule)
    fit(model, splits.train, splits.val, default_preprocess(spec.input_shape), cfg)
    training = [tuple(shape) for is_training, shape in seen if is_training]
    # 2 epochs of 5 batches (300 training images): half the steps at 12×12 (14 rounded down to 4s),
    # growing over the next quarter, the last quarter at 28×28
    assert training == [(12, 12)] * 6 + [(16, 16), (24, 24), (28, 28), (28, 28)]
    evaluated = [tuple(shape) for is_training, shape in seen if not is_training]
    # before training, one forward pass checks that the network takes the smallest size; evaluation
    # (validation each epoch, BatchNorm's mode gap) sees full-size images
    assert evaluated[0] == (12, 12) and set(evaluated[1:]) == {(28, 28)}
    assert not features.applies(model, cfg)


def test_progressive_resizing_needs_a_network_that_takes_any_size():
    flat = {**WHITENED, "layers": [*WHITENED["layers"][2:6], "Flatten", {"Dense": {"units": 10}}]}
    spec = ModelSpec.from_dict(flat)
    model = build_model(spec, seed=0)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    splits = splits_for(DataConfig(name="fashion-mnist", limit=300))
    cfg = TrainConfig(epochs=1, batch_size=64, device="cpu", progressive_resizing={"initial_scale": 0.5})
    with pytest.raises(
        CapasError, match=r"train\.progressive_resizing: the network cannot take 12×12.*Flatten"
    ):
        fit(model, splits.train, splits.val, default_preprocess(spec.input_shape), cfg)
    for key, value in model.state_dict().items():  # stopped before the first step
        assert torch.equal(value, before[key]), key


def test_bfloat16_depthwise_convolutions_get_float32_gradients():
    conv = torch.nn.Conv2d(6, 6, 5, stride=2, padding=2, groups=6)
    plain = torch.nn.Conv2d(6, 4, 3)
    x = torch.randn(4, 6, 9, 9).contiguous(memory_format=torch.channels_last).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), depthwise.backward():
        y = conv(x)
        other = plain(x)
    assert type(y.grad_fn).__name__ == "_Conv2dBackward" and y.dtype == torch.bfloat16
    assert type(other.grad_fn).__name__ == "ConvolutionBackward0"  # not depthwise: as it was
    grad = torch.randn_like(y)
    y.backward(grad)
    # what float32 computes from the same bfloat16 input, weights and output gradient
    w32 = conv.weight.detach().bfloat16().float().requires_grad_()
    b32 = conv.bias.detach().bfloat16().float().requires_grad_()
    x32 = x.detach().float().requires_grad_()
    torch.nn.functional.conv2d(x32, w32, b32, 2, 2, 1, 6).backward(grad.float())
    assert x.grad.dtype == torch.bfloat16 and conv.weight.grad.dtype == torch.float32
    assert torch.allclose(x.grad.float(), x32.grad, rtol=1e-2, atol=1e-2)
    assert torch.allclose(conv.weight.grad, w32.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(conv.bias.grad, b32.grad, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16), depthwise.backward(), torch.no_grad():
        assert conv(x).grad_fn is None  # nothing to differentiate: nothing changes


def test_depthwise_weight_gradients_on_maps_smaller_than_the_kernel_are_computed_on_grown_maps():
    conv = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6)  # a 3×3 kernel on 2×2 maps: grown on any x86 CPU
    x = torch.randn(4, 6, 2, 2).contiguous(memory_format=torch.channels_last).requires_grad_()
    with depthwise.backward():
        y = conv(x)
        same = conv(torch.randn(4, 6, 3, 3))  # maps of the kernel's size: oneDNN's fast path, as it was
        one = conv(torch.randn(4, 6, 1, 1))  # 1×1: growing would not pay
        strided = torch.nn.functional.conv2d(x, conv.weight, None, 2, 1, 1, 6)  # stride 2: as it was
    assert type(y.grad_fn).__name__ == "_Conv2dBackward"
    for other in (same, one, strided):
        assert type(other.grad_fn).__name__ == "ConvolutionBackward0"
    grad = torch.randn_like(y)
    y.backward(grad)
    w, b, x0 = (t.detach().clone().requires_grad_() for t in (conv.weight, conv.bias, x))
    torch.nn.functional.conv2d(x0, w, b, 1, 1, 1, 6).backward(grad)  # PyTorch's own backward
    assert torch.allclose(conv.weight.grad, w.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(conv.bias.grad, b.grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(x.grad, x0.grad)  # the input gradient is PyTorch's, unchanged


def test_grown_maps_give_pytorchs_weight_gradient():
    """Rows and columns grown unequally (a 5×5 kernel on 3×4 maps)."""
    x = torch.randn(4, 6, 3, 4).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 1, 5, 5)
    grad = torch.randn(4, 6, 3, 4).contiguous(memory_format=torch.channels_last)
    own = torch.ops.aten.convolution_backward(
        grad, x, w, None, [1, 1], [2, 2], [1, 1], False, [0, 0], 6, [False, True, False]
    )[1]
    grown = depthwise.grown_weight_grad(grad, x, w, [2, 2], 6, (2, 1), torch.channels_last)
    assert torch.allclose(grown, own, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kernel", "side", "flags", "expected"),
    [
        (5, 4, {"avx2"}, (1, 1)),  # AVX2 only: oneDNN's slow path for every kernel larger than its map
        (3, 2, {"avx2"}, (1, 1)),
        (5, 4, {"avx2", "avx512f"}, None),  # AVX-512: 5×5 and 7×7 kernels are faster on small maps
        (7, 2, {"avx2", "avx512f"}, None),
        (3, 2, {"avx2", "avx512f"}, (1, 1)),  # but 3×3 kernels on 2×2 maps are still slow
        (5, 1, {"avx2"}, None),  # a 1×1 map: growing would not pay
    ],
)
def test_maps_grow_where_measured_to_pay(kernel, side, flags, expected):
    x_shape, w_shape = torch.Size([8, 16, side, side]), torch.Size([16, 1, kernel, kernel])
    assert depthwise.growth(x_shape, w_shape, [1, 1], [1, 1], frozenset(flags)) == expected


@pytest.mark.parametrize(
    ("x_shape", "kernel", "stride", "padding", "flags", "expected"),
    [
        ((8, 16, 5, 5), 5, 1, 2, {"avx2", "avx512f"}, True),  # EfficientNet-Lite0's last stage at 160×160
        ((8, 16, 13, 13), 5, 2, 0, {"avx2", "avx512f"}, True),  # its stride-2 block6a, padded as TF pads
        ((8, 16, 10, 10), 5, 1, 2, {"avx2", "avx512f"}, True),  # outputs twice the kernel's side
        ((8, 16, 14, 14), 5, 1, 2, {"avx2", "avx512f"}, False),  # larger: oneDNN was faster (0.5-0.6×)
        ((8, 16, 5, 5), 3, 1, 1, {"avx2", "avx512f"}, False),  # 3×3: not measured to pay
        ((8, 16, 5, 5), 5, 1, 2, {"avx2"}, False),  # not measured without AVX-512
    ],
)
def test_the_weight_gradient_kernel_applies_where_measured_to_pay(
    x_shape, kernel, stride, padding, flags, expected
):
    w_shape = torch.Size([16, 1, kernel, kernel])
    pays = depthwise.shift_pays(
        torch.Size(x_shape), w_shape, [stride] * 2, [padding] * 2, [1, 1], frozenset(flags)
    )
    assert pays is expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_weight_gradient_kernel_gives_pytorchs_weight_gradient(dtype):
    kernel = depthwise.WeightGradKernel()
    for x_shape, k, stride, padding in (
        ((4, 6, 5, 5), (5, 5), [1, 1], [2, 2]),
        ((4, 6, 13, 12), (5, 3), [2, 2], [0, 1]),
    ):
        x = torch.randn(x_shape).contiguous(memory_format=torch.channels_last).to(dtype)
        w = torch.randn(6, 1, *k)
        grad = torch.randn_like(torch.nn.functional.conv2d(x.float(), w, None, stride, padding, 1, 6)).to(
            dtype
        )
        own = torch.ops.aten.convolution_backward(
            grad.float(), x.float(), w, None, stride, padding, [1, 1], False, [0, 0], 6, [False, True, False]
        )[1]
        assert torch.allclose(kernel(x, grad, k, stride, padding), own, rtol=1e-5, atol=1e-4)


def test_the_weight_gradient_kernel_compiles_a_bounded_number_of_shapes():
    kernel = depthwise.WeightGradKernel()
    w = torch.randn(2, 1, 3, 3)
    for side in range(2, 2 + depthwise.SHIFT_SHAPES + 1):
        x, grad = torch.randn(1, 2, side, side), torch.randn(1, 2, side, side)
        got = kernel(x, grad, (3, 3), [1, 1], [1, 1])
        if side < 2 + depthwise.SHIFT_SHAPES:
            own = torch.ops.aten.convolution_backward(
                grad, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 2, [False, True, False]
            )[1]
            assert torch.allclose(got, own, rtol=1e-5, atol=1e-5)
        else:  # past the limit: oneDNN computes it (Dynamo would run the function uncompiled)
            assert got is None


def test_compile_frozen_computes_small_map_depthwise_weight_gradients_by_the_kernel(monkeypatch):
    """As `fit` trains with compile: frozen on a CPU with AVX-512 (the flags stand in for one here)."""
    monkeypatch.setattr(depthwise, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    calls = []
    original = depthwise.WeightGradKernel.__call__

    def counted(self, x, grad, kernel, stride, padding):
        gw = original(self, x, grad, kernel, stride, padding)
        calls.append(gw is not None)
        return gw

    monkeypatch.setattr(depthwise.WeightGradKernel, "__call__", counted)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, stride=3),  # 28×28 -> 9×9
        torch.nn.Conv2d(8, 8, 5, padding=2, groups=8),  # 5×5 depthwise, output 9×9: the kernel's
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    )
    splits = splits_for(DataConfig(name="fashion-mnist", limit=200))
    cfg = TrainConfig(epochs=1, batch_size=64, device="cpu", compile="frozen", precision="bfloat16")
    fit(net, splits.train, splits.val, default_preprocess((28, 28, 1)), cfg)
    assert calls and all(calls)


def test_only_networks_with_depthwise_convolutions_get_the_mode():
    plain = build_model(ModelSpec.from_dict({**WHITENED, "layers": WHITENED["layers"][2:]}), seed=0)
    assert not depthwise.has_depthwise(plain)
    grouped = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, groups=2))  # grouped, not depthwise
    assert not depthwise.has_depthwise(grouped)
    assert depthwise.has_depthwise(torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, groups=8)))


@pytest.mark.parametrize(
    ("precision", "expected"), [("bfloat16", "_Conv2dBackward"), ("float32", "ConvolutionBackward0")]
)
def test_training_in_bfloat16_on_the_cpu_takes_depthwise_gradients_in_float32(precision, expected):
    seen = []
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3),
        torch.nn.Conv2d(8, 8, 3, groups=8),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    )
    net[1].register_forward_hook(lambda module, args, out: seen.append(type(out.grad_fn).__name__))
    splits = splits_for(DataConfig(name="fashion-mnist", limit=200))
    cfg = TrainConfig(epochs=1, batch_size=64, device="cpu", precision=precision)
    fit(net, splits.train, splits.val, default_preprocess((28, 28, 1)), cfg)
    assert expected in seen


def test_linear_schedule_is_airbenchs_triangle():
    cfg = ScheduleConfig(name="linear", warmup_fraction=0.25, initial_factor=0.2, final_factor=0.07)
    factors = [lr_factor(cfg, step, 10, 100) for step in range(100)]
    assert factors[0] == pytest.approx(0.2) and factors[25] == pytest.approx(1.0)
    assert factors[99] == pytest.approx(0.07)
    assert max(factors) == pytest.approx(1.0)
    assert all(a <= b for a, b in itertools.pairwise(factors[:26]))
    assert all(a >= b for a, b in itertools.pairwise(factors[25:]))
    short = [lr_factor(cfg, step, 2, 2) for step in range(2)]  # the rise takes the first step
    assert short == pytest.approx([0.2, 0.07])
    # airbench94_muon's: no warm-up, straight down from the full rate to 0
    falling = ScheduleConfig(name="linear", warmup_fraction=0, initial_factor=1.0, final_factor=0.0)
    factors = [lr_factor(falling, step, 10, 100) for step in range(100)]
    assert factors[0] == factors[1] == 1.0 and factors[99] == 0.0
    assert all(a > b for a, b in itertools.pairwise(factors[1:]))


@pytest.mark.parametrize(
    "schedule, message",
    [
        (
            {"name": "cosine", "warmup_fraction": 0.1},
            r"warmup_fraction \(0.1\) is read by the onecycle and linear",
        ),
        ({"name": "constant", "patience": 3}, r"patience \(3\) is read by the plateau schedule; constant"),
        ({"name": "step", "initial_factor": 0.5}, r"initial_factor \(0.5\) is read by the linear schedule"),
        ({"name": "plateau", "gamma": 0.5}, r"gamma \(0.5\) is read by the step schedule; plateau"),
    ],
)
def test_a_schedule_setting_the_schedule_does_not_read_is_refused(schedule, message):
    """`{name: cosine, warmup_fraction: 0.1}` trained without a warm-up, recorded as if it had one."""
    with pytest.raises(ValidationError, match=message):
        TrainConfig(schedule=schedule)


def test_cpu_features_say_when_bfloat16_is_native(tmp_path):
    sapphire = tmp_path / "cpuinfo"
    sapphire.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    haswell = tmp_path / "cpuinfo-avx2"
    haswell.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    fast = cpu_features(cpu_flags(sapphire))
    assert fast["avx512_bf16"] and fast["amx_bf16"] and fast["native_bfloat16"]
    slow = cpu_features(cpu_flags(haswell))
    assert not slow["native_bfloat16"] and not slow["avx512"]
    assert bfloat16_warning("cpu", "bfloat16", cpu_flags(haswell)) is not None
    assert "emulated" in bfloat16_warning("cpu", "bfloat16", cpu_flags(haswell))
    assert bfloat16_warning("cpu", "bfloat16", cpu_flags(sapphire)) is None
    assert bfloat16_warning("cpu", "float32", cpu_flags(haswell)) is None
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert choose_precision("auto", "cpu", cpu_flags(sapphire))[0] == "bfloat16"
    assert choose_precision("auto", "cpu", cpu_flags(haswell)) == ("float32", describe(slow))
    assert choose_precision("bfloat16", "cpu", cpu_flags(haswell)) == ("bfloat16", "as asked")
    assert choose_precision("float32", "cpu", cpu_flags(sapphire)) == ("float32", "as asked")
    with pytest.raises(CapasError, match="'float16' is not one of auto, float32, bfloat16"):
        choose_precision("float16", "cpu")


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_on_a_gpu_without_bfloat16_units_warns_as_on_such_a_cpu(monkeypatch, native):
    """`auto` chose float32 on a T4 or V100, but asking for bfloat16 there said nothing (the warning
    looked at CPUs only). PyTorch's answers for such a GPU stand in for one: this machine has none."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    warning = bfloat16_warning("cuda", "bfloat16")
    assert warning is None if native else "Tesla T4, which has no bfloat16 units" in warning
    assert bfloat16_warning("cuda", "float32") is None


def test_serve_applies_the_runs_test_time_augmentation(whitened_run, tmp_path):
    import httpx

    from serve_support import live_server, png

    out, _ = whitened_run
    run = load_run(out)
    images = splits_for(DataConfig(name="fashion-mnist", limit=1000)).test.images[:3]
    want = predict(run, list(images))  # with the run's flip TTA, checked above against the views
    with live_server(run_dir=out, threads=1) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        files = [("file", (f"{i}.png", png(image), "image/png")) for i, image in enumerate(images)]
        got = client.post("/predict", files=files).json()["predictions"]
    for prediction, served in zip(want, got, strict=True):
        torch.testing.assert_close(
            torch.tensor(served["probabilities"]), torch.tensor(prediction.probabilities), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize(
    ("spec", "config"),
    [
        ("recipes/fashion-mnist-fast.yaml", "recipes/fashion-mnist-fast.train.yaml"),
        ("recipes/fashion-mnist-lean.yaml", "recipes/fashion-mnist-lean.train.yaml"),
        ("recipes/fashion-mnist-wide.yaml", "recipes/fashion-mnist-wide.train.yaml"),
        ("recipes/cifar10-airbench.yaml", "recipes/cifar10-airbench.train.yaml"),
        ("recipes/cifar10-airbench.yaml", "recipes/cifar10-airbench-45min.train.yaml"),
        ("recipes/cifar10-airbench.yaml", "recipes/cifar10-airbench-muon.train.yaml"),
        ("recipes/cifar10-transfer.yaml", "recipes/cifar10-transfer.train.yaml"),
    ],
)
def test_the_presets_load(spec, config):
    from pathlib import Path

    from capas.spec import load_document, load_spec
    from capas.spec.io import parse_config

    examples = Path(__file__).parent.parent / "examples"
    loaded = load_spec(examples / spec)
    document = load_document(examples / config)
    train_cfg = parse_config(TrainConfig, document["train"], config)
    parse_config(DataConfig, document["data"], config)
    assert train_cfg.tta != "none" and train_cfg.precision == "auto"  # bfloat16 where native
    if spec.startswith("recipes/cifar10-transfer"):
        assert loaded.backbone is not None and train_cfg.finetune is not None
    elif train_cfg.optimizer.muon is not None:  # airbench94_muon: the six trained kernels, no lookahead
        optimizer = make_optimizer(build_model(loaded), train_cfg.optimizer)
        (kernels,) = [g for g in optimizer.param_groups if g.get("orthogonalize")]
        assert [tuple(p.shape[:2]) for p in kernels["params"]] == [
            (64, 24),
            (64, 64),
            (256, 64),
            (256, 256),
            (256, 256),
            (256, 256),
        ]
        assert train_cfg.ema is None
    else:  # airbench's training: its lookahead
        assert train_cfg.ema is not None
    if spec.startswith("recipes/cifar10-airbench"):
        assert 118e6 < summarize(loaded).macs < 118.5e6  # airbench94's 118 M multiply-adds per image


def test_the_lean_recipe_is_the_fast_one_narrower_without_translations():
    from pathlib import Path

    from capas.spec import load_document, load_spec

    recipes = Path(__file__).parent.parent / "examples" / "recipes"
    fast, lean = (
        load_spec(recipes / f"fashion-mnist-{n}.yaml").to_dict()["layers"] for n in ("fast", "lean")
    )
    widths = {32: 24, 64: 48, 128: 96}
    assert len(fast) == len(lean)
    for a, b in zip(fast, lean, strict=True):
        if isinstance(a, dict) and "Conv2D" in a and a["Conv2D"]["name"] != "whiten":
            a = {"Conv2D": {**a["Conv2D"], "filters": widths[a["Conv2D"]["filters"]]}}
        assert a == b
    fast_cfg, lean_cfg = (
        load_document(recipes / f"fashion-mnist-{n}.train.yaml")["train"] for n in ("fast", "lean")
    )
    assert lean_cfg["augment"] == {"hflip": "alternate"} and lean_cfg["batch_size"] == 256
    assert lean_cfg["optimizer"] == {**fast_cfg["optimizer"], "lr": fast_cfg["optimizer"]["lr"] / 2}
    same = ("schedule", "label_smoothing", "ema", "tta", "precision")
    assert {k: lean_cfg[k] for k in same} == {k: fast_cfg[k] for k in same}


def test_the_tricks_study_removes_one_trick_per_variant():
    from pathlib import Path

    from capas.study.spec import load_study

    study = load_study(Path(__file__).parent.parent / "examples" / "studies" / "tricks.yaml")
    names = [v.name for v in study.variants]
    assert names[0] == "fast-recipe"
    assert {"no-whitening", "no-lookahead", "no-bias-scaler", "no-tta", "random-flips"} <= set(names)
    by_name = {v.name: v.train for v in study.variants}
    assert (
        by_name["no-lookahead"]["ema"] is None
        and by_name["no-bias-scaler"]["optimizer"]["batchnorm_lr_scale"] == 1
    )
    base = study.base.model_spec.to_dict()["layers"][0]["Conv2D"]
    unwhitened = next(v for v in study.variants if v.name == "no-whitening").model_spec
    assert base["kernel_initializer"] == "whitening" and base["trainable"] is False
    assert "kernel_initializer" not in unwhitened.to_dict()["layers"][0]["Conv2D"]


def test_the_progressive_resizing_study_changes_only_the_resizing_and_epochs():
    from pathlib import Path

    from capas.study.spec import load_study

    study = load_study(Path(__file__).parent.parent / "examples" / "studies" / "progressive-resizing.yaml")
    base, *variants = study.variants
    assert base.train.get("progressive_resizing") is None
    for variant in variants:
        config = TrainConfig.model_validate(variant.train)
        assert config.progressive_resizing is not None
        changed = {k for k in variant.train if variant.train[k] != base.train.get(k)}
        assert changed <= {"progressive_resizing", "epochs"}


def test_recipe_layers_go_to_keras_and_back(whitened_run, tmp_path):
    from capas.interop.keras import import_keras, write_keras

    run = load_run(whitened_run[0])
    keras_file = write_keras(run.model, tmp_path / "whitened.keras")
    _, imported = import_keras(keras_file, tmp_path / "back", classes=None, data="fashion-mnist")
    layers = imported.spec.to_dict()["layers"]
    assert layers[0]["Conv2D"]["trainable"] is False  # the frozen whitening layer stays frozen
    assert layers[4]["BatchNormalization"]["scale"] is False
    x = run.preprocess(splits_for(DataConfig(name="fashion-mnist", limit=1000)).test.images[:16])
    with torch.no_grad():
        torch.testing.assert_close(imported.model.eval()(x), run.model(x), atol=1e-5, rtol=1e-5)
