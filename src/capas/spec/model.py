"""The model spec: what a user writes, in Keras' vocabulary, validated with messages that say what to fix."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from capas.errors import CapasError, closest
from capas.layers import LAYERS, Layer, Shape
from capas.spec.backbone import BackboneConfig
from capas.spec.io import describe_validation, parse_config

# The public attributes of torch's nn.ModuleDict, which keeps the built layers by name: a layer
# named like one of them cannot be added to it (nor one named like its private attributes, which all
# start with '_'). Listed here because the spec stays torch-free; tests/test_spec.py checks the list
# against the installed torch.
MODULE_ATTRIBUTES = frozenset(
    [
        "T_destination",
        "add_module",
        "apply",
        "bfloat16",
        "buffers",
        "call_super_init",
        "children",
        "clear",
        "compile",
        "cpu",
        "cuda",
        "double",
        "dump_patches",
        "eval",
        "extra_repr",
        "float",
        "forward",
        "get_buffer",
        "get_extra_state",
        "get_parameter",
        "get_submodule",
        "half",
        "ipu",
        "items",
        "keys",
        "load_state_dict",
        "modules",
        "mtia",
        "named_buffers",
        "named_children",
        "named_modules",
        "named_parameters",
        "parameters",
        "pop",
        "register_backward_hook",
        "register_buffer",
        "register_forward_hook",
        "register_forward_pre_hook",
        "register_full_backward_hook",
        "register_full_backward_pre_hook",
        "register_load_state_dict_post_hook",
        "register_load_state_dict_pre_hook",
        "register_module",
        "register_parameter",
        "register_state_dict_post_hook",
        "register_state_dict_pre_hook",
        "requires_grad_",
        "set_extra_state",
        "set_submodule",
        "share_memory",
        "state_dict",
        "to",
        "to_empty",
        "train",
        "training",
        "type",
        "update",
        "values",
        "xpu",
        "zero_grad",
    ]
)


MAX_VALUES = 2**40
"""The most values an input image, a layer's output or a layer's weights may hold: 4 TiB in float32,
beyond any machine's memory, and far below PyTorch's limit (a tensor of 2**63 bytes, beyond which
`units: 1e30` was its "Overflow when unpacking long long" traceback)."""


def _snake(name: str) -> str:
    """Keras' automatic layer names: Conv2D -> conv2d, GlobalAveragePooling2D -> global_average_pooling2d."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def parse_layer(index: int, item: Any) -> Layer:
    """One item of `layers:` (a bare name or `{Name: {keyword: value}}`) as a typed layer."""
    if isinstance(item, str):
        type_name, keywords = item, {}
    elif isinstance(item, dict) and len(item) == 1:
        type_name, keywords = next(iter(item.items()))
        keywords = {} if keywords is None else keywords
    else:
        raise CapasError(
            f"layer {index}: expected a layer name (e.g. '- Flatten') or a one-key mapping "
            f"(e.g. '- Dense: {{units: 10}}'), got {item!r}"
        )
    if type_name not in LAYERS:
        raise CapasError(
            f"layer {index}: unknown layer type {type_name!r}{closest(str(type_name), LAYERS)}; "
            f"allowed: {', '.join(sorted(LAYERS))}"
        )
    cls = LAYERS[type_name]
    if not isinstance(keywords, dict):
        raise CapasError(f"layer {index} ({type_name}): keywords must be a mapping, got {keywords!r}")
    for keyword in keywords:
        if keyword not in cls.model_fields:
            raise CapasError(
                f"layer {index} ({type_name}): unknown keyword {keyword!r}{closest(str(keyword), cls.model_fields)}; "
                f"allowed: {', '.join(cls.model_fields)}"
            )
    try:
        return cls(**keywords)
    except ValidationError as error:
        raise CapasError(f"layer {index} ({type_name}): {describe_validation(error)}") from None


