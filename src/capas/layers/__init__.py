"""The registry of layer types, by the name a Keras user writes; torch-free.

Each layer type is a pydantic model of its Keras keywords (with Keras' defaults) that knows its own
output shape, parameter counts (as Keras counts them) and their formula, multiply-adds, whether
structured pruning handles it, and an example. Shapes are in Keras' order without the batch:
``(H, W, C)`` or ``(F,)``. Adding a layer type: subclass :class:`Layer`, decorate with
:func:`register`, and give it a PyTorch module in capas.models.modules.
"""

from capas.layers import core  # noqa: F401  (registers the layer types)
from capas.layers.base import LAYERS, Layer, Shape, register

__all__ = ["LAYERS", "Layer", "Shape", "register"]
