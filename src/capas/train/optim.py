"""Optimizers and learning-rate schedules from the typed config, with Keras 3's update rules.

Keras 3 applies weight decay the same decoupled way in every optimizer, `w -= lr·wd·w` before the
update (PyTorch's Adam, SGD and RMSprop add wd·w to the gradient instead), and its RMSprop divides
by sqrt(v + ε) (PyTorch: sqrt(v) + ε). Both are reproduced here; the README's Keras section lists
what still differs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from capas.errors import CapasError
from capas.spec.train import MuonConfig, OptimizerConfig, ScheduleConfig


def _own_modules(model: nn.Module, kind: type) -> list[nn.Module]:
    return [
        m for name, m in model.named_modules() if isinstance(m, kind) and not name.startswith("backbone.")
    ]


def param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """Trainable parameters only (frozen ones get no state and no decay); backbone layers at a scaled
    rate; the model's own BatchNorm parameters at `batchnorm_lr_scale`, their decay per step unscaled
    (`decay_scale`, read by the decay hook); with `muon`, the model's own Conv2D kernels (not
    depthwise) in a group of their own, `orthogonalize`d and not decayed."""
    lr = cfg.learning_rate
    norms = {
        id(p)
        for m in _own_modules(model, nn.modules.batchnorm._BatchNorm)
        for p in m.parameters(recurse=False)
    }
    kernels = (
        {id(m.weight) for m in _own_modules(model, nn.Conv2d) if m.groups == 1}
        if cfg.muon is not None
        else set()
    )
    backbone, norm, own, orthogonal = [], [], [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            if name.startswith("backbone."):
                backbone.append(param)
            elif id(param) in kernels:
                orthogonal.append(param)
            else:
                (norm if id(param) in norms and cfg.batchnorm_lr_scale != 1.0 else own).append(param)
    groups = [{"params": own, "lr": lr}]
    if cfg.muon is not None:
        if not orthogonal:
            raise CapasError(
                "optimizer.muon: the model has no trainable Conv2D kernels of its own (depthwise and "
                "backbone kernels excepted) for Muon to train"
            )
        # SGD's own step then moves each kernel by lr times what the hook left in its gradient
        groups.append(
            {"params": orthogonal, "lr": cfg.muon.lr, "momentum": 0.0, "nesterov": False,
             "orthogonalize": True, "decay_scale": 0.0}
        )  # fmt: skip
    if backbone:
        groups.append({"params": backbone, "lr": lr * cfg.backbone_lr_scale})
    if norm:
        groups.append(
            {"params": norm, "lr": lr * cfg.batchnorm_lr_scale, "decay_scale": 1.0 / cfg.batchnorm_lr_scale}
        )
    return [g for g in groups if g["params"]]


class KerasRMSprop(torch.optim.Optimizer):
    """Keras 3's RMSprop: v = ρ·v + (1−ρ)·g²; Δ = lr·g / sqrt(v + ε); with momentum m = μ·m + Δ, w -= m.

    PyTorch's RMSprop adds ε outside the square root; with Keras' ε = 1e-7 that is a 3,000× smaller
    floor on the denominator, which changes steps wherever gradients are small.
    """

    def __init__(self, params, lr: float, rho: float = 0.9, momentum: float = 0.0, eps: float = 1e-7):
        super().__init__(params, {"lr": lr, "rho": rho, "momentum": momentum, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, rho, mu, eps = group["lr"], group["rho"], group["momentum"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["velocity"] = torch.zeros_like(p)
                    if mu > 0:
                        state["momentum"] = torch.zeros_like(p)
                velocity = state["velocity"]
                velocity.mul_(rho).addcmul_(p.grad, p.grad, value=1 - rho)
                increment = p.grad * lr / (velocity + eps).sqrt()
                if mu > 0:
                    buffer = state["momentum"]
                    buffer.mul_(mu).add_(increment)
                    p.sub_(buffer)
                else:
                    p.sub_(increment)
        return loss


# the quintic Newton–Schulz iteration's coefficients (Keller Jordan's, as torch.optim.Muon's default)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalized(matrix: torch.Tensor, steps: int) -> torch.Tensor:
    """`matrix` with its singular values brought near 1 (to about 0.7–1.2: the iteration trades
    exactness for speed), its singular vectors kept: Muon's update, in float32."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.float()
    x = x / x.norm().clamp(min=1e-7)  # the largest singular value at most 1
    wide = x.shape[0] <= x.shape[1]
    if not wide:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


def _orthogonalize(cfg: MuonConfig):
    """A step pre-hook: in every `orthogonalize` group, each gradient becomes Muon's update — its
    (Nesterov) momentum, orthogonalized as a (filters, inputs·kh·kw) matrix — and, with `normalize`,
    the kernel is first rescaled to a norm of sqrt(filters); SGD's step then subtracts lr times it.
    The momentum is the optimizer's state (`muon_buffer`), so checkpoints resume it."""

    @torch.no_grad()
    def hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        for group in optimizer.param_groups:
            if not group.get("orthogonalize"):
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = optimizer.state[p]
                if "muon_buffer" not in state:
                    state["muon_buffer"] = torch.zeros_like(p.grad)
                buffer = state["muon_buffer"].mul_(cfg.momentum).add_(p.grad)
                update = p.grad.add(buffer, alpha=cfg.momentum) if cfg.nesterov else buffer
                if cfg.normalize:
                    p.mul_(len(p) ** 0.5 / p.norm().clamp(min=1e-12))
                matrix = orthogonalized(update.reshape(len(p), -1), cfg.ns_steps)
                # more filters than inputs: a larger step, as Keller Jordan's and PyTorch's Muon take
                matrix *= max(1.0, matrix.shape[0] / matrix.shape[1]) ** 0.5
                p.grad = matrix.view(p.shape).to(p.dtype)

    return hook