@dataclass(frozen=True)
class LayerInfo:
    """One row of the summary: a layer with its name, shapes, parameter counts and cost."""

    index: int
    name: str
    layer: Layer
    input_shape: Shape
    output_shape: Shape
    trainable: int
    non_trainable: int
    macs: int
    frozen: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """A sequential network as Keras users write it."""

    name: str
    input_shape: Shape
    layers: tuple[Layer, ...]
    backbone: BackboneConfig | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, source: str = "spec", saved: bool = False) -> ModelSpec:
        """Validate a loaded YAML/JSON document; every problem is a CapasError naming what to fix.
        `saved`: a run directory's model.json, whose backbone weights file need not exist any more."""
        if not isinstance(data, dict):
            raise CapasError(
                f"{source}: expected a mapping with name, input_shape and layers, got {type(data).__name__}"
            )
        allowed = {"name", "input_shape", "layers", "backbone"}
        for key in data:
            if key not in allowed:
                hint = " (a training config, with train: and data:, goes to --config)" * (
                    key in ("train", "data")
                )
                raise CapasError(
                    f"{source}: unknown key {key!r}{closest(str(key), allowed)}; allowed: "
                    f"{', '.join(sorted(allowed))}{hint}"
                )
        name = data.get("name", "model")
        if not isinstance(name, str) or not name:
            raise CapasError(f"{source}: 'name' must be a non-empty string, got {name!r}")
        # `capas train` writes the run into runs/<name> unless told otherwise: '.', '..' or a separator
        # ('/', or Windows' '\') put it beside or outside runs/; control characters make a folder
        # name that shells mangle
        if name in (".", "..") or any(c in "/\\" or not c.isprintable() for c in name):
            raise CapasError(
                f"{source}: 'name' is the run folder runs/<name>, so it must be one folder name: "
                f"not '.' or '..', without '/', '\\' or control characters (got {name!r})"
            )
        if "input_shape" not in data:
            raise CapasError(
                f"{source}: 'input_shape' is missing; write it as Keras does, [height, width, channels], e.g. [28, 28, 1]"
            )
        shape = data["input_shape"]
        if (
            not isinstance(shape, list | tuple)
            or len(shape) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)
        ):
            raise CapasError(
                f"{source}: 'input_shape' must be [height, width, channels] with three positive integers "
                f"(channels last, as in Keras), got {shape!r}"
            )
        if math.prod(shape) > MAX_VALUES:
            raise CapasError(
                f"{source}: 'input_shape' {shape} makes images of {math.prod(shape):,} values, more than "
                "any machine holds (at most 2**40)"
            )
        layers = data.get("layers")
        if not isinstance(layers, list) or not layers:
            raise CapasError(f"{source}: 'layers' must be a non-empty list of layers, got {layers!r}")
        spec = cls(
            name=name,
            input_shape=tuple(shape),
            layers=tuple(parse_layer(i, item) for i, item in enumerate(layers)),
            backbone=None
            if data.get("backbone") is None
            else parse_config(BackboneConfig, data["backbone"], f"{source}: backbone", {"saved": saved}),
        )
        spec.layer_infos()  # shape inference: collapsing shapes and misplaced layers fail here
        return spec

    def to_dict(self) -> dict:
        """The spec as a user would write it (the content of model.json)."""
        out: dict = {"name": self.name, "input_shape": list(self.input_shape)}
        if self.backbone is not None:
            out["backbone"] = self.backbone.model_dump(mode="json")
        out["layers"] = [
            {layer.type_name(): layer.keywords()} if layer.keywords() else layer.type_name()
            for layer in self.layers
        ]
        return out

    def layer_infos(self) -> list[LayerInfo]:
        """Shape inference through the layers, with Keras' names, parameters and multiply-adds.

        With a backbone, its layers come first (numbered from 0, frozen as `backbone.frozen` says)
        and the spec's layers continue from its output feature maps.
        """
        infos, counts, shape = [], {}, self.input_shape
        if self.backbone is not None:
            from capas.models.backbones import describe, frozen_count  # torch-heavy, only for backbones

            rows, _ = describe(self.backbone, self.input_shape)
            frozen = frozen_count(self.backbone, len(rows))
            for i, row in enumerate(rows):
                infos.append(
                    LayerInfo(
                        i,
                        row.name,
                        row.layer,
                        row.input_shape,
                        row.output_shape,
                        row.trainable,
                        row.non_trainable,
                        row.macs,
                        frozen=i < frozen,
                    )
                )
            shape = rows[-1].output_shape
        offset = len(infos)  # error messages keep the index within `layers:`, the summary numbers all rows
        taken = {info.name for info in infos}
        for index, layer in enumerate(self.layers):
            type_name = layer.type_name()
            where = f"layer {index} ({type_name})"
            if layer.takes == "maps" and len(shape) != 3:
                raise CapasError(
                    f"{where}: needs feature maps (height, width, channels) but gets a flat vector of shape {shape}; "
                    "move it before Flatten/global pooling"
                )
            if layer.takes == "flat" and len(shape) != 1:
                raise CapasError(
                    f"{where}: needs a flat vector but gets feature maps of shape {shape}; "
                    "add Flatten, GlobalAveragePooling2D or GlobalMaxPooling2D before it"
                )
            if getattr(layer, "kernel_initializer", None) == "whitening" and (index or self.backbone):
                raise CapasError(
                    f"{where}: kernel_initializer 'whitening' whitens the input images' patches, so it "
                    "applies to the first layer only (and not after a backbone); use 'dirac' or "
                    "'glorot_uniform' here"
                )
            try:
                out = layer.output_shape(shape)
            except ValueError as error:
                raise CapasError(f"{where}: {error}") from None
            name = layer.name
            if not name:  # Keras numbers the layers it names itself: a named layer takes no number
                base = _snake(type_name)
                seen = counts.get(base, 0)
                name = base if seen == 0 else f"{base}_{seen}"
                # nor one of the backbone's rows (an earlier run's layers are named as Keras names them)
                while name in taken:
                    seen += 1
                    name = f"{base}_{seen}"
                counts[base] = seen + 1
            trainable, non_trainable = layer.params(shape)
            for what, count in (("output values", math.prod(out)), ("parameters", trainable + non_trainable)):
                if count > MAX_VALUES:
                    raise CapasError(
                        f"{where}: {count:,} {what}, more than any machine holds (at most 2**40); "
                        "lower its size"
                    )
            infos.append(
                LayerInfo(
                    offset + index,
                    name,
                    layer,
                    shape,
                    out,
                    trainable,
                    non_trainable,
                    layer.macs(shape),
                    frozen=not layer.trainable,
                )
            )
            shape = out
        names = [info.name for info in infos]
        for info in infos[offset:]:  # the backbone's rows are named by the library or an earlier run
            # a name keys the layer's module and weights ('.' separates module paths) and names
            # the layer in an exported Keras file (which refuses '/')
            if bad := sorted(set(info.name) & set("./")):
                raise CapasError(
                    f"layer {info.index - offset} ({info.layer.type_name()}): the name {info.name!r} "
                    f"contains {' and '.join(map(repr, bad))}; layer names may not contain '.' or '/'"
                )
            if info.name.startswith("_") or info.name in MODULE_ATTRIBUTES:
                raise CapasError(
                    f"layer {info.index - offset} ({info.layer.type_name()}): the name {info.name!r} is reserved: "
                    "PyTorch's nn.ModuleDict, which holds the layers by name, has attributes such as "
                    "'training', 'forward' and 'keys'; layer names may not start with '_' nor name one of "
                    "its attributes, choose another"
                )
            if names.count(info.name) > 1:
                automatic = any(not i.layer.name for i in infos[offset:] if i.name == info.name)
                raise CapasError(
                    f"layer {info.index - offset} ({info.layer.type_name()}): the name {info.name!r} is used twice; "
                    "layer names must be unique"
                    + ", and a layer without a name gets Keras' (conv2d, conv2d_1, ... for Conv2D)"
                    * automatic
                    + (f"; it is the backbone's layer {names.index(info.name)}" if info.name in taken else "")
                )
        return infos

    def own_layer_infos(self) -> list[LayerInfo]:
        """The rows of the spec's own `layers:`, without the backbone's."""
        return self.layer_infos()[-len(self.layers) :]

    @property
    def output_shape(self) -> Shape:
        return self.layer_infos()[-1].output_shape
