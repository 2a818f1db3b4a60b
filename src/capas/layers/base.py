"""The base class of every layer type, the registry, and Keras' activation names."""

from __future__ import annotations

import math
from typing import Annotated, ClassVar

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from torch import nn

Shape = tuple[int, ...]
"""A Keras shape without the batch: (H, W, C) for feature maps, (F,) for vectors."""

LAYERS: dict[str, type[Layer]] = {}


def register(cls: type[Layer]) -> type[Layer]:
    """Make a layer type available under its class name, the name Keras users write."""
    LAYERS[cls.__name__] = cls
    return cls


def _pair(value: object) -> object:
    """Keras accepts 3 or [3, 3] for a 2-D size; normalise to a 2-tuple."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    return value


Pair = Annotated[tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]], BeforeValidator(_pair)]

ACTIVATIONS: dict[str, type[nn.Module] | None] = {
    "linear": None,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "sigmoid": nn.Sigmoid,
    "hard_sigmoid": nn.Hardsigmoid,
    "tanh": nn.Tanh,
    "softmax": None,  # built as nn.Softmax(dim=1), see activation_module
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "softplus": nn.Softplus,
    "softsign": nn.Softsign,
    "mish": nn.Mish,
    "leaky_relu": None,  # Keras' default negative slope is 0.2, see activation_module
}


def activation_module(name: str | None) -> nn.Module | None:
    """The module for a Keras activation name (None or 'linear': no module)."""
    if name in (None, "linear"):
        return None
    if name == "softmax":
        return nn.Softmax(dim=1)
    if name == "leaky_relu":
        return nn.LeakyReLU(0.2)
    return ACTIVATIONS[name]()


def check_activation(value: str | None) -> str | None:
    if value is not None and value not in ACTIVATIONS:
        from capas.errors import closest

        raise ValueError(
            f"unknown activation {value!r}{closest(value, ACTIVATIONS)}; allowed: {', '.join(ACTIVATIONS)}"
        )
    return value


class Layer(BaseModel):
    """A layer as a Keras user writes it: its keywords are the model's fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    """Keras' optional layer name; defaults to the snake-case type name with a counter."""

    takes: ClassVar[str] = "any"
    """What input the layer accepts: 'maps' (H, W, C), 'flat' (F,) or 'any'."""

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__

    def output_shape(self, shape: Shape) -> Shape:
        """The output shape for an input shape, both without the batch."""
        return shape

    def params(self, shape: Shape) -> tuple[int, int]:
        """(trainable, non-trainable) parameter counts, as Keras counts them."""
        return 0, 0

    def macs(self, shape: Shape) -> int:
        """Multiply-adds of one forward pass for one image."""
        return 0

    def build(self, shape: Shape) -> nn.Module:
        """The PyTorch module; it receives (B, C, H, W) or (B, F) tensors."""
        return nn.Identity()

    def keywords(self) -> dict:
        """The keywords that differ from Keras' defaults, as a user would write them."""
        return self.model_dump(exclude_defaults=True, mode="json")


def conv_output(size: int, kernel: int, stride: int, padding: str) -> int:
    """One spatial output size, as Keras computes it."""
    if padding == "same":
        return math.ceil(size / stride)
    return (size - kernel) // stride + 1


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's 'same' padding (before, after): the extra pixel goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Pad2d(nn.Module):
    """Asymmetric spatial padding (TensorFlow's 'same'), with a chosen fill value."""

    def __init__(self, pad_h: tuple[int, int], pad_w: tuple[int, int], value: float = 0.0):
        super().__init__()
        self.pad = (pad_w[0], pad_w[1], pad_h[0], pad_h[1])
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(x, self.pad, value=self.value)
