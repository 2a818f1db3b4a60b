"""What capas' CPU dropout mask and its ReLU after max pooling buy `fit` on Keras' own recipe,
side by side in one process.

Keras' mnist_cnn network (examples/keras-mnist.yaml: Conv2D(relu) – Conv2D(relu) – MaxPooling2D –
Dropout – Flatten – Dense(relu) – Dropout – Dense) with Keras' recipe (float32, Adadelta at 1.0,
batch 128) on Fashion-MNIST, four ways, repeats interleaved: as capas builds and trains it now;
with nn.Dropout's own mask (PyTorch's CPU `bernoulli_`) put back; with the ReLU before the pooling
(the layer order as written); with neither (as capas trained it before). Each fit trains 2 epochs
from a fresh model; the table shows the second epoch's images/s, median over the repeats.
benchmarks/fast_recipes.py --capas-keras-recipe sets the result beside Keras' own epochs.

    python benchmarks/keras_recipe_step.py [--batches 60] [--repeats 3]
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from unittest import mock

from cpu_memory import compare  # this script's folder is on sys.path
from torch import nn

from capas.models import CapasNet
from capas.models.modules import _Dropout

EXAMPLES = Path(__file__).parent.parent / "examples"
KERAS_RECIPE = {"batch_size": 128, "optimizer": {"name": "adadelta", "lr": 1.0}}
NETWORKS = {
    "Keras' mnist_cnn, float32, batch 128": (EXAMPLES / "keras-mnist.yaml", KERAS_RECIPE, "fashion-mnist")
}
WAYS = (
    "capas (uniform mask, ReLU after pooling)",
    "bernoulli_ mask",
    "ReLU before pooling",
    "neither (before)",
)


def patches(way: str) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    if way in (WAYS[1], WAYS[3]):
        stack.enter_context(mock.patch.object(_Dropout, "forward", nn.Dropout.forward))
    if way in (WAYS[2], WAYS[3]):
        stack.enter_context(mock.patch.object(CapasNet, "relu_after_pooling", contextlib.nullcontext))
    return stack


if __name__ == "__main__":
    compare(NETWORKS, WAYS, patches, "dropout mask, ReLU", __doc__.splitlines()[0])
