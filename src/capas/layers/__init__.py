"""The registry of layer types, by the name a Keras user writes.

Each layer type is a pydantic model of its Keras keywords (with Keras' defaults) that knows its own
output shape, parameter counts (as Keras counts them), multiply-adds and how to build itself as a
``torch.nn.Module``. Shapes are in Keras' order without the batch: ``(H, W, C)`` or ``(F,)``.
Adding a layer type touches this package only: subclass :class:`Layer` and decorate with
:func:`register`.
"""

from capas.layers import core  # noqa: F401  (registers the layer types)
from capas.layers.base import LAYERS, Layer, Shape, register

__all__ = ["LAYERS", "Layer", "Shape", "register"]
