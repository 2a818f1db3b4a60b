"""The base class of every layer type, the registry, and Keras' activation names (no torch here)."""

from __future__ import annotations

import math
from typing import Annotated, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

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
    if not isinstance(value, list | tuple):  # pydantic's own message would ask for "a valid tuple"
        raise ValueError("Input should be a whole number or [height, width]")
    return value


def _not_bool(kind: str):
    """pydantic takes true and false for the numbers 1 and 0: `units: true` was a one-unit Dense,
    `momentum: yes` (YAML's true) a BatchNormalization whose statistics never moved."""

    def check(value: object) -> object:
        if isinstance(value, bool):
            raise ValueError(f"Input should be {kind}, not true or false")
        return value

    return BeforeValidator(check)


Count = Annotated[int, _not_bool("a whole number")]
"""A whole number that a boolean is not (for counts, sizes and seeds in layers and configs)."""

Real = Annotated[float, _not_bool("a number")]
"""A number that a boolean is not (for rates, factors and sizes in layers and configs)."""

Side = Annotated[Count, Field(ge=1, le=2**31 - 1)]
"""One side of a kernel, pool or stride: PyTorch's pooling takes C ints (`strides: 1e30` passed the
summary, its output being 1×1, and was PyTorch's overflow traceback in training)."""

Pair = Annotated[tuple[Side, Side], BeforeValidator(_pair)]

FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite float32 (numpy.finfo(numpy.float32).max; layers stay numpy-free)."""

ACTIVATIONS = (
    "linear",
    "relu",
    "relu6",
    "sigmoid",
    "hard_sigmoid",
    "tanh",
    "softmax",
    "elu",
    "selu",
    "gelu",
    "silu",
    "swish",
    "softplus",
    "softsign",
    "mish",
    "leaky_relu",
)
"""Keras' activation names that capas builds (capas.models.modules maps each to a module)."""


def check_activation(value: str | None) -> str | None:
    if value is not None and value not in ACTIVATIONS:
        from capas.errors import closest

        raise ValueError(
            f"unknown activation {value!r}{closest(value, ACTIVATIONS)}; allowed: {', '.join(ACTIVATIONS)}"
        )
    return value


class Layer(BaseModel):
    """A layer as a Keras user writes it: its keywords are the model's fields.

    Everything capas knows about a layer type without building it lives on its class: keywords and
    their validation, output shape, parameter counts and the formula behind them, multiply-adds,
    whether structured pruning can handle it, and an example for the registry test. The PyTorch
    module is built by capas.models.
    """

    # a NaN or infinite keyword (`scale: .nan`, YAML's spelling) trains a model of NaNs
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str | None = None
    """Keras' optional layer name; defaults to the snake-case type name with a counter."""

    trainable: bool = True
    """Keras' `trainable`: False freezes the layer's weights (no gradients, no optimizer state, no
    weight decay) and the summary counts them as non-trainable; a frozen BatchNormalization also
    stays in inference mode, as in Keras."""

    @field_validator("*")
    @classmethod
    def _within_float32(cls, value: object) -> object:
        # the model computes in float32, where a finite `scale: 1e300` is infinite: a model of NaNs
        if isinstance(value, float) and abs(value) > FLOAT32_MAX:
            raise ValueError(f"Input should be a finite float32 number, within ±{FLOAT32_MAX:.4g}")
        return value

    takes: ClassVar[str] = "any"
    """What input the layer accepts: 'maps' (H, W, C), 'flat' (F,) or 'any'."""

    structured_pruning: ClassVar[bool] = False
    """Whether torch-pruning can remove channels through it and rewire it (capas.deploy.prune)."""

    example: ClassVar[tuple[dict, Shape] | None] = None
    """One valid set of keywords and an input shape it accepts (tests build every registered type)."""

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__

    def output_shape(self, shape: Shape) -> Shape:
        """The output shape for an input shape, both without the batch."""
        return shape

    def params(self, shape: Shape) -> tuple[int, int]:
        """(trainable, non-trainable) parameter counts, as Keras counts them."""
        return 0, 0

    def formula(self, shape: Shape) -> str:
        """The parameter count with the formula that gives it, as the seed articles explain them."""
        return f"{sum(self.params(shape)):,}"

    def macs(self, shape: Shape) -> int:
        """Multiply-adds of one forward pass for one image."""
        return 0

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
