"""Keras 3's update rules, pinned against their formulas: decoupled weight decay in every optimizer,
AdamW's default decay, RMSprop's ε inside the square root, BatchNormalization's biased moving
variance, and ReduceLROnPlateau; and SGD's momentum under a changing rate, where capas is PyTorch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from capas.models import build_model
from capas.spec import ModelSpec, OptimizerConfig
from capas.spec.train import ScheduleConfig
from capas.train.optim import Plateau, make_optimizer

LR, WD = 0.1, 0.5


class _Weights(nn.Module):
    def __init__(self, values: list[float]):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(values, dtype=torch.float64))


def _steps(cfg: OptimizerConfig, w0: list[float], grads: list[list[float]]) -> torch.Tensor:
    """Weights after one optimizer step per gradient (the gradients are given, not computed)."""
    model = _Weights(w0)
    optimizer = make_optimizer(model, cfg)
    for g in grads:
        model.w.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
    return model.w.detach()


def test_sgd_with_momentum_decays_weights_apart_from_the_gradient():
    w0, g1, g2, mu = [1.0, -2.0], [0.3, 0.1], [-0.2, 0.4], 0.9
    cfg = OptimizerConfig(name="sgd", lr=LR, momentum=mu, weight_decay=WD)
    # Keras: w -= lr·wd·w, then m = μ·m − lr·g, w += m
    w, m = torch.tensor(w0, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for g in (g1, g2):
        w = w - LR * WD * w
        m = mu * m - LR * torch.tensor(g, dtype=torch.float64)
        w = w + m
    assert torch.allclose(_steps(cfg, w0, [g1, g2]), w, atol=1e-12)
    # PyTorch's coupled decay (wd·w added to the gradient, then into the momentum) ends elsewhere
    coupled = _Weights(w0)
    torch_sgd = torch.optim.SGD(coupled.parameters(), lr=LR, momentum=mu, weight_decay=WD)
    for g in (g1, g2):
        coupled.w.grad = torch.tensor(g, dtype=torch.float64)
        torch_sgd.step()
    assert not torch.allclose(coupled.w.detach(), w, atol=1e-3)


def test_sgd_momentum_scales_the_accumulated_gradients_by_the_current_rate():
    """The difference from Keras the README lists: at a constant rate SGD's momentum steps are
    Keras' (above); when the rate changes, the whole momentum moves at the new rate (PyTorch's
    buffer of gradients), where Keras' momentum of lr·g keeps the older rates."""
    w0, grads, mu, rates = [1.0], [[1.0], [1.0]], 0.9, [0.1, 0.01]
    model = _Weights(w0)
    optimizer = make_optimizer(model, OptimizerConfig(name="sgd", lr=rates[0], momentum=mu, weight_decay=0))
    for g, lr in zip(grads, rates, strict=True):
        optimizer.param_groups[0]["lr"] = lr  # as the schedules set it before every step
        model.w.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
    buffer = mu * 1.0 + 1.0  # PyTorch: b = μ·b + g, w -= lr·b
    assert model.w.item() == pytest.approx(1.0 - 0.1 * 1.0 - 0.01 * buffer, abs=1e-12)
    keras_m = mu * (-0.1 * 1.0) - 0.01 * 1.0  # Keras: m = μ·m − lr·g, w += m
    assert model.w.item() != pytest.approx(1.0 - 0.1 + keras_m, abs=1e-3)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_and_adamw_decay_as_keras_does(name):
    w0, g = [1.0, -2.0], [0.3, -0.1]
    cfg = OptimizerConfig(name=name, lr=LR, weight_decay=WD)
    # Keras, first step: w -= lr·wd·w; then the bias-corrected Adam step, lr·g/|g| up to ε
    w = torch.tensor(w0, dtype=torch.float64)
    expected = w * (1 - LR * WD) - LR * torch.sign(torch.tensor(g, dtype=torch.float64))
    assert torch.allclose(_steps(cfg, w0, [g]), expected, rtol=1e-5)


def test_adamw_defaults_to_keras_weight_decay():
    assert OptimizerConfig(name="adamw").decay == 0.004
    assert (
        OptimizerConfig(name="adam").decay == 0.0 and OptimizerConfig(name="adamw", weight_decay=0).decay == 0
    )
    optimizer = make_optimizer(_Weights([1.0]), OptimizerConfig(name="adamw"))
    assert optimizer.param_groups[0]["weight_decay"] == 0.004


