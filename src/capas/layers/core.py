"""Keras' convolution, pooling, dense, regularisation and normalisation layers."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from capas.layers.base import Count, Layer, Pair, Real, Shape, check_activation, conv_output, register

ActivationName = Annotated[str | None, AfterValidator(check_activation)]
Padding = Literal["valid", "same"]


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


KernelInitializer = Literal["glorot_uniform", "dirac", "whitening"]


@register
class Conv2D(Layer):
    """Keras' Conv2D. `kernel_initializer` adds two starts airbench uses besides Keras' default:

    - `dirac`: the first min(filters, input channels) filters pass their input channel through
      unchanged (an identity, i.e. an implicit residual); any further filters stay glorot-uniform.
    - `whitening`: the kernels whiten the training images' patches (filled by
      `capas.models.init.fit_whitening` from the training split before training starts; the first
      layer only, at most 2 × kernel height × kernel width × channels filters).
    """

    takes = "maps"
    structured_pruning = True
    example = (
        {"filters": 6, "kernel_size": 3, "strides": 2, "padding": "same", "activation": "relu"},
        (9, 7, 4),
    )
    filters: Count = Field(ge=1)
    kernel_size: Pair
    strides: Pair = (1, 1)
    padding: Padding = "valid"
    activation: ActivationName = None
    use_bias: bool = True
    kernel_initializer: KernelInitializer = "glorot_uniform"

    def output_shape(self, shape: Shape) -> Shape:
        if self.kernel_initializer == "whitening":
            patch = self.kernel_size[0] * self.kernel_size[1] * shape[2]
            if self.filters > 2 * patch:
                raise ValueError(
                    f"kernel_initializer 'whitening' gives at most 2 × {self.kernel_size[0]}×{self.kernel_size[1]} "
                    f"× {shape[2]} channels = {2 * patch} filters (each patch direction and its negative), "
                    f"got filters={self.filters}"
                )
        return (*_spatial(shape, self.kernel_size, self.strides, self.padding, "kernel"), self.filters)

    def params(self, shape: Shape) -> tuple[int, int]:
        kh, kw = self.kernel_size
        return kh * kw * shape[2] * self.filters + (self.filters if self.use_bias else 0), 0

    def formula(self, shape: Shape) -> str:
        kh, kw = self.kernel_size
        bias = f" + {self.filters}" if self.use_bias else ""
        return f"{kh}·{kw}·{shape[2]}·{self.filters}{bias} = {sum(self.params(shape)):,}"

    def macs(self, shape: Shape) -> int:
        out_h, out_w, _ = self.output_shape(shape)
        return out_h * out_w * self.kernel_size[0] * self.kernel_size[1] * shape[2] * self.filters


class _Pooling2D(Layer):
    takes = "maps"
    structured_pruning = True
    example = ({"pool_size": 3, "strides": 2, "padding": "same"}, (9, 7, 4))
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
    pass


@register
class AveragePooling2D(_Pooling2D):
    pass


@register
class GlobalMaxPooling2D(Layer):
    takes = "maps"
    structured_pruning = True
    example = ({}, (5, 5, 4))

    def output_shape(self, shape: Shape) -> Shape:
        return (shape[2],)


@register
class GlobalAveragePooling2D(GlobalMaxPooling2D):
    pass


@register
class Flatten(Layer):
    """Flattens in Keras' (H, W, C) order, so that weights line up with a Keras model's."""

    structured_pruning = True
    example = ({}, (3, 5, 4))

    def output_shape(self, shape: Shape) -> Shape:
        return (math.prod(shape),)


@register
class Dense(Layer):
    takes = "flat"
    structured_pruning = True
    example = ({"units": 7, "activation": "gelu"}, (12,))
    units: Count = Field(ge=1)
    activation: ActivationName = None
    use_bias: bool = True

    def output_shape(self, shape: Shape) -> Shape:
        return (self.units,)

    def params(self, shape: Shape) -> tuple[int, int]:
        return shape[0] * self.units + (self.units if self.use_bias else 0), 0

    def formula(self, shape: Shape) -> str:
        bias = f" + {self.units}" if self.use_bias else ""
        return f"{shape[0]}·{self.units}{bias} = {sum(self.params(shape)):,}"

    def macs(self, shape: Shape) -> int:
        return shape[0] * self.units


@register
class Dropout(Layer):
    structured_pruning = True
    example = ({"rate": 0.5}, (5, 5, 4))
    rate: Real = Field(ge=0.0, lt=1.0)


@register
class SpatialDropout2D(Dropout):
    takes = "maps"


def _elements(shape: Shape) -> int:
    return math.prod(shape)


@register
class BatchNormalization(Layer):
    """Keras' BatchNormalization. `scale: false` drops gamma (fixed at 1) and `center: false` drops
    beta (fixed at 0), as in Keras; airbench trains its BatchNorm layers with `scale: false` and
    `momentum: 0.6`."""

    structured_pruning = True
    example = ({}, (5, 5, 4))
    momentum: Real = Field(default=0.99, ge=0.0, le=1.0)
    epsilon: Real = Field(default=1e-3, gt=0.0)
    center: bool = True
    scale: bool = True

    def params(self, shape: Shape) -> tuple[int, int]:
        # gamma and/or beta; the moving mean and variance
        return (self.center + self.scale) * shape[-1], 2 * shape[-1]

    def formula(self, shape: Shape) -> str:
        trainable, non_trainable = self.params(shape)
        per_channel = 2 + self.center + self.scale
        return f"{per_channel}·{shape[-1]} = {trainable + non_trainable:,} ({non_trainable:,} not trainable)"

    def macs(self, shape: Shape) -> int:
        return _elements(shape)  # one scale-and-shift per element at inference


@register
class LayerNormalization(Layer):
    """Normalises over the channel axis, as Keras does by default."""

    example = ({}, (5, 5, 4))
    epsilon: Real = Field(default=1e-3, gt=0.0)

    def params(self, shape: Shape) -> tuple[int, int]:
        return 2 * shape[-1], 0

    def formula(self, shape: Shape) -> str:
        return f"2·{shape[-1]} = {sum(self.params(shape)):,}"

    def macs(self, shape: Shape) -> int:
        return _elements(shape)


@register
class GroupNormalization(Layer):
    example = ({"groups": 2}, (5, 5, 4))
    groups: Count = Field(default=32, ge=1)
    epsilon: Real = Field(default=1e-3, gt=0.0)

    def output_shape(self, shape: Shape) -> Shape:
        channels = shape[-1]
        if channels % self.groups:
            raise ValueError(
                f"groups={self.groups} does not divide the {channels} channels; use a divisor of {channels} "
                f"(groups={channels} is instance normalization, groups=1 normalises all channels together)"
            )
        return shape

    params = LayerNormalization.params
    formula = LayerNormalization.formula
    macs = LayerNormalization.macs


@register
class Activation(Layer):
    structured_pruning = True
    example = ({"activation": "leaky_relu"}, (5, 5, 4))
    activation: ActivationName


@register
class ReLU(Layer):
    structured_pruning = True
    example = ({"max_value": 6.0}, (5, 5, 4))
    max_value: Real | None = Field(default=None, gt=0.0)
    negative_slope: Real = Field(default=0.0, ge=0.0)


@register
class Rescaling(Layer):
    """Keras' Rescaling: x · scale + offset. Before a classifier's softmax it sets the logits'
    temperature (airbench multiplies its logits by 1/9)."""

    structured_pruning = True
    example = ({"scale": 1 / 9, "offset": 0.5}, (5, 5, 4))
    scale: Real
    offset: Real = 0.0

    def macs(self, shape: Shape) -> int:
        return _elements(shape)


@register
class Softmax(Layer):
    structured_pruning = True
    example = ({}, (12,))
    axis: Literal[-1] = -1
