"""The PyTorch module of each layer type: `build_module(layer, shape)`.

The layer's definition (keywords, shapes, counts) lives in capas.layers; this is the only place
that turns it into a ``torch.nn.Module``. Modules receive (B, C, H, W) or (B, F) tensors.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from capas.layers import Layer, Shape
from capas.layers import core as L
from capas.layers.base import same_padding

ACTIVATIONS: dict[str, Callable[[], nn.Module] | None] = {
    "linear": None,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "sigmoid": nn.Sigmoid,
    "hard_sigmoid": nn.Hardsigmoid,
    "tanh": nn.Tanh,
    "softmax": lambda: nn.Softmax(dim=1),  # the channel axis in (B, C, H, W) and (B, F)
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "softplus": nn.Softplus,
    "softsign": nn.Softsign,
    "mish": nn.Mish,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),  # Keras' default negative slope is 0.2
}

_BUILDERS: dict[type[Layer], Callable[[Layer, Shape], nn.Module]] = {}


def builds(kind: type[Layer]) -> Callable:
    """Register the function that builds the module of one layer type (exactly that type)."""

    def register(function: Callable[[Layer, Shape], nn.Module]) -> Callable[[Layer, Shape], nn.Module]:
        _BUILDERS[kind] = function
        return function

    return register


def build_module(layer: Layer, shape: Shape) -> nn.Module:
    """The PyTorch module of a layer for its (Keras-order) input shape."""
    builder = _BUILDERS.get(type(layer))
    if builder is None:
        raise TypeError(
            f"no PyTorch module for layer type {layer.type_name()}: add one in capas.models.modules"
        )
    return builder(layer, shape)


def activation_module(name: str | None) -> nn.Module | None:
    """The module for a Keras activation name (None or 'linear': no module)."""
    make = ACTIVATIONS[name or "linear"]
    return None if make is None else make()


def _with_activation(core: OrderedDict, activation: str | None) -> nn.Module:
    act = activation_module(activation)
    if act is not None:
        core["act"] = act
    return nn.Sequential(core)


class Pad2d(nn.Module):
    """Asymmetric spatial padding (TensorFlow's 'same'), with a chosen fill value."""

    def __init__(self, pad_h: tuple[int, int], pad_w: tuple[int, int], value: float = 0.0):
        super().__init__()
        self.pad = (pad_w[0], pad_w[1], pad_h[0], pad_h[1])
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(x, self.pad, value=self.value)


def _padding_modules(shape: Shape, kernel, strides, padding: str, value: float = 0.0) -> OrderedDict:
    """'same' padding as TensorFlow does it (asymmetric when needed); nothing for 'valid'."""
    if padding == "valid":
        return OrderedDict()
    pad_h = same_padding(shape[0], kernel[0], strides[0])
    pad_w = same_padding(shape[1], kernel[1], strides[1])
    if pad_h == (0, 0) and pad_w == (0, 0):
        return OrderedDict()
    return OrderedDict(pad=Pad2d(pad_h, pad_w, value))


def _conv_padding(shape: Shape, layer: L.Conv2D) -> tuple[OrderedDict, tuple[int, int]]:
    """A convolution's 'same' padding: the convolution's own when it is symmetric (no padded copy
    of the input per layer), else a Pad2d before it (TensorFlow puts the odd pixel last)."""
    core = _padding_modules(shape, layer.kernel_size, layer.strides, layer.padding)
    if "pad" in core:
        left, right, top, bottom = core["pad"].pad
        if left == right and top == bottom:
            return OrderedDict(), (top, left)
    return core, (0, 0)


@builds(L.Conv2D)
def _conv2d(layer: L.Conv2D, shape: Shape) -> nn.Module:
    core, padding = _conv_padding(shape, layer)
    conv = nn.Conv2d(
        shape[2], layer.filters, layer.kernel_size, layer.strides, padding=padding, bias=layer.use_bias
    )
    nn.init.xavier_uniform_(conv.weight)  # Keras' glorot_uniform kernel, zero bias
    if layer.kernel_initializer == "dirac":
        # filter i copies input channel i from the tap 'same' puts on the output pixel: the middle of
        # an odd kernel, the one before it in an even one (the odd pixel is padded last), not
        # torch's dirac_ tap (kh // 2), which shifts by a pixel with an even kernel
        n, (kh, kw) = min(layer.filters, shape[2]), layer.kernel_size
        with torch.no_grad():
            conv.weight[:n].zero_()
            conv.weight[range(n), range(n), (kh - 1) // 2, (kw - 1) // 2] = 1.0
    # 'whitening' needs training images: capas.models.init.fit_whitening fills it before training
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    core["conv"] = conv
    return _with_activation(core, layer.activation)


@builds(L.MaxPooling2D)
def _max_pooling(layer: L.MaxPooling2D, shape: Shape) -> nn.Module:
    core = _padding_modules(shape, layer.pool_size, layer.step, layer.padding, value=-math.inf)
    core["pool"] = nn.MaxPool2d(layer.pool_size, layer.step)
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


@builds(L.AveragePooling2D)
def _average_pooling(layer: L.AveragePooling2D, shape: Shape) -> nn.Module:
    pad = _padding_modules(shape, layer.pool_size, layer.step, layer.padding)
    if pad:
        return _AvgPoolSame(pad["pad"], layer.pool_size, layer.step)
    return nn.AvgPool2d(layer.pool_size, layer.step)


class _GlobalPool(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C)
        if self.mode == "avg":
            return x.mean(dim=(2, 3))
        # max with its indices, not amax: amax's backward finds the maximum again by equality, and a
        # compiled backward that recomputes a bfloat16 input in float32 then matches nothing (0/0 = NaN)
        if x.device.type == "cpu":
            # keeps a channels-last input's layout in the gradient, where flatten(2) copies it to
            # NCHW and the layer before then mixes layouts in its backward (a ReLU's runs several
            # times slower: benchmarks/global_max_pooling.py); not on CUDA, where its backward has
            # no deterministic kernel
            return nn.functional.adaptive_max_pool2d(x, 1).flatten(1)
        return x.flatten(2).max(dim=2).values


@builds(L.GlobalMaxPooling2D)
def _global_max(layer: L.GlobalMaxPooling2D, shape: Shape) -> nn.Module:
    return _GlobalPool("max")


@builds(L.GlobalAveragePooling2D)
def _global_average(layer: L.GlobalAveragePooling2D, shape: Shape) -> nn.Module:
    return _GlobalPool("avg")


class _FlattenHWC(nn.Module):
    """Flatten in Keras' (H, W, C) order, so that weights line up with a Keras model's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1) if x.dim() == 4 else x.flatten(1)


@builds(L.Flatten)
def _flatten(layer: L.Flatten, shape: Shape) -> nn.Module:
    return _FlattenHWC()


@builds(L.Dense)
def _dense(layer: L.Dense, shape: Shape) -> nn.Module:
    linear = nn.Linear(shape[0], layer.units, bias=layer.use_bias)
    nn.init.xavier_uniform_(linear.weight)  # Keras' glorot_uniform kernel, zero bias
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return _with_activation(OrderedDict(linear=linear), layer.activation)


class _Dropout(nn.Dropout):
    """nn.Dropout, with its mask drawn as `uniform >= rate` on a CPU, where PyTorch's `bernoulli_` (what
    nn.Dropout draws with) is the slower draw (benchmarks/keras_recipe_step.py measures what it buys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or not 0 < self.p < 1:
            return super().forward(x)
        keep = torch.rand_like(x, dtype=torch.float32) >= self.p  # in x's memory format
        # x·mask is exact and the scale is applied once, in float, as native_dropout computes it
        return x.mul(keep).mul_(1 / (1 - self.p))


@builds(L.Dropout)
def _dropout(layer: L.Dropout, shape: Shape) -> nn.Module:
    return _Dropout(layer.rate)


@builds(L.SpatialDropout2D)
def _spatial_dropout(layer: L.SpatialDropout2D, shape: Shape) -> nn.Module:
    return nn.Dropout2d(layer.rate)


class _BiasedMovingVariance:
    """Keras' moving variance: the running average of the *biased* batch variance (divided by n, as
    keras.ops.moments computes it); PyTorch averages the unbiased one (divided by n − 1).

    PyTorch's update is v' = (1 − f)·v + f·s²·n/(n − 1) with f the momentum (or 1/batches when
    momentum is None); Keras' is v' = (1 − f)·v + f·s². PyTorch updates a copy here (autograd keeps
    the buffer it was given), which is then corrected exactly into the layer's own buffer.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # an empty batch (a process' share of a last batch smaller than --nproc) is PyTorch's: it
        # normalizes nothing and moves no statistic
        if not (self.training and self.track_running_stats) or x.numel() == 0:
            return super().forward(x)
        self._check_input_dim(x)
        self.num_batches_tracked.add_(1)
        f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        n = x.numel() // x.shape[1]  # values per channel in the batch
        if n == 1:
            return self._one_value(x, f)
        updated = self.running_var.clone()
        # `scale: false` with a bias: CUDA's batch_norm backward without a weight returns an empty
        # bias gradient (PyTorch 2.11), so the fixed gamma of 1 is passed as a tensor
        weight = self.weight if self.weight is not None or self.bias is None else torch.ones_like(self.bias)
        out = nn.functional.batch_norm(x, self.running_mean, updated, weight, self.bias, True, f, self.eps)
        with torch.no_grad():
            kept = (1.0 - f) * self.running_var
            self.running_var.copy_(kept + (updated - kept) * ((n - 1) / n))
        return out

    def _one_value(self, x: torch.Tensor, f: float) -> torch.Tensor:
        """One value per channel (a last batch of one image after Dense or global pooling), which
        PyTorch's batch_norm refuses: as in Keras, it is its own mean, its biased variance is 0, so it
        normalizes to 0 (with no gradient through it) and the layer gives beta."""
        with torch.no_grad():
            self.running_mean.mul_(1.0 - f).add_(x.reshape(-1), alpha=f)
            self.running_var.mul_(1.0 - f)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        out = x - x
        if self.weight is not None:
            out = out * self.weight.view(shape)
        return out if self.bias is None else out + self.bias.view(shape)


class KerasBatchNorm2d(_BiasedMovingVariance, nn.BatchNorm2d):
    """BatchNorm2d with Keras' moving variance."""


class KerasBatchNorm1d(_BiasedMovingVariance, nn.BatchNorm1d):
    """BatchNorm1d with Keras' moving variance."""


@builds(L.BatchNormalization)
def _batch_norm(layer: L.BatchNormalization, shape: Shape) -> nn.Module:
    # Keras' momentum weighs the old statistics; PyTorch's weighs the new batch.
    kind = KerasBatchNorm2d if len(shape) == 3 else KerasBatchNorm1d
    norm = kind(shape[-1], eps=layer.epsilon, momentum=1.0 - layer.momentum)
    # PyTorch's batch_norm takes weight=None as 1 and bias=None as 0
    if not layer.scale:
        norm.register_parameter("weight", None)
    if not layer.center:
        norm.register_parameter("bias", None)
    return norm


class _ChannelLayerNorm(nn.Module):
    """LayerNormalization over the channel axis of (B, C, H, W) maps, as Keras does by default."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@builds(L.LayerNormalization)
def _layer_norm(layer: L.LayerNormalization, shape: Shape) -> nn.Module:
    if len(shape) == 3:
        return _ChannelLayerNorm(shape[-1], layer.epsilon)
    return nn.LayerNorm(shape[-1], eps=layer.epsilon)


@builds(L.GroupNormalization)
def _group_norm(layer: L.GroupNormalization, shape: Shape) -> nn.Module:
    return nn.GroupNorm(layer.groups, shape[-1], eps=layer.epsilon)


@builds(L.Activation)
def _activation(layer: L.Activation, shape: Shape) -> nn.Module:
    return activation_module(layer.activation) or nn.Identity()


class _KerasReLU(nn.Module):
    def __init__(self, max_value: float | None, negative_slope: float):
        super().__init__()
        self.max_value, self.negative_slope = max_value, negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.leaky_relu(x, self.negative_slope) if self.negative_slope else torch.relu(x)
        return y.clamp(max=self.max_value) if self.max_value is not None else y


@builds(L.ReLU)
def _relu(layer: L.ReLU, shape: Shape) -> nn.Module:
    if layer.max_value is None and not layer.negative_slope:
        return nn.ReLU()
    return _KerasReLU(layer.max_value, layer.negative_slope)


class _Rescale(nn.Module):
    def __init__(self, scale: float, offset: float):
        super().__init__()
        self.scale, self.offset = scale, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.offset


@builds(L.Rescaling)
def _rescaling(layer: L.Rescaling, shape: Shape) -> nn.Module:
    return _Rescale(layer.scale, layer.offset)


@builds(L.Softmax)
def _softmax(layer: L.Softmax, shape: Shape) -> nn.Module:
    return nn.Softmax(dim=1)  # the channel axis in (B, C, H, W) and (B, F)
