"""BatchNormalization's running statistics: recalibration before evaluation, and the gap check.

With Keras' momentum 0.99 the running statistics average the last ~100 batches, so they lag
behind weights that change quickly (short budgets, high learning rates) and evaluation-mode
accuracy falls below what the same weights reach with batch statistics. `recalibrate` recomputes
them for the current weights as a plain average over training batches (PyTorch's momentum=None),
without augmentation; `mode_gap` measures how far evaluation-mode accuracy on training images
falls below training-mode (batch-statistics) accuracy, so that a lagging run is flagged.
`warn_short_last_batch` says when an epoch's short last batch makes the running statistics noisy.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from capas.data import ArrayDataset, Preprocess, iterate_batches
from capas.inference import autocast
from capas.spec.train import TrainConfig

GAP_IMAGES = 2048  # training images the gap is measured on: ±1 pp binomial noise at 90% accuracy
GAP_FLAG_PP = 5.0  # evaluation-mode accuracy this far below training-mode accuracy flags the run
# an epoch's last batch that leaves the running statistics this many times as variable as full batches
# do is warned of (twice their standard deviation)
SHORT_BATCH_VARIANCE = 4.0


def _training_bns(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers that update their statistics when the model trains (not frozen ones)."""
    was_training = model.training
    model.train()
    found = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training
    ]
    model.train(was_training)
    return found


def warn_short_last_batch(model: nn.Module, images: int, cfg: TrainConfig) -> None:
    """Warn when each epoch ends on a batch so short that the running statistics validation and the
    test use are noisy. A running average of batches of b images, each weighted f (PyTorch's
    momentum, Keras' 1 − momentum), has a variance f/(2 − f)·σ²/b; after a last batch of r images
    it is f²·σ²/r + (1 − f)²·f/(2 − f)·σ²/b: f(2 − f)·b/r + (1 − f)² times as large. With airbench's
    momentum 0.6, a last batch of 8 of 512 images makes it 41 times (a Fashion-MNIST run of the wide
    preset ended 1 pp lower, README); with Keras' 0.99 it takes a last batch of 1 image after batches
    of 152 or more. Not with `bn_recalibration`, which recomputes the statistics before every evaluation."""
    short = images % cfg.batch_size
    if cfg.drop_last or cfg.bn_recalibration or not short or images < cfg.batch_size:
        return
    bns = _training_bns(model)
    if not bns:
        return
    f = max(bn.momentum if bn.momentum is not None else 0.0 for bn in bns)
    variance = f * (2 - f) * cfg.batch_size / short + (1 - f) ** 2
    if variance >= SHORT_BATCH_VARIANCE:
        warnings.warn(
            f"each epoch ends on a batch of {short} of the {images:,} training images (batch_size "
            f"{cfg.batch_size}), and BatchNormalization momentum {1 - f:.3g} weighs it "
            f"{f:.0%} in the running statistics that validation and the test use: {variance:.0f}× the "
            "variance full batches leave; set train.drop_last: true, or a batch_size that divides the "
            "training images",
            stacklevel=3,
        )


def _batches(data: ArrayDataset, preprocess: Preprocess, cfg: TrainConfig, device: torch.device):
    """Training images in the training batch size, shuffled the same way for a given seed, no augmentation."""
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + 99_991)
    return iterate_batches(
        data,
        cfg.batch_size,
        preprocess=preprocess,
        shuffle=True,
        generator=generator,
        device=device,
        channels_last=cfg.channels_last,
    )


def _forward(model: nn.Module, x: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    with autocast(device, precision):
        return model(x).float()


@torch.no_grad()
def recalibrate(model: nn.Module, data: ArrayDataset, preprocess: Preprocess, cfg: TrainConfig) -> int:
    """Recompute the running statistics of the model's trainable BatchNorm layers as the average over
    `cfg.bn_recalibration` training batches; returns how many batches were used (0: no such layer)."""
    bns = _training_bns(model)
    if not bns or not cfg.bn_recalibration:
        return 0
    device = next(model.parameters()).device
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    model.eval()  # dropout and the rest in inference mode: only the BatchNorm layers see batch statistics
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
        bn.train()
    used = 0
    for x, _ in _batches(data, preprocess, cfg, device):
        _forward(model, x, device, cfg.precision)
        used += 1
        if used == cfg.bn_recalibration:
            break
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    model.train(was_training)
    return used


@torch.no_grad()
def mode_gap(model: nn.Module, data: ArrayDataset, preprocess: Preprocess, cfg: TrainConfig) -> dict | None:
    """Accuracy on up to GAP_IMAGES training images with the BatchNorm layers in training mode (batch
    statistics, in training-sized batches) and in evaluation mode (running statistics), everything
    else in inference mode; None for a model without trainable BatchNorm layers. The running
    statistics are left as they were."""
    bns = _training_bns(model)
    if not bns:
        return None
    device = next(model.parameters()).device
    was_training = model.training
    saved = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in bns]
    counts = {"train": 0, "eval": 0}
    seen = 0
    model.eval()
    for x, y in _batches(data, preprocess, cfg, device):
        counts["eval"] += int((_forward(model, x, device, cfg.precision).argmax(1) == y).sum())
        for bn in bns:
            bn.train()
        counts["train"] += int((_forward(model, x, device, cfg.precision).argmax(1) == y).sum())
        for bn in bns:
            bn.eval()
        seen += len(y)
        if seen >= GAP_IMAGES:
            break
    for bn, state in zip(bns, saved, strict=True):
        bn.load_state_dict(state)
    model.train(was_training)
    train_mode, eval_mode = 100 * counts["train"] / seen, 100 * counts["eval"] / seen
    return {
        "images": seen,
        "train_mode_accuracy": train_mode / 100,
        "eval_mode_accuracy": eval_mode / 100,
        "gap_pp": train_mode - eval_mode,
        "flagged": train_mode - eval_mode > GAP_FLAG_PP,
    }
