"""build_model(spec) -> CapasNet: the spec's layers as PyTorch modules, in order."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
from torch import nn

from capas.errors import CapasError
from capas.inference import cpu_slice
from capas.layers.core import BatchNormalization, Dropout, Layer
from capas.models.backbones import Backbone, build_backbone
from capas.models.modules import build_module
from capas.spec.model import ModelSpec


def _relu_before_max_pooling(layers: nn.ModuleDict, infos: list) -> list[tuple[str, str]]:
    """(layer, pooling) names where a layer ending in ReLU (Conv2D's `activation: relu`, or
    `Activation: relu`) feeds MaxPooling2D or GlobalMaxPooling2D."""
    pairs = []
    for before, after in itertools.pairwise(infos):
        module = layers[before.name]
        if after.layer.type_name() in ("MaxPooling2D", "GlobalMaxPooling2D") and (
            type(module) is nn.ReLU
            or (isinstance(module, nn.Sequential) and type(getattr(module, "act", None)) is nn.ReLU)
        ):
            pairs.append((before.name, after.name))
    return pairs


def _softmax(layer: Layer) -> bool:
    return layer.type_name() == "Softmax" or getattr(layer, "activation", None) == "softmax"


def passes_through(layer: Layer) -> bool:
    """Whether a layer passes its input through when predicting: Dropout (SpatialDropout2D too), a
    linear Activation."""
    return isinstance(layer, Dropout) or (
        layer.type_name() == "Activation" and layer.activation in (None, "linear")
    )


def _ends_in_softmax(spec: ModelSpec) -> bool:
    """Whether the last layer applies a softmax. One followed only by Dropout or a linear Activation is
    refused: the network would output probabilities where capas takes logits (its predictions a softmax
    of them)."""
    *before, last = spec.layers
    if passes_through(last):
        softmax = next((i for i in range(len(before) - 1, -1, -1) if not passes_through(before[i])), None)
        if softmax is not None and _softmax(before[softmax]):
            advice = "put the Dropout before that layer" if isinstance(last, Dropout) else "leave it out"
            raise CapasError(
                f"layer {softmax} ({before[softmax].type_name()}): applies a softmax and only {last.type_name()} "
                f"follows it: capas trains on the logits before a final softmax and applies it when predicting; "
                f"{advice}"
            )
    return _softmax(last)


class CapasNet(nn.Module):
    """A sequential network built from a spec; `forward` returns logits.

    Keras users end classifiers with a softmax; training here uses cross-entropy on logits (the
    numerically stable path), so a final softmax is built without its activation and applied by
    `predict_proba` instead.
    """

    def __init__(self, spec: ModelSpec, pretrained: bool = False):
        super().__init__()
        self.spec = spec
        infos = spec.layer_infos()
        self.names = [info.name for info in infos]
        self.backbone: Backbone | None = None
        self.frozen = 0  # leading backbone layers with frozen weights
        if spec.backbone is not None:
            # named `backbone` so that optimizers give its parameters `backbone_lr_scale`
            self.backbone = build_backbone(spec.backbone, pretrained=pretrained)
            self.frozen = sum(info.frozen for info in infos[: len(self.backbone)])
            infos = infos[len(self.backbone) :]
        self.layers = nn.ModuleDict()
        strip_softmax = _ends_in_softmax(spec)
        for info in infos:
            module = build_module(info.layer, info.input_shape)
            if strip_softmax and info is infos[-1]:
                module = _without_softmax(module)
            if not info.layer.trainable:  # Keras' `trainable: false`: the weights stay as initialised
                module.requires_grad_(False)
            self.layers[info.name] = module
        self._relu_pools = _relu_before_max_pooling(self.layers, infos)
        # BatchNormalization layers of the spec with `trainable: false` stay in inference mode, as Keras';
        # a frozen Dropout still drops in training, as Keras' does (it has no weights to freeze)
        self.fixed = [
            self.layers[info.name]
            for info in infos
            if not info.layer.trainable and isinstance(info.layer, BatchNormalization)
        ]
        # compiled slices of frozen rows by (first row, end row) (compile_frozen); a plain dict: no
        # state_dict entries
        self._compiled_frozen: dict[tuple[int, int], nn.Module] | None = None
        self._no_grad_slices = _no_grad_slices  # what _backbone calls: see compile_frozen

        self.set_frozen(self.frozen)

    def compile_frozen(self, enabled: bool) -> None:
        """While enabled, the frozen rows' no-gradient slices in training (see `_backbone`) run through
        torch.compile with Inductor's freezing: their weights become constants, BatchNorm is folded into
        the convolutions and the activations into them (benchmarks/transfer_step.py measures what it
        buys). Compiled once per slice of rows (a new frozen count, or train.cache_frozen's rows).
        Freezing copies the weights: `fit` enables it for `train.compile` and disables it when
        training ends, and nothing may load other weights into the model in between."""
        self._compiled_frozen = {} if enabled else None
        # made here, not as a decorator: torch.compiler.disable imports Dynamo (170 MB and seconds
        # at every capas command's start), which only a compiled training needs
        self._no_grad_slices = (
            torch.compiler.disable(_no_grad_slices, recursive=False) if enabled else _no_grad_slices
        )

    @contextlib.contextmanager
    def relu_after_pooling(self) -> Iterator[None]:
        """While it lasts (`fit` trains in it): where a layer ending in ReLU feeds MaxPooling2D or
        GlobalMaxPooling2D, the ReLU runs after the pooling, on a quarter of the values or fewer
        (benchmarks/keras_recipe_step.py measures what it buys a training).

        Exact, in values and in gradients: ReLU is monotonic, so the maximum of the rectified values
        is the rectified maximum, and the pooling picks the same element; where it picks a value
        ≤ 0, the gradient is 0 either way. Outside it the layers run in the spec's order, which
        ONNX Runtime fuses (a convolution with its ReLU) for inference: an int8 export of Keras'
        mnist_cnn ran batches of 64 in 3.7 ms that way, 6.6–6.9 ms with the ReLU after the pooling.
        """
        moved = []
        for before, after in self._relu_pools:
            module = self.layers[before]
            if type(module) is nn.ReLU:  # Activation: relu
                relu, self.layers[before] = module, nn.Identity()
            else:
                relu = module.act
                del module.act
            self.layers[after] = nn.Sequential(self.layers[after], relu)
            moved.append((before, after, relu))
        try:
            yield
        finally:
            for before, after, relu in reversed(moved):
                self.layers[after] = self.layers[after][0]
                if type(self.layers[before]) is nn.Identity:
                    self.layers[before] = relu
                else:
                    self.layers[before].add_module("act", relu)  # the last module, as it was

    def set_frozen(self, count: int) -> None:
        """Freeze the first `count` backbone layers (no gradients) and let the others train."""
        self.frozen = count
        for i, row in enumerate(self.backbone or ()):
            row.requires_grad_(i >= count)
        self.train(self.training)

    def train(self, mode: bool = True) -> CapasNet:
        """As nn.Module.train, but frozen backbone layers stay in inference mode when `bn_frozen`
        (their BatchNorm layers keep using and keeping their ImageNet running statistics), and so do
        the spec's BatchNormalization layers with `trainable: false`."""
        super().train(mode)
        if self.backbone is not None and self.spec.backbone.bn_frozen:
            for row in list(self.backbone)[: self.frozen]:
                row.eval()
        for module in self.fixed:
            module.eval()
        return self

    def forward(self, x: torch.Tensor, start_row: int = 0) -> torch.Tensor:
        """(B, C, H, W) float -> (B, classes) logits. With `start_row`, `x` is what the backbone's rows
        before it output (train.cache_frozen keeps that), and the network runs from that row on."""
        if self.backbone is not None:
            x = self._backbone(x, start_row)  # (B, C', h, w) feature maps
        for layer in self.layers.values():
            x = layer(x)
        return x

    def _backbone(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The backbone's rows. On the CPU, the frozen rows in inference mode run without gradients
        in slices of capas.inference.cpu_slice images, whose activations stay in the caches (as
        evaluation's batches do; benchmarks/transfer.py: EfficientNet-Lite0 at 160×160 in bfloat16 ran
        3.3× faster in batches of 13 than of 512); compiled (`compile_frozen`), on any device. Nothing
        changes but the speed: those rows have no parameters to train and no batch statistics, and
        their input needs no gradient."""
        k, rows = self.frozen, self.backbone
        frozen = rows[start:k]
        if (
            k <= start
            or x.requires_grad
            or any(module.training for row in frozen for module in row.modules())
        ):
            return rows[start:](x) if start else rows(x)
        chunk = cpu_slice(x[0].numel()) if x.device.type == "cpu" else len(x)
        if self._compiled_frozen is not None and self.training:
            if (start, k) not in self._compiled_frozen:
                self._compiled_frozen[start, k] = torch.compile(frozen, dynamic=False)
            frozen = _Freezing(self._compiled_frozen[start, k])
        elif len(x) <= chunk:
            return rows[start:](x) if start else rows(x)
        return rows[k:](self._no_grad_slices(frozen, x, chunk))

    @torch.no_grad()
    def rows_output(self, x: torch.Tensor, stop: int, compiled: bool = True) -> torch.Tensor:
        """The first `stop` backbone rows' output without gradients (train.cache_frozen's values);
        `compiled`: through torch.compile with freezing while `compile_frozen` is on."""
        rows = self.backbone[:stop]
        if self._compiled_frozen is None or not compiled:
            return rows(x)
        if (0, stop) not in self._compiled_frozen:
            self._compiled_frozen[0, stop] = torch.compile(rows, dynamic=False)
        return _Freezing(self._compiled_frozen[0, stop])(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the last layer with weights (the classifier): the penultimate features (B, F)."""
        modules = list(self.layers.values())
        last = max(i for i, m in enumerate(modules) if next(m.parameters(), None) is not None)
        if self.backbone is not None:
            x = self.backbone(x)
        for module in modules[:last]:
            x = module(x)
        return x.flatten(1)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(x), dim=1)


