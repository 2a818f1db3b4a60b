"""An exponential moving average of the weights, the model that validation, the test and the run use."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from capas.spec.train import EmaConfig

TAKEN = "capas_ema_taken"  # a checkpoint's flag beside the averaged tensors (no model's state key)


class WeightAverage:
    """ema ← decay · ema + (1 − decay) · weights after every `every` optimizer steps, over every float tensor
    of the model's state (BatchNorm's running statistics too, so that the averaged model's
    normalisation matches its averaged weights); counters such as num_batches_tracked stay live."""

    def __init__(self, model: nn.Module, cfg: EmaConfig):
        self.cfg = cfg
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        # until the first average (a budget can stop training before step `every`) the model's own
        # weights stand for it: the average would still be the starting weights
        self.taken = False

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, total_steps: int) -> None:
        """After optimizer step `step` of `total_steps` (counted from 1): every `every` steps,
        average; every `overwrite_every` steps, also put the average back into the model."""
        if step % self.cfg.every:
            return
        decay = self.cfg.decay * min(step / total_steps, 1.0) ** self.cfg.ramp
        live = model.state_dict()
        keys = list(self.state)
        # one fused pass over all tensors (no Python loop per tensor on the hot path)
        torch._foreach_lerp_([self.state[k] for k in keys], [live[k] for k in keys], 1.0 - decay)
        self.taken = True
        if self.cfg.overwrite_every and step % self.cfg.overwrite_every == 0:
            self.copy_to(model)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Put the average into the model's tensors, in place (once one was taken)."""
        if not self.taken:
            return
        live = model.state_dict()
        torch._foreach_copy_([live[k] for k in self.state], list(self.state.values()))

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Inside, the model holds the average (once one was taken); afterwards its own weights again."""
        if not self.taken:
            yield
            return
        live = model.state_dict()
        saved = {k: live[k].detach().clone() for k in self.state}
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([live[k] for k in saved], list(saved.values()))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The average, for checkpoints, and whether one was taken."""
        return {**self.state, TAKEN: torch.tensor(self.taken)}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the average from a checkpoint (missing keys keep their current values; an older
        capas' checkpoint, which did not say whether an average was taken, had taken one)."""
        self.taken = bool(tensors[TAKEN]) if TAKEN in tensors else True
        for key, value in tensors.items():
            if key in self.state:
                self.state[key].copy_(value)
