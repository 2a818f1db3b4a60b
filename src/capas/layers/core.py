"""Keras' convolution, pooling, dense, regularisation and normalisation layers."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, Field
from torch import nn

from capas.layers.base import (
    Layer,
    Pad2d,
    Pair,
    Shape,
    activation_module,
    check_activation,
    conv_output,
    register,
    same_padding,
)

ActivationName = Annotated[str | None, AfterValidator(check_activation)]
Padding = Literal["valid", "same"]


def _with_activation(core: OrderedDict, activation: str | None) -> nn.Module:
    act = activation_module(activation)
    if act is not None:
        core["act"] = act
    return nn.Sequential(core)


def _spatial(
    shape: Shape, kernel: tuple[int, int], strides: tuple[int, int], padding: str, what: str
) -> Shape:
    h, w = shape[0], shape[1]
    out_h = conv_output(h, kernel[0], strides[0], padding)
    out_w = conv_output(w, kernel[1], strides[1], padding)
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"the output would be {out_h}×{out_w}, below 1×1: input {h}×{w}, {what} {kernel[0]}×{kernel[1]}, "
            f"strides {strides[0]}×{strides[1]}, padding {padding!r}; use a smaller {what}, padding 'same', "
            "or a larger input"
        )
    return out_h, out_w


def _padding_modules(shape: Shape, kernel, strides, padding: str, value: float = 0.0) -> OrderedDict:
    """'same' padding as TensorFlow does it (asymmetric when needed); nothing for 'valid'."""
    if padding == "valid":
        return OrderedDict()
    pad_h = same_padding(shape[0], kernel[0], strides[0])
    pad_w = same_padding(shape[1], kernel[1], strides[1])
    if pad_h == (0, 0) and pad_w == (0, 0):
        return OrderedDict()
    return OrderedDict(pad=Pad2d(pad_h, pad_w, value))


@register
class Conv2D(Layer):
    takes = "maps"
    filters: int = Field(ge=1)
    kernel_size: Pair
    strides: Pair = (1, 1)
    padding: Padding = "valid"
    activation: ActivationName = None
    use_bias: bool = True

    def output_shape(self, shape: Shape) -> Shape:
        return (*_spatial(shape, self.kernel_size, self.strides, self.padding, "kernel"), self.filters)

    def params(self, shape: Shape) -> tuple[int, int]:
        kh, kw = self.kernel_size
        return kh * kw * shape[2] * self.filters + (self.filters if self.use_bias else 0), 0

    def macs(self, shape: Shape) -> int:
        out_h, out_w, _ = self.output_shape(shape)
        return out_h * out_w * self.kernel_size[0] * self.kernel_size[1] * shape[2] * self.filters

    def build(self, shape: Shape) -> nn.Module:
        core = _padding_modules(shape, self.kernel_size, self.strides, self.padding)
        conv = nn.Conv2d(shape[2], self.filters, self.kernel_size, self.strides, bias=self.use_bias)
        nn.init.xavier_uniform_(conv.weight)  # Keras' glorot_uniform kernel, zero bias
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
        core["conv"] = conv
        return _with_activation(core, self.activation)


class _Pooling2D(Layer):
    takes = "maps"
    pool_size: Pair = (2, 2)
    strides: Pair | None = None
    padding: Padding = "valid"

    @property
    def step(self) -> tuple[int, int]:
        return self.strides or self.pool_size

    def output_shape(self, shape: Shape) -> Shape:
        return (*_spatial(shape, self.pool_size, self.step, self.padding, "pool_size"), shape[2])


@register
class MaxPooling2D(_Pooling2D):
    def build(self, shape: Shape) -> nn.Module:
        core = _padding_modules(shape, self.pool_size, self.step, self.padding, value=-math.inf)
        core["pool"] = nn.MaxPool2d(self.pool_size, self.step)
        return nn.Sequential(core)


class _AvgPoolSame(nn.Module):
    """Average pooling with TensorFlow's 'same' padding: padded pixels are not counted."""

    def __init__(self, pad: Pad2d, pool: tuple[int, int], step: tuple[int, int]):
        super().__init__()
        self.pad, self.pool, self.step = pad, pool, step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sums = nn.functional.avg_pool2d(self.pad(x), self.pool, self.step)
        counts = nn.functional.avg_pool2d(self.pad(torch.ones_like(x[:1, :1])), self.pool, self.step)
        return sums / counts


@register
class AveragePooling2D(_Pooling2D):
    def build(self, shape: Shape) -> nn.Module:
        pad = _padding_modules(shape, self.pool_size, self.step, self.padding)
        if pad:
            return _AvgPoolSame(pad["pad"], self.pool_size, self.step)
        return nn.AvgPool2d(self.pool_size, self.step)


class _GlobalPool(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C)
        return x.amax(dim=(2, 3)) if self.mode == "max" else x.mean(dim=(2, 3))


@register
class GlobalMaxPooling2D(Layer):
    takes = "maps"

    def output_shape(self, shape: Shape) -> Shape:
        return (shape[2],)

    def build(self, shape: Shape) -> nn.Module:
        return _GlobalPool("max")