def test_rmsprop_puts_epsilon_inside_the_square_root():
    w0, grads, mu, eps = [1.0, 1.0], [[1e-4, 1.0], [2e-4, -1.0]], 0.5, 1e-7
    cfg = OptimizerConfig(name="rmsprop", lr=LR, momentum=mu, epsilon=eps, weight_decay=0.0)
    w, v, m = (torch.tensor(x, dtype=torch.float64) for x in (w0, [0.0, 0.0], [0.0, 0.0]))
    for g in grads:
        g = torch.tensor(g, dtype=torch.float64)
        v = 0.9 * v + 0.1 * g**2
        m = mu * m + LR * g / torch.sqrt(v + eps)
        w = w - m
    assert torch.allclose(_steps(cfg, w0, grads), w, rtol=1e-12)
    # PyTorch's RMSprop (ε outside the root) moves the small-gradient weight several times further
    torch_like = _Weights(w0)
    torch_rmsprop = torch.optim.RMSprop(torch_like.parameters(), lr=LR, alpha=0.9, eps=eps, momentum=mu)
    for g in grads:
        torch_like.w.grad = torch.tensor(g, dtype=torch.float64)
        torch_rmsprop.step()
    moved_torch, moved_keras = 1.0 - torch_like.w[0].item(), 1.0 - w[0].item()
    assert moved_torch > 3 * moved_keras > 0


def test_batch_normalization_moving_variance_is_keras_biased_average():
    spec = ModelSpec.from_dict(
        {
            "name": "bn",
            "input_shape": [2, 2, 3],
            "layers": [{"BatchNormalization": {"momentum": 0.9}}, "Flatten", {"Dense": {"units": 2}}],
        }
    )
    bn = next(m for m in build_model(spec).modules() if isinstance(m, nn.BatchNorm2d))
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0)) * 3 + 1
    bn.train()
    bn(x)
    biased = x.var(dim=(0, 2, 3), unbiased=False)
    # Keras: moving = moving·0.9 + batch·0.1, the batch variance divided by n (16 values here)
    assert torch.allclose(bn.running_var, 0.9 * torch.ones(3) + 0.1 * biased, rtol=1e-5)
    assert torch.allclose(bn.running_mean, 0.1 * x.mean(dim=(0, 2, 3)), rtol=1e-5)
    bn.reset_running_stats()
    bn.momentum = None  # a plain average (recalibration): still of the biased variances
    bn(x)
    bn(x * 2)
    assert torch.allclose(bn.running_var, (biased + 4 * biased) / 2, rtol=1e-5)


def test_trainable_false_keeps_batch_normalization_in_inference_mode_and_dropout_dropping():
    """Keras: a frozen BatchNormalization normalises with its moving statistics in training; a frozen
    Dropout (no weights to freeze) still drops. capas turned the frozen Dropout off."""
    spec = ModelSpec.from_dict(
        {
            "name": "frozen",
            "input_shape": [2, 2, 3],
            "layers": [
                {"BatchNormalization": {"trainable": False}},
                "Flatten",
                {"Dropout": {"rate": 0.5, "trainable": False}},
            ],
        }
    )
    model = build_model(spec, seed=0).train()
    assert not model.layers["batch_normalization"].training and model.layers["dropout"].training
    y = model(torch.ones(1, 3, 2, 2))
    # moving mean 0, variance 1: x / sqrt(1 + 0.001), then each value dropped or scaled by 2
    kept = 2 / (1 + 1e-3) ** 0.5
    assert (y == 0).any() and torch.allclose(y[y != 0], torch.full_like(y[y != 0], kept))


def test_reduce_on_plateau_follows_keras():
    cfg = ScheduleConfig(name="plateau", factor=0.5, patience=2, min_lr=0.02, min_delta=0.01)
    plateau = Plateau(cfg, base_lr=0.1)
    scales = []
    # 0.995 is not below 1.0 − min_delta: no improvement
    for loss in [1.0, 0.995, 0.99, 0.9, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95]:
        plateau.update(loss)
        scales.append(round(plateau.scale, 6))
    # reduced after 2 epochs without improvement, the count restarts, floored at min_lr = 0.2·lr
    assert scales == [1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.2, 0.2, 0.2, 0.2]
    other = Plateau(ScheduleConfig(name="constant"), base_lr=0.1)
    for loss in [1.0, 1.0, 1.0, 1.0]:
        other.update(loss)
    assert other.scale == 1.0
