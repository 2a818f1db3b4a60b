"""build_model(spec) -> CapasNet: the spec's layers as PyTorch modules, in order."""

from __future__ import annotations

import torch
from torch import nn

from capas.spec.model import ModelSpec


def _ends_in_softmax(spec: ModelSpec) -> bool:
    last = spec.layers[-1]
    return last.type_name() == "Softmax" or getattr(last, "activation", None) == "softmax"


class CapasNet(nn.Module):
    """A sequential network built from a spec; `forward` returns logits.

    Keras users end classifiers with a softmax; training here uses cross-entropy on logits (the
    numerically stable path), so a final softmax is built without its activation and applied by
    `predict_proba` instead.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        infos = spec.layer_infos()
        self.names = [info.name for info in infos]
        self.layers = nn.ModuleDict()
        strip_softmax = _ends_in_softmax(spec)
        for info in infos:
            module = info.layer.build(info.input_shape)
            if strip_softmax and info is infos[-1]:
                module = _without_softmax(module)
            self.layers[info.name] = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) float -> (B, classes) logits
        for layer in self.layers.values():
            x = layer(x)
        return x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the last layer with weights (the classifier): the penultimate features (B, F)."""
        modules = list(self.layers.values())
        last = max(i for i, m in enumerate(modules) if next(m.parameters(), None) is not None)
        for module in modules[:last]:
            x = module(x)
        return x.flatten(1)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(x), dim=1)


def _without_softmax(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.Softmax):
        return nn.Identity()
    if isinstance(module, nn.Sequential) and isinstance(getattr(module, "act", None), nn.Softmax):
        del module.act
    return module


def build_model(spec: ModelSpec, seed: int | None = None) -> CapasNet:
    """The network for a spec, initialised as Keras does (glorot-uniform kernels, zero biases)."""
    if seed is not None:
        torch.manual_seed(seed)
    return CapasNet(spec)