def _decoupled_decay(weight_decay: float):
    """A step pre-hook applying Keras' decay to every parameter with a gradient: w -= lr·wd·w (a
    group's `decay_scale` multiplies lr here: BatchNorm's scaled rate does not scale its decay)."""

    @torch.no_grad()
    def hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        for group in optimizer.param_groups:
            rate = group["lr"] * group.get("decay_scale", 1.0)
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1.0 - rate * weight_decay)

    return hook


def make_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The configured optimizer over the trainable parameters, with Keras 3's decoupled weight decay."""
    groups = param_groups(model, cfg)
    lr, wd = cfg.learning_rate, cfg.decay
    # on CUDA, PyTorch's fused kernels: one launch per step for all parameters
    fused = {"fused": True} if all(p.is_cuda for g in groups for p in g["params"]) else {}
    match cfg.name:
        case "sgd":
            optimizer = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **fused)
        case "adam":
            optimizer = torch.optim.Adam(groups, lr=lr, eps=cfg.epsilon, **fused)
        case "adamw":
            # PyTorch's AdamW decays exactly as Keras does (w *= 1 − lr·wd, before the Adam step);
            # a group's decay_scale keeps its per-step decay at the base rate's
            for group in groups:
                group["weight_decay"] = wd * group.pop("decay_scale", 1.0)
            return torch.optim.AdamW(groups, lr=lr, eps=cfg.epsilon, **fused)
        case "rmsprop":
            optimizer = KerasRMSprop(groups, lr=lr, rho=0.9, momentum=cfg.momentum, eps=cfg.epsilon)
        case "adadelta":
            optimizer = torch.optim.Adadelta(groups, lr=lr, rho=cfg.rho, eps=cfg.epsilon)
        case _:
            raise AssertionError(cfg.name)
    if cfg.muon is not None:
        optimizer.register_step_pre_hook(_orthogonalize(cfg.muon))
    if wd:
        optimizer.register_step_pre_hook(_decoupled_decay(wd))
    return optimizer


def lr_factor(cfg: ScheduleConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """The learning rate at an optimizer step, relative to the configured rate ('plateau': 1, the
    reductions are `Plateau.scale`)."""
    match cfg.name:
        case "constant" | "plateau":
            return 1.0
        case "step":
            return cfg.gamma ** (step // (cfg.step_epochs * steps_per_epoch))
        case "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step / total_steps, 1.0)))
        case "onecycle":
            # linear warm-up from 1/25 of the rate, then cosine down to zero (one-cycle, Smith 2018)
            rise = _rise(cfg, total_steps)
            if step < rise:
                return 0.04 + 0.96 * step / rise
            return 0.5 * (1.0 + math.cos(math.pi * min((step - rise) / max(1, total_steps - rise), 1.0)))
        case "linear":
            # airbench's triangle: linear from initial_factor up to 1, then linear down to final_factor
            rise = _rise(cfg, total_steps)
            if step < rise:
                return cfg.initial_factor + (1.0 - cfg.initial_factor) * step / rise
            # the last step ends at final_factor, also when the rise takes every step before it
            fall = min((step - rise) / (total_steps - 1 - rise), 1.0) if total_steps - 1 > rise else 1.0
            return 1.0 + (cfg.final_factor - 1.0) * fall
    raise AssertionError(cfg.name)


def _rise(cfg: ScheduleConfig, total_steps: int) -> int:
    """The warm-up's steps: at least one, also for warmup_fraction 0 (step 0 at the starting rate, the
    fall from step 1), as the airbench94_muon preset's figures were measured."""
    return max(1, int(cfg.warmup_fraction * total_steps))


class Plateau:
    """Keras' ReduceLROnPlateau on val_loss (mode min, cooldown 0): `scale` multiplies the rate.

    A val_loss below best − min_delta is an improvement; after `patience` epochs without one, the
    rate becomes max(rate·factor, min_lr) and the count starts again. Inactive for other schedules.
    """

    def __init__(self, cfg: ScheduleConfig, base_lr: float):
        self.cfg, self.base_lr = cfg, base_lr
        self.scale, self.best, self.wait = 1.0, math.inf, 0

    def update(self, val_loss: float) -> None:
        """After an epoch's validation."""
        if self.cfg.name != "plateau":
            return
        if val_loss < self.best - self.cfg.min_delta:
            self.best, self.wait = val_loss, 0
            return
        self.wait += 1
        if self.wait >= self.cfg.patience:
            lr = self.base_lr * self.scale
            if lr > self.cfg.min_lr:
                self.scale = max(lr * self.cfg.factor, self.cfg.min_lr) / self.base_lr
            self.wait = 0

    def state(self) -> dict:
        return {"scale": self.scale, "best": None if math.isinf(self.best) else self.best, "wait": self.wait}

    def load(self, state: dict) -> None:
        self.scale, self.wait = state["scale"], state["wait"]
        self.best = math.inf if state["best"] is None else state["best"]


def set_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> None:
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base * factor
