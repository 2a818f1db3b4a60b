"""Progressive resizing: the training batches' size at each step (capas.spec.ProgressiveResizing)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from capas.errors import CapasError
from capas.spec import ProgressiveResizing


def scale(cfg: ProgressiveResizing, step: int, total_steps: int) -> float:
    """The side of the images at `step` (0-based) of `total_steps`, relative to the full size."""
    elapsed = step / total_steps
    grow = 1.0 - cfg.finetune_fraction - cfg.delay_fraction  # share of the steps spent growing
    if elapsed < cfg.delay_fraction:
        progress = 0.0
    elif elapsed >= 1.0 - cfg.finetune_fraction or grow <= 0.0:
        progress = 1.0
    else:
        progress = (elapsed - cfg.delay_fraction) / grow
    return cfg.initial_scale + (1.0 - cfg.initial_scale) * progress


def size(cfg: ProgressiveResizing, step: int, total_steps: int, full: tuple[int, int]) -> tuple[int, int]:
    """(height, width) at `step`: the scaled sides rounded down to multiples of size_increment, at
    least one increment and at most the full size; the full-size steps at the full size itself (the
    size evaluation sees), whether or not it is a multiple."""
    s = scale(cfg, step, total_steps)
    if s >= 1.0:
        return full
    inc = cfg.size_increment
    # rounded to 9 digits first: 0.58 × 100 is 57.999…, whose floor would take an increment off
    return tuple(min(side, max(inc, int(round(s * side, 9)) // inc * inc)) for side in full)


def resize(x: torch.Tensor, height_width: tuple[int, int]) -> torch.Tensor:
    """A batch (N, C, H, W) resized to `height_width` (bilinear, antialiased), in its memory format."""
    if tuple(x.shape[-2:]) == height_width:
        return x
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    out = F.interpolate(x, size=height_width, mode="bilinear", antialias=True, align_corners=False)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def check_model(model: nn.Module, cfg: ProgressiveResizing, full: tuple[int, int], channels: int) -> None:
    """Stop before training when the network cannot take the schedule's smallest images."""
    smallest = size(cfg, 0, 1, full)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()  # no BatchNorm statistics move, no dropout
    try:
        with torch.no_grad():
            model(torch.zeros(2, channels, *smallest, device=device))
    except RuntimeError as error:
        raise CapasError(
            f"train.progressive_resizing: the network cannot take {smallest[0]}×{smallest[1]} images (its "
            f"input is {full[0]}×{full[1]}): {error}. Progressive resizing needs a network that takes any "
            "size, with GlobalAveragePooling2D or GlobalMaxPooling2D before its Dense layers and no Flatten "
            "(or a larger initial_scale)"
        ) from None
    finally:
        model.train(was_training)
