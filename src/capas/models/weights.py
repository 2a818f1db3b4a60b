"""Loading a state_dict that must fit exactly, with a message that says how it does not."""

from __future__ import annotations

import torch
from torch import nn

from capas.errors import CapasError

SHOWN = 6  # names listed per kind of mismatch


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], problem: str) -> None:
    """Load `state` into `model`; if it does not fit, a CapasError starts with `problem` and names the
    missing, unexpected and wrongly shaped tensors (a file of another architecture, a tampered spec)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{len(missing)} missing keys: {', '.join(missing[:SHOWN])}" if missing else "",
            f"{len(unexpected)} unexpected keys: {', '.join(unexpected[:SHOWN])}" if unexpected else "",
            f"wrong shapes: {'; '.join(shapes[:SHOWN])}" if shapes else "",
        ]
        raise CapasError(f"{problem}: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state)
