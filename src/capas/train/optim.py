"""Optimizers and learning-rate schedules from the typed config."""

from __future__ import annotations

import math

import torch
from torch import nn

from capas.spec.train import OptimizerConfig, ScheduleConfig


def param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """Trainable parameters only (frozen ones get no state and no decay); backbone layers at a scaled rate."""
    lr = cfg.learning_rate
    backbone, own = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if name.startswith("backbone.") else own).append(param)
    groups = [{"params": own, "lr": lr}]
    if backbone:
        groups.append({"params": backbone, "lr": lr * cfg.backbone_lr_scale})
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    lr, wd = cfg.learning_rate, cfg.weight_decay
    match cfg.name:
        case "sgd":
            return torch.optim.SGD(
                groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=wd
            )
        case "adam":
            return torch.optim.Adam(groups, lr=lr, eps=cfg.epsilon, weight_decay=wd)
        case "adamw":
            return torch.optim.AdamW(groups, lr=lr, eps=cfg.epsilon, weight_decay=wd)
        case "rmsprop":
            return torch.optim.RMSprop(
                groups, lr=lr, alpha=0.9, eps=cfg.epsilon, momentum=cfg.momentum, weight_decay=wd
            )
        case "adadelta":
            return torch.optim.Adadelta(groups, lr=lr, rho=cfg.rho, eps=cfg.epsilon, weight_decay=wd)
    raise AssertionError(cfg.name)


def lr_factor(cfg: ScheduleConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """The learning rate at an optimizer step, relative to the configured rate."""
    match cfg.name:
        case "constant":
            return 1.0
        case "step":
            return cfg.gamma ** (step // (cfg.step_epochs * steps_per_epoch))
        case "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step / total_steps, 1.0)))
        case "onecycle":
            # linear warm-up from 1/25 of the rate, then cosine down to zero (one-cycle, Smith 2018)
            rise = max(1, int(cfg.warmup_fraction * total_steps))
            if step < rise:
                return 0.04 + 0.96 * step / rise
            return 0.5 * (1.0 + math.cos(math.pi * min((step - rise) / max(1, total_steps - rise), 1.0)))
        case "linear":
            # airbench's triangle: linear from initial_factor up to 1, then linear down to final_factor
            rise = max(1, int(cfg.warmup_fraction * total_steps))
            if step < rise:
                return cfg.initial_factor + (1.0 - cfg.initial_factor) * step / rise
            fall = min((step - rise) / max(1, total_steps - 1 - rise), 1.0)
            return 1.0 + (cfg.final_factor - 1.0) * fall
    raise AssertionError(cfg.name)


def set_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> None:
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base * factor