@register
class GlobalAveragePooling2D(GlobalMaxPooling2D):
    def build(self, shape: Shape) -> nn.Module:
        return _GlobalPool("avg")


class _FlattenHWC(nn.Module):
    """Flatten in Keras' (H, W, C) order, so that weights line up with a Keras model's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1) if x.dim() == 4 else x.flatten(1)


@register
class Flatten(Layer):
    def output_shape(self, shape: Shape) -> Shape:
        return (math.prod(shape),)

    def build(self, shape: Shape) -> nn.Module:
        return _FlattenHWC()


@register
class Dense(Layer):
    takes = "flat"
    units: int = Field(ge=1)
    activation: ActivationName = None
    use_bias: bool = True

    def output_shape(self, shape: Shape) -> Shape:
        return (self.units,)

    def params(self, shape: Shape) -> tuple[int, int]:
        return shape[0] * self.units + (self.units if self.use_bias else 0), 0

    def macs(self, shape: Shape) -> int:
        return shape[0] * self.units

    def build(self, shape: Shape) -> nn.Module:
        linear = nn.Linear(shape[0], self.units, bias=self.use_bias)
        nn.init.xavier_uniform_(linear.weight)  # Keras' glorot_uniform kernel, zero bias
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
        return _with_activation(OrderedDict(linear=linear), self.activation)


@register
class Dropout(Layer):
    rate: float = Field(ge=0.0, lt=1.0)

    def build(self, shape: Shape) -> nn.Module:
        return nn.Dropout(self.rate)


@register
class SpatialDropout2D(Dropout):
    takes = "maps"

    def build(self, shape: Shape) -> nn.Module:
        return nn.Dropout2d(self.rate)


def _elements(shape: Shape) -> int:
    return math.prod(shape)


@register
class BatchNormalization(Layer):
    momentum: float = Field(default=0.99, ge=0.0, le=1.0)
    epsilon: float = Field(default=1e-3, gt=0.0)

    def params(self, shape: Shape) -> tuple[int, int]:
        return 2 * shape[-1], 2 * shape[-1]  # gamma, beta; moving mean and variance

    def macs(self, shape: Shape) -> int:
        return _elements(shape)  # one scale-and-shift per element at inference

    def build(self, shape: Shape) -> nn.Module:
        # Keras' momentum weighs the old statistics; PyTorch's weighs the new batch.
        kind = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
        return kind(shape[-1], eps=self.epsilon, momentum=1.0 - self.momentum)


class _ChannelLayerNorm(nn.Module):
    """LayerNormalization over the channel axis of (B, C, H, W) maps, as Keras does by default."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@register
class LayerNormalization(Layer):
    epsilon: float = Field(default=1e-3, gt=0.0)

    def params(self, shape: Shape) -> tuple[int, int]:
        return 2 * shape[-1], 0

    def macs(self, shape: Shape) -> int:
        return _elements(shape)

    def build(self, shape: Shape) -> nn.Module:
        if len(shape) == 3:
            return _ChannelLayerNorm(shape[-1], self.epsilon)
        return nn.LayerNorm(shape[-1], eps=self.epsilon)


@register
class GroupNormalization(Layer):
    groups: int = Field(default=32, ge=1)
    epsilon: float = Field(default=1e-3, gt=0.0)

    def output_shape(self, shape: Shape) -> Shape:
        channels = shape[-1]
        if channels % self.groups:
            raise ValueError(
                f"groups={self.groups} does not divide the {channels} channels; use a divisor of {channels} "
                f"(groups={channels} is instance normalization, groups=1 normalises all channels together)"
            )
        return shape

    def params(self, shape: Shape) -> tuple[int, int]:
        return 2 * shape[-1], 0

    def macs(self, shape: Shape) -> int:
        return _elements(shape)

    def build(self, shape: Shape) -> nn.Module:
        return nn.GroupNorm(self.groups, shape[-1], eps=self.epsilon)


@register
class Activation(Layer):
    activation: ActivationName

    def build(self, shape: Shape) -> nn.Module:
        return activation_module(self.activation) or nn.Identity()


class _KerasReLU(nn.Module):
    def __init__(self, max_value: float | None, negative_slope: float):
        super().__init__()
        self.max_value, self.negative_slope = max_value, negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.leaky_relu(x, self.negative_slope) if self.negative_slope else torch.relu(x)
        return y.clamp(max=self.max_value) if self.max_value is not None else y


@register
class ReLU(Layer):
    max_value: float | None = Field(default=None, gt=0.0)
    negative_slope: float = Field(default=0.0, ge=0.0)

    def build(self, shape: Shape) -> nn.Module:
        if self.max_value is None and not self.negative_slope:
            return nn.ReLU()
        return _KerasReLU(self.max_value, self.negative_slope)


@register
class Softmax(Layer):
    axis: Literal[-1] = -1

    def build(self, shape: Shape) -> nn.Module:
        return nn.Softmax(dim=1)  # the channel axis in (B, C, H, W) and (B, F)