class _Freezing:
    """Calls a compiled module with Inductor's freezing on, so that the graphs it compiles (lazily,
    on the first call of each input shape) fold its weights in as constants. torch.compile's
    `options={"freezing": True}` did not turn it on (torch 2.14: no faster than without it)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torch._inductor import config

        with config.patch(freezing=True):
            return self.module(x)


def _no_grad_slices(rows: nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """`rows` on `x` in slices of `chunk` images, without gradients. Never traced into a compiled
    training step (its graph would need gradients; `compile_frozen` disables Dynamo on it): the
    compiled step breaks its graph here and `rows`, when compiled with freezing, runs as its own
    inference graph."""
    with torch.no_grad():
        return torch.cat([rows(part) for part in x.split(chunk)])


def _without_softmax(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.Softmax):
        return nn.Identity()
    if isinstance(module, nn.Sequential) and isinstance(getattr(module, "act", None), nn.Softmax):
        del module.act
    return module


def build_model(spec: ModelSpec, seed: int | None = None, pretrained: bool = True) -> CapasNet:
    """The network for a spec, initialised as Keras does (glorot-uniform kernels, zero biases).

    A backbone gets the weights its spec names when `pretrained` (loading a run directory passes
    False: the run's own weights replace them), and its first `backbone.frozen` layers are frozen.
    """
    if seed is not None:
        torch.manual_seed(seed)
    return CapasNet(spec, pretrained=pretrained)
