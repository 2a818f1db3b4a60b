"""Keras models in and out of capas, read and written with h5py alone (no TensorFlow, no Keras).

In: a Keras 3 `.keras` file, a `model.json` with its weights (`*.weights.h5`, or a legacy weights `.h5`),
or a legacy full-model `.h5`, becomes a capas run directory: the spec from the Keras config, the weights
converted to PyTorch's layouts, preprocess.json from the user's options. Out: a run's spec and weights
become a `.keras` file that Keras 3 loads.

Layouts: a Conv2D kernel is (H, W, in, out) in Keras and (out, in, H, W) in PyTorch; a Dense kernel is
(in, out) in Keras and (out, in) in PyTorch. capas' Flatten already flattens in Keras' H·W·C order, so
the Dense after a Flatten takes its kernel transposed and nothing more. BatchNormalization's gamma, beta,
moving mean and moving variance are PyTorch's weight, bias, running_mean and running_var.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capas import atomic
from capas.data import Preprocess, splits_for
from capas.data.dataset import control_character
from capas.errors import CapasError
from capas.models import CapasNet, build_model
from capas.models.build import passes_through
from capas.runs import (
    check_not_in_another_run,
    check_not_in_images,
    load_run,
    reading,
    recover,
    staging,
    write_run,
)
from capas.spec import DataConfig, ModelSpec, parse_layer

SCALES = {"0..1": (0.0, 1.0), "0..255": (0.0, 1 / 255), "-1..1": (0.5, 0.5)}
"""--scale: the model's input range for 0..255 pixels, as (mean, std) applied after dividing by 255."""

KERAS_FORMAT_VERSION = "3.0.0"  # the .keras format written: Keras 3's zip of config.json and weights.h5

# Keywords capas has under the same name, per layer type (Keras' defaults are capas' defaults).
KEPT = {
    "Conv2D": ("filters", "kernel_size", "strides", "padding", "activation", "use_bias"),
    "Dense": ("units", "activation", "use_bias"),
    "MaxPooling2D": ("pool_size", "strides", "padding"),
    "AveragePooling2D": ("pool_size", "strides", "padding"),
    "GlobalMaxPooling2D": (),
    "GlobalAveragePooling2D": (),
    "Flatten": (),
    "Dropout": ("rate",),
    "SpatialDropout2D": ("rate",),
    "BatchNormalization": ("momentum", "epsilon", "center", "scale"),
    "LayerNormalization": ("epsilon",),
    "GroupNormalization": ("groups", "epsilon"),
    "Activation": ("activation",),
    "ReLU": ("max_value", "negative_slope"),
    "Softmax": ("axis",),
    "Rescaling": ("scale", "offset"),  # a first one becomes the preprocessing instead (convert)
}
# Keywords capas lacks, accepted at the values that compute what capas computes.
FIXED = {
    "Conv2D": {"data_format": ("channels_last",), "dilation_rate": (1, (1, 1)), "groups": (1,)},
    "MaxPooling2D": {"data_format": ("channels_last",)},
    "AveragePooling2D": {"data_format": ("channels_last",)},
    "GlobalMaxPooling2D": {"data_format": ("channels_last",), "keepdims": (False,)},
    "GlobalAveragePooling2D": {"data_format": ("channels_last",), "keepdims": (False,)},
    "Flatten": {"data_format": ("channels_last",)},
    "Dropout": {"noise_shape": ()},
    "SpatialDropout2D": {"data_format": ("channels_last",)},
    "BatchNormalization": {"renorm": (False,)},
    "LayerNormalization": {"center": (True,), "scale": (True,), "rms_scaling": (False,)},
    "GroupNormalization": {"center": (True,), "scale": (True,)},
    "ReLU": {"threshold": (0, 0.0)},
}
NORMALIZATIONS = ("BatchNormalization", "LayerNormalization", "GroupNormalization")
# Keywords that only matter to Keras' training or bookkeeping (weights come from the file; the input
# shape Keras 2 puts on the first layer is read separately).
IGNORED = {
    "name",
    "seed",
    "synchronized",
    "renorm_momentum",
    "lora_alpha",
    "batch_input_shape",
    "batch_shape",
}
# Kernel layouts: Keras' array -> PyTorch's tensor, for the first weight of these layer types.
TO_TORCH = {"Conv2D": (3, 2, 0, 1), "Dense": (1, 0)}
TO_KERAS = {"Conv2D": (2, 3, 1, 0), "Dense": (1, 0)}
# Layer types whose Keras config has no `trainable`: their __init__ takes no **kwargs, so Keras refuses
# to load a config that has one (they have no weights to freeze).
WITHOUT_TRAINABLE = {"SpatialDropout2D"}


def keras_snake(name: str) -> str:
    """Keras' snake case for class names (its weight files name layer groups with it): ReLU -> re_lu."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _texts(values: Any) -> list[str]:
    return [_text(v) for v in np.atleast_1d(values).tolist()]  # a scalar is a list of one (a damaged file)


@dataclass
class KerasFile:
    """What a Keras file (or pair of files) holds: the model config and the weight arrays.

    `weights` is keyed by Keras 3 group path (`layers/conv2d_1`) when `by_path`, else by layer name
    (the legacy HDF5 layout).
    """

    source: str
    kind: str
    config: dict
    weights: dict[str, list[np.ndarray]]
    by_path: bool
    keras_version: str | None = None


def _h5():
    try:
        import h5py
    except ImportError:
        raise CapasError("reading Keras files needs h5py: pip install 'capas[keras]'") from None
    return h5py


# A file written by someone else is read without trusting it. Keras writes weights as plain HDF5 datasets
# and zip members stored uncompressed. A dataset that reads another file (external storage, a virtual
# dataset, an external link) would copy that file's bytes into the run's weights; one that declares far
# more than it stores (a fill value, gzip of zeros), like a zip member that inflates far beyond its
# stored bytes, is a bomb, and so is one read twice (HDF5 links cost ~100 bytes each: 1 MiB of weights
# under 10,000 names would be read as 10 GiB): all are refused before anything is read. The ratios are
# Keras' own guards' (keras.src.saving.saving_lib), with a floor of 1 MiB instead of 4 GiB.
BOMB_FLOOR_BYTES = 1 << 20
H5_MAX_EXPANSION = 1000
ZIP_MAX_EXPANSION = 100


def _array(file, dataset, where: str, seen: dict) -> np.ndarray:
    """An HDF5 dataset of `file` (`where` in it) as an array, refused (ValueError) unless `file` holds all
    its data and it is none of the datasets `seen` (by HDF5 object -> where) before."""
    if not hasattr(dataset, "dtype"):
        raise ValueError(f"{where} is a group, not a weight array")
    if dataset.dtype.kind not in "biuf":
        raise ValueError(f"{where} holds {dataset.dtype}, not real numbers")
    if dataset.id in seen:
        raise ValueError(f"{where} is {seen[dataset.id]} again (a second link to the same weights)")
    seen[dataset.id] = where
    if dataset.file != file or dataset.external or dataset.is_virtual:
        raise ValueError(f"{where} reads its data from another file")
    declared, stored = dataset.size * dataset.dtype.itemsize, dataset.id.get_storage_size()
    if declared > max(BOMB_FLOOR_BYTES, H5_MAX_EXPANSION * stored):
        raise ValueError(f"{where} declares {declared:,} bytes (shape {dataset.shape}) but stores {stored:,}")
    return np.asarray(dataset)


def _member(archive: zipfile.ZipFile, name: str) -> bytes:
    """An archive member's bytes, refused (ValueError) if it inflates far beyond what it stores."""
    info = archive.getinfo(name)
    if info.file_size > max(BOMB_FLOOR_BYTES, ZIP_MAX_EXPANSION * info.compress_size):
        raise ValueError(f"{name} inflates to {info.file_size:,} bytes from {info.compress_size:,}")
    with archive.open(info) as member:
        # read(n), not read(): zipfile's read() inflates the whole stream, up to 2 GiB at a time, before
        # it cuts it to the size the header declares, and a header may understate its data
        return member.read(info.file_size)


def _read_v3_weights(file) -> dict[str, list[np.ndarray]]:
    """Keras 3's weights.h5: `layers/<snake name>/vars/<i>` for each layer of the model."""
    group_type = _h5().Group
    out: dict[str, list[np.ndarray]] = {}
    seen: dict = {}
    layers = file.get("layers")
    if not isinstance(layers, group_type):
        raise KeyError("no 'layers' group")
    for name, group in layers.items():
        if not isinstance(group, group_type):
            raise ValueError(f"layers/{name} is not a layer's group")
        variables = group.get("vars")
        if not isinstance(variables, group_type | None):
            raise ValueError(f"layers/{name}/vars is not a group of weight arrays")
        keys = [] if variables is None else sorted(variables, key=int)
        out[f"layers/{name}"] = [_array(file, variables[k], f"layers/{name}/vars/{k}", seen) for k in keys]
    return out


def _read_legacy_weights(file, root) -> dict[str, list[np.ndarray]]:
    """The legacy HDF5 layout (Keras 2 and Keras 3's .h5) in `root`, a group of `file`: layer groups listed
    in `layer_names`, each with its datasets listed in order in `weight_names`."""
    seen: dict = {}
    return {
        name: [
            _array(file, root[name][w], f"{name}/{w}", seen) for w in _texts(root[name].attrs["weight_names"])
        ]
        for name in _texts(root.attrs["layer_names"])
    }


def _weights_file(path: Path) -> tuple[dict[str, list[np.ndarray]], bool]:
    h5py = _h5()
    with h5py.File(path, "r") as file:
        if "layers" in file:
            return _read_v3_weights(file), True
        root = file.get("model_weights", file)
        if "layer_names" not in root.attrs:
            raise KeyError("neither Keras 3's 'layers' group nor the legacy 'layer_names'")
        return _read_legacy_weights(file, root), False


def read_keras(path: str | Path, weights: str | Path | None = None) -> KerasFile:
    """Read a `.keras` file, a legacy full-model `.h5`, or a `.json` architecture with `weights`.

    A missing, corrupt or truncated file, or one of another kind, is a CapasError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise CapasError(f"{path}: no such file")
    if weights is not None and path.suffix != ".json":
        raise CapasError(f"--weights: {path} holds its own weights; --weights goes with a model.json")
    h5py = _h5()
    try:
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                config = json.loads(_member(archive, "config.json"))
                metadata = json.loads(_member(archive, "metadata.json"))
                if not isinstance(metadata, dict):
                    raise ValueError(f"metadata.json holds a {type(metadata).__name__}, not a JSON object")
                with h5py.File(io.BytesIO(_member(archive, "model.weights.h5")), "r") as file:
                    arrays = _read_v3_weights(file)
            return KerasFile(str(path), ".keras", config, arrays, True, metadata.get("keras_version"))
        if path.suffix == ".json":
            if weights is None:
                raise CapasError(
                    f"{path}: an architecture without weights; give its weights file: --weights model.weights.h5"
                )
            weights = Path(weights)
            if not weights.is_file():
                raise CapasError(f"--weights: {weights}: no such file")
            config = json.loads(path.read_text(encoding="utf-8"))
            try:
                arrays, by_path = _weights_file(weights)
            except (OSError, KeyError, ValueError) as error:
                raise CapasError(f"{weights}: not a readable Keras weights file ({error})") from None
            version = config.get("keras_version") if isinstance(config, dict) else None  # Keras 2 writes it
            return KerasFile(f"{path} + {weights}", "json + weights", config, arrays, by_path, version)
        if path.suffix in (".h5", ".hdf5"):
            with h5py.File(path, "r") as file:
                if "model_config" not in file.attrs:
                    raise CapasError(
                        f"{path}: a weights-only HDF5 file (no model_config); give the architecture too: "
                        f"capas import-keras model.json --weights {path.name}"
                    )
                config = json.loads(_text(file.attrs["model_config"]))
                version = _text(file.attrs["keras_version"]) if "keras_version" in file.attrs else None
                arrays = _read_legacy_weights(file, file["model_weights"])
            return KerasFile(str(path), "legacy .h5", config, arrays, False, version)
    # RuntimeError: zipfile's for an encrypted member, and RecursionError (JSON nested thousands deep) is one;
    # NotImplementedError: zipfile's for an unknown compression method
    except (OSError, KeyError, ValueError, RuntimeError, NotImplementedError, zipfile.BadZipFile) as error:
        raise CapasError(f"{path}: not a readable Keras file ({error})") from None
    raise CapasError(
        f"{path}: unknown kind of file {path.suffix!r}; allowed: a .keras file, a legacy full-model .h5, "
        "or a model.json with --weights"
    )


# ---------------------------------------------------------------------------------------------------------
# The Keras config -> a capas spec


MAX_DEPTH = 100  # levels of lists and mappings in a model config


def _nested_deeper(value: Any, limit: int) -> bool:
    """Whether lists and mappings nest more than `limit` levels deep in `value` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _histories(node: Any) -> list[str]:
    """The names of the layers a functional layer's inbound node reads (Keras 3 and Keras 2 forms)."""
    if isinstance(node, dict):
        if "keras_history" in node:
            return [node["keras_history"][0]]
        return [name for value in node.values() for name in _histories(value)]
    if isinstance(node, list):
        if len(node) >= 3 and isinstance(node[0], str) and isinstance(node[1], int):  # Keras 2
            return [node[0]]
        return [name for value in node for name in _histories(value)]
    return []


def _training_call(node: Any) -> bool:
    """Whether a functional layer's inbound node calls it with training=True (Keras 3: the node's kwargs;
    Keras 2: each input's fourth item)."""
    if isinstance(node, dict):
        return (node.get("kwargs") or {}).get("training") is True
    if isinstance(node, list):
        return any(
            isinstance(i, list) and len(i) >= 4 and isinstance(i[3], dict) and i[3].get("training") is True
            for i in node
        )
    return False


def _chain(config: dict, source: str) -> list[dict]:
    """The layers of a functional model in order, when they form a single chain; branches are refused."""
    layers = config.get("layers") or []
    by_name = {layer["config"]["name"]: layer for layer in layers}
    feeds: dict[str, list[str]] = {name: [] for name in by_name}
    for layer in layers:
        name = layer["config"]["name"]
        nodes = layer.get("inbound_nodes") or []
        inputs = [i for node in nodes for i in _histories(node)]
        if len(nodes) > 1 or len(inputs) > 1:
            raise CapasError(
                f"{source}: a functional model with branches: layer {name!r} ({layer['class_name']}) takes "
                f"{len(inputs)} inputs ({', '.join(map(repr, inputs))}); capas imports Sequential models and "
                "functional models that are one chain of layers"
            )
        if any(_training_call(node) for node in nodes):
            raise CapasError(
                f"{source}: layer {name!r} ({layer['class_name']}) is called with training=True, so Keras computes "
                "it as in training when predicting too (Monte Carlo dropout, batch statistics); capas predicts "
                "in inference mode"
            )
        for i in inputs:
            feeds.setdefault(i, []).append(name)
    for name, consumers in feeds.items():
        if len(consumers) > 1:
            raise CapasError(
                f"{source}: a functional model with branches: layer {name!r} feeds {len(consumers)} layers "
                f"({', '.join(map(repr, consumers))}); capas imports Sequential models and functional models "
                "that are one chain of layers"
            )
    starts = [layer for layer in layers if layer["class_name"] == "InputLayer"]
    if len(starts) != 1:
        raise CapasError(
            f"{source}: a functional model with {len(starts)} inputs; capas models take one image"
        )
    chain, current = [starts[0]], starts[0]["config"]["name"]
    while feeds.get(current):
        current = feeds[current][0]
        chain.append(by_name[current])
    if len(chain) != len(layers):
        unused = sorted(set(by_name) - {layer["config"]["name"] for layer in chain})
        raise CapasError(
            f"{source}: a functional model whose layers {', '.join(map(repr, unused))} are not on the chain from "
            "its input; capas imports one chain of layers"
        )
    return chain


def _check_layers(layers: list, source: str) -> list[dict]:
    """`layers`, each checked to be what Keras writes: a mapping with a class_name and a config
    mapping that has the layer's name (a hand-edited or damaged file is one message, not a KeyError)."""
    for index, layer in enumerate(layers):
        named = isinstance(layer, dict) and isinstance(layer.get("class_name"), str)
        config = layer.get("config") if named else None
        if not (isinstance(config, dict) and isinstance(config.get("name"), str)):
            raise CapasError(
                f"{source}: not a Keras model config (its layer {index} is {json.dumps(layer)[:80]}, not a mapping "
                "with a class_name and a config with a name)"
            )
    return layers


def _model_layers(document: Any, source: str) -> list[dict]:
    """The model's layers in order, the InputLayer first when the config has one."""
    if not isinstance(document, dict) or "class_name" not in document:
        raise CapasError(f"{source}: not a Keras model config (no class_name)")
    kind, config = document["class_name"], document.get("config")
    if kind == "Sequential":
        layers = (
            config if isinstance(config, list) else config.get("layers") if isinstance(config, dict) else None
        )
        if not isinstance(layers, list) or not layers:
            raise CapasError(f"{source}: a Sequential model without layers")
        return _check_layers(layers, source)
    if kind in ("Functional", "Model"):
        if not isinstance(config, dict) or not isinstance(config.get("layers"), list):
            raise CapasError(f"{source}: not a Keras model config (a {kind} model without a list of layers)")
        _check_layers(config["layers"], source)
        return _chain(config, source)
    raise CapasError(
        f"{source}: a {kind!r} model; capas imports Sequential models and functional models that are one chain"
    )


def _input_shape(layers: list[dict], source: str) -> tuple[int, ...]:
    first = layers[0]
    config = first.get("config", {})
    shape = config.get("batch_shape") or config.get("batch_input_shape")
    if shape is None:
        shape = (first.get("build_config") or {}).get("input_shape")
    if shape is None:
        raise CapasError(
            f"{source}: the model records no input shape (build it with keras.Input((H, W, C)) before saving)"
        )
    shape = list(shape)[1:] if isinstance(shape, list | tuple) else [shape]
    if len(shape) != 3 or not all(isinstance(v, int) and v >= 1 for v in shape):
        raise CapasError(
            f"{source}: input shape {shape} is not a fixed (height, width, channels); capas models take "
            "images of one size, channels last"
        )
    return tuple(shape)


def _plain(value: Any) -> Any:
    return tuple(_plain(v) for v in value) if isinstance(value, list | tuple) else value


def _float32(dtype: Any) -> bool:
    if dtype is None:
        return True
    if isinstance(dtype, dict):
        dtype = (dtype.get("config") or {}).get("name")
    return dtype == "float32"


def _where(index: int, layer: dict) -> str:
    """A Keras layer as messages name it: its position, name and class."""
    return f"layer {index} {(layer.get('config') or {}).get('name')!r} ({layer.get('class_name')})"


def _translate(
    index: int, layer: dict, shape: tuple[int, ...] | None
) -> tuple[dict | None, list[str], list[str]]:
    """One Keras layer -> (capas layer item or None, problems, notes about ignored keywords)."""
    kind, config = layer.get("class_name"), dict(layer.get("config") or {})
    name = config.get("name")
    where = _where(index, layer)
    if kind not in KEPT:
        return None, [f"{where}: unsupported layer type; capas imports {', '.join(sorted(KEPT))}"], []
    if layer.get("registered_name") is not None:  # Keras 3 writes None for its own layers
        return (
            None,
            [
                f"{where}: a custom class (registered as {layer['registered_name']!r}), not Keras' own {kind}; "
                "capas imports Keras' built-in layers"
            ],
            [],
        )
    problems, notes, keywords = [], [], {"name": name}
    if kind == "Rescaling" and any(isinstance(config.get(k), list) for k in ("scale", "offset")):
        return (
            None,
            [
                f"{where}: a per-channel scale or offset is imported only on a first Rescaling (it becomes "
                "the run's preprocessing); a later Rescaling takes one number each"
            ],
            [],
        )
    for key, value in config.items():
        if key in IGNORED or key.endswith("_initializer"):
            continue
        if key == "dtype":
            if not _float32(value):
                problems.append(f"{where}: dtype {value!r}; capas imports float32 layers")
        elif key == "trainable":
            if value is not True:
                keywords["trainable"] = bool(value)  # Keras' frozen layer, frozen in capas too
        elif key.endswith(("_regularizer", "_constraint")):
            if value is not None:
                notes.append(f"{where}: {key} ignored (it acts during Keras' training only)")
        elif key == "axis" and (kind in NORMALIZATIONS or kind == "Softmax"):
            # Keras counts the batch: on (H, W, C) maps axis 3 is the last, on (F,) vectors axis 1
            last = (-1, (-1,)) if shape is None else (-1, (-1,), len(shape), (len(shape),))
            if _plain(value) not in last:
                verb = "applies the softmax" if kind == "Softmax" else "normalises"
                problems.append(f"{where}: axis={value!r}; capas {verb} over the last (channel) axis, -1")
        elif key in KEPT[kind]:
            keywords[key] = None if key == "activation" and value == "linear" else value
        elif key in FIXED.get(kind, {}):
            allowed = FIXED[kind][key]
            if value is not None and _plain(value) not in allowed:
                problems.append(
                    f"{where}: {key}={value!r} is not supported; capas computes {key}="
                    f"{' or '.join(repr(a) for a in allowed) or 'None'}"
                )
        elif value is not None:
            problems.append(f"{where}: unsupported keyword {key}={value!r}")
    if kind in ("MaxPooling2D", "AveragePooling2D") and _plain(keywords.get("strides")) in (
        None,
        _plain(keywords.get("pool_size")),
    ):
        keywords.pop("strides", None)  # Keras writes strides = pool_size; capas' default says the same
    if problems:
        return None, problems, notes
    try:
        parse_layer(index, {kind: keywords})
    except CapasError as error:
        return None, [f"{where}: {str(error).split(': ', 1)[-1]}"], notes
    return {kind: keywords}, [], notes


def _rescaling(layer: dict, channels: int, where: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A first Rescaling layer (x * scale + offset on 0..255 pixels) as preprocess mean and std."""
    config = layer.get("config") or {}
    scale, offset = config.get("scale", 1.0), config.get("offset", 0.0)
    scales = list(scale) if isinstance(scale, list) else [scale] * channels
    offsets = list(offset) if isinstance(offset, list) else [offset] * channels
    if len(scales) != channels or len(offsets) != channels or min(scales) <= 0:
        raise CapasError(
            f"{where}: Rescaling(scale={scale!r}, offset={offset!r}) is not a positive per-channel scale "
            f"for {channels} channels"
        )
    std = tuple(1 / (255 * s) for s in scales)  # x*s + o == (x/255 - mean) / std
    return tuple(-o * d for o, d in zip(offsets, std, strict=True)), std


@dataclass
class Imported:
    """A Keras model turned into capas' terms: spec, weights (in a built model), preprocessing, notes."""

    spec: ModelSpec
    model: CapasNet
    rescaling: tuple[tuple[float, ...], tuple[float, ...]] | None
    notes: list[str] = field(default_factory=list)


def convert(keras_file: KerasFile) -> Imported:
    """The capas spec and model of a Keras file; every unsupported layer or keyword is named, with its
    position, in one CapasError, as are weights that do not fit."""
    source = keras_file.source
    if _nested_deeper(keras_file.config, MAX_DEPTH):
        # the functions below recurse through the config: thousands of levels would be a RecursionError
        raise CapasError(
            f"{source}: not a Keras model config (lists and mappings nested more than {MAX_DEPTH} deep; "
            "Keras writes about 10)"
        )
    layers = _model_layers(keras_file.config, source)
    input_shape = _input_shape(layers, source)
    body = [layer for layer in layers if layer.get("class_name") != "InputLayer"]
    if not body:
        raise CapasError(f"{source}: the model has no layers after its input")
    rescaling = None
    start = 0
    if body[0].get("class_name") == "Rescaling":
        rescaling = _rescaling(
            body[0], input_shape[2], f"{source}: layer 0 {body[0]['config'].get('name')!r}"
        )
        start = 1
    items, problems, notes, kept = [], [], [], []
    shape: tuple[int, ...] | None = input_shape
    version = str(keras_file.keras_version)
    for index, layer in enumerate(body[start:], start):
        item, found, noted = _translate(index, layer, shape)
        if version[:2] in ("1.", "2.") and (layer.get("config") or {}).get("activation") == "hard_sigmoid":
            found.append(
                f"layer {index} {layer['config'].get('name')!r} ({layer.get('class_name')}): activation "
                f"'hard_sigmoid' from Keras {version} is clip(0.2·x + 0.5, 0, 1); capas computes Keras 3's "
                "relu6(x + 3) / 6"
            )
        problems += found
        notes += noted
        if item is not None:
            items.append(item)
            kept.append((index, layer))
            try:
                shape = parse_layer(index, item).output_shape(shape) if shape is not None else None
            except (ValueError, CapasError):
                shape = None
    if problems:
        raise CapasError(f"{source}: cannot import:\n  " + "\n  ".join(dict.fromkeys(problems)))
    name = (
        (keras_file.config.get("config") or {}).get("name") if isinstance(keras_file.config, dict) else None
    )
    try:
        spec = ModelSpec.from_dict(
            {"name": name or "keras_model", "input_shape": list(input_shape), "layers": items}, source=source
        )
    except CapasError as error:  # Dense on feature maps (Keras applies it at every position)...
        raise _numbered_as_keras(error, kept, source) from None
    # Checked before the model is built: a few bytes of config can declare terabytes of parameters.
    needed = sum(info.trainable + info.non_trainable for info in spec.layer_infos())
    held = sum(array.size for arrays in keras_file.weights.values() for array in arrays)
    if needed > held:
        raise CapasError(
            f"{source}: the weights do not fit the architecture: its layers have {needed:,} parameters, the "
            f"file holds {held:,} weight values"
        )
    try:
        model = build_model(spec, pretrained=False)
    except CapasError as error:  # Dropout after the softmax...
        raise _numbered_as_keras(error, kept, source) from None
    _load_weights(model, spec, kept, layers, keras_file)
    return Imported(spec, model.eval(), rescaling, notes)


def _numbered_as_keras(error: CapasError, kept: list[tuple[int, dict]], source: str) -> CapasError:
    """A message about the spec's layer N as one about the file's layer kept[N], which a first Rescaling
    (the run's preprocessing, not a layer) or a dropped InputLayer numbers otherwise."""
    number = re.match(r"layer (\d+) \(\w+\): ", str(error))
    if number is None:
        return error
    index, layer = kept[int(number.group(1))]
    return CapasError(f"{source}: cannot import:\n  {_where(index, layer)}: {str(error)[number.end() :]}")


def _keras_paths(layers: list[dict]) -> list[str]:
    """Keras 3's weight-file group of each layer: its class name in snake case, numbered per name."""
    counts: dict[str, int] = {}
    paths = []
    for layer in layers:
        base = keras_snake(layer["class_name"])
        seen = counts.get(base, 0)
        counts[base] = seen + 1
        paths.append(f"layers/{base}" if seen == 0 else f"layers/{base}_{seen}")
    return paths


def _load_weights(
    model: CapasNet, spec: ModelSpec, kept: list[tuple[int, dict]], layers: list[dict], keras_file: KerasFile
) -> None:
    """Convert the file's arrays into `model`; a missing, surplus or mis-shaped array is a CapasError."""
    functional = keras_file.config.get("class_name") != "Sequential"
    ordered = layers if functional else [layer for layer in layers if layer.get("class_name") != "InputLayer"]
    paths = dict(zip((id(layer) for layer in ordered), _keras_paths(ordered), strict=True))
    state = model.state_dict()
    problems, used = [], set()
    for info, (index, layer) in zip(spec.layer_infos(), kept, strict=True):
        kind, name = layer["class_name"], layer["config"]["name"]
        key = paths[id(layer)] if keras_file.by_path else name
        targets = [
            k for k in state if k.startswith(f"layers.{info.name}.") and not k.endswith("num_batches_tracked")
        ]
        arrays = keras_file.weights.get(key, [])
        used.add(key)
        where = f"layer {index} {name!r} ({kind})"
        if len(arrays) != len(targets):
            problems.append(
                f"{where}: the file has {len(arrays)} weight arrays, the layer needs {len(targets)}"
            )
            continue
        for position, (array, target) in enumerate(zip(arrays, targets, strict=True)):
            want = tuple(state[target].shape)
            if position == 0 and kind in TO_TORCH and array.ndim == len(TO_TORCH[kind]):
                array = array.transpose(TO_TORCH[kind])
            if array.shape != want:
                keras_want = (
                    tuple(want[i] for i in TO_KERAS[kind]) if position == 0 and kind in TO_KERAS else want
                )
                problems.append(
                    f"{where}: weight {position} has shape {tuple(arrays[position].shape)}, the architecture needs "
                    f"{keras_want}"
                )
                continue
            state[target] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    surplus = sorted(k for k, v in keras_file.weights.items() if v and k not in used)
    if surplus:
        problems.append(f"weights for layers the architecture does not have: {', '.join(surplus)}")
    if problems:
        raise CapasError(
            f"{keras_file.source}: the weights do not fit the architecture:\n  " + "\n  ".join(problems)
        )
    model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------
# A Keras file -> a run directory


def read_classes(path: str | Path) -> tuple[str, ...]:
    """Class names, one a line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise CapasError(f"--classes: {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte order mark (Windows editors) is no name
    except UnicodeDecodeError:
        raise CapasError(f"--classes: {path}: not UTF-8 text; give the class names one a line") from None
    except OSError as error:
        raise CapasError(f"--classes: {path}: cannot read ({error.strerror or error})") from None
    # read_text reads \r\n and \r as \n; str.splitlines would also split at a form feed and 7 others
    lines = [(number, line.strip()) for number, line in enumerate(text.split("\n"), 1)]
    for number, name in lines:
        if (control := control_character(name)) is not None:
            raise CapasError(
                f"--classes: {path}: line {number}, {name!r}, holds the control character {control!r}"
            )
    names = tuple(name for _, name in lines if name)
    if len(set(names)) != len(names):
        raise CapasError(f"--classes: {path}: class names repeat")
    return names


def import_keras(
    path: str | Path,
    out: str | Path | None = None,
    *,
    weights: str | Path | None = None,
    scale: str | None = None,
    classes: str | Path | None = None,
    data: str | None = None,
    data_dir: str | None = None,
) -> tuple[Path, Imported]:
    """Write the run directory of a Keras model; nothing is written unless everything converts.

    `scale` is the model's input range for 0..255 pixels (SCALES; default 0..1, or what a first
    Rescaling layer says); `classes` a file of class names; `data` a dataset recorded for evaluate,
    compress and studies, whose validation images become serve's drift reference (without it serve
    runs with drift monitoring off).
    """
    if scale is not None and scale not in SCALES:
        raise CapasError(f"--scale: {scale!r} is not one of {', '.join(SCALES)}")
    keras_file = read_keras(path, weights)
    imported = convert(keras_file)
    spec = imported.spec
    out = Path(out) if out is not None else Path("runs") / spec.name
    check_not_in_images(out, data)
    check_not_in_another_run(out)
    recover(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CapasError(f"--out: {out} already exists; choose another run directory or remove it")
    height, width, channels = spec.input_shape
    if channels not in (1, 3):
        raise CapasError(
            f"{keras_file.source}: input has {channels} channels; capas reads 1- or 3-channel images"
        )
    if imported.rescaling is not None and scale is not None:
        raise CapasError(
            f"--scale: {keras_file.source} rescales its own input (first layer Rescaling); leave --scale out"
        )
    if imported.rescaling is not None:
        mean, std = imported.rescaling
        if set(mean) == {0.0} and set(std) == {1.0}:  # Rescaling(1/255): pixels / 255, the default
            mean = std = None
    else:
        m, s = SCALES[scale or "0..1"]
        mean, std = (None, None) if (m, s) == (0.0, 1.0) else ((m,) * channels, (s,) * channels)
    preprocess = Preprocess(size=(height, width), channels=channels, mean=mean, std=std)
    outputs = spec.output_shape
    if len(outputs) != 1:
        raise CapasError(
            f"{keras_file.source}: the output has shape {outputs}; capas classifiers output one vector"
        )
    # the last layer that computes: Dropout (SpatialDropout2D too) and a linear Activation pass their
    # input through when predicting
    infos = spec.layer_infos()
    last = next((info for info in reversed(infos) if not passes_through(info.layer)), infos[-1])
    if getattr(last.layer, "activation", None) in ("sigmoid", "hard_sigmoid"):
        # capas reads outputs as class scores through a softmax: sigmoid probabilities would be
        # reported as the softmax of them, a single one as class 0 at 100%
        raise CapasError(
            f"{keras_file.source}: its last layer {last.name!r} ({last.layer.type_name()}) ends in a sigmoid: "
            "independent probabilities (a binary or multi-label classifier); capas classifiers end in a "
            "softmax over the classes, or in their logits"
        )
    if outputs[0] < 2:
        raise CapasError(
            f"{keras_file.source}: the model outputs {outputs[0]} value; capas classifiers output one score per "
            "class, at least 2"
        )
    data_cfg = DataConfig(name=data, data_dir=data_dir) if data is not None else None
    splits = splits_for(data_cfg) if data_cfg is not None else None
    if classes is not None:
        names = read_classes(classes)
    elif splits is not None:
        names = splits.test.classes
    else:
        names = tuple(str(i) for i in range(outputs[0]))
    if len(names) != outputs[0]:
        given = f"--classes {classes}" if classes is not None else f"--data {data}"
        raise CapasError(f"{given}: {len(names)} classes, but the model outputs {outputs[0]} values")
    config: dict = {
        "source": {
            "keras": keras_file.source,
            "format": keras_file.kind,
            "keras_version": keras_file.keras_version,
        }
    }
    if data_cfg is not None:
        config["data"] = data_cfg.model_dump(mode="json")
    with staging(out, replace=False) as tmp:  # the whole directory appears at once
        write_run(
            tmp,
            spec=spec,
            model=imported.model,
            preprocess=preprocess,
            classes=tuple(names),
            config=config,
            history=[],
            test=None,
            reference=splits.val if splits is not None else None,
        )
    return out, imported


# ---------------------------------------------------------------------------------------------------------
# A run directory -> a .keras file


def _keras_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _free_name(spec: ModelSpec, base: str) -> str:
    """`base`, or `base_1`, `base_2`, ...: a name no spec layer has, for a layer the export adds (the
    InputLayer, the preprocessing's Rescaling); Keras refuses two layers of one name."""
    taken = {info.name for info in spec.layer_infos()}
    name, count = base, 0
    while name in taken:
        count += 1
        name = f"{base}_{count}"
    return name


def _input_rescaling(spec: ModelSpec, preprocess: Preprocess | None) -> dict:
    """The preprocessing after resizing as a Keras Rescaling of 0..255 pixels: (x/255 − mean)/std is
    x·scale + offset with scale = 1/(255·std), offset = −mean/std; per channel where they differ.
    Without `preprocess`, or one without mean and std: pixels / 255."""
    channels = spec.input_shape[-1]
    mean = (preprocess and preprocess.mean) or (0.0,) * channels
    std = (preprocess and preprocess.std) or (1.0,) * channels
    scale = [1 / (255 * s) for s in std]
    offset = [-m / s for m, s in zip(mean, std, strict=True)]
    return {
        "module": "keras.layers",
        "class_name": "Rescaling",
        "config": {
            "name": _free_name(spec, "preprocessing"),
            "trainable": True,
            "dtype": "float32",
            "scale": scale[0] if len(set(scale)) == 1 else scale,
            "offset": offset[0] if len(set(offset)) == 1 else offset,
        },
        "registered_name": None,
        "build_config": {"input_shape": [None, *spec.input_shape]},
    }


def keras_config(spec: ModelSpec, preprocess: Preprocess | None = None) -> dict:
    """The Keras 3 config of a spec: a Sequential model with an InputLayer, a Rescaling that does what
    `preprocess` does to 0..255 pixels, and the spec's layers."""
    layers = [
        {
            "module": "keras.layers",
            "class_name": "InputLayer",
            "config": {
                "batch_shape": [None, *spec.input_shape],
                "dtype": "float32",
                "name": _free_name(spec, "input_layer"),
            },
            "registered_name": None,
        },
        _input_rescaling(spec, preprocess),
    ]
    for info in spec.layer_infos():
        # every keyword, defaults included: some of capas' defaults are required arguments in Keras
        # kernel_initializer too is left out: the trained weights come with the file, and capas'
        # data-dependent starts ('whitening', 'dirac') are no Keras initializer names
        kind = info.layer.type_name()
        left_out = {"name", "kernel_initializer"} | ({"trainable"} if kind in WITHOUT_TRAINABLE else set())
        keywords = {
            k: _keras_value(v) for k, v in info.layer.model_dump(mode="json", exclude=left_out).items()
        }
        layers.append(
            {
                "module": "keras.layers",
                "class_name": kind,
                "config": {"name": info.name, "dtype": "float32", **keywords},
                "registered_name": None,
                "build_config": {"input_shape": [None, *info.input_shape]},
            }
        )
    return {
        "module": "keras",
        "class_name": "Sequential",
        "config": {"name": spec.name, "trainable": True, "dtype": "float32", "layers": layers},
        "registered_name": None,
        "build_config": {"input_shape": [None, *spec.input_shape]},
    }


def keras_weights(model: CapasNet) -> dict[str, list[np.ndarray]]:
    """Each layer's weights in Keras' layouts and order, keyed by Keras 3's weight-file group, the
    preprocessing's Rescaling (no weights) first."""
    state = model.state_dict()
    infos = model.spec.layer_infos()
    first, *paths = _keras_paths(
        [{"class_name": "Rescaling"}, *({"class_name": i.layer.type_name()} for i in infos)]
    )
    out: dict[str, list[np.ndarray]] = {first: []}
    for info, path in zip(infos, paths, strict=True):
        kind = info.layer.type_name()
        arrays = [
            v.detach().cpu().float().numpy()
            for k, v in state.items()
            if k.startswith(f"layers.{info.name}.") and not k.endswith("num_batches_tracked")
        ]
        if arrays and kind in TO_KERAS:
            arrays[0] = arrays[0].transpose(TO_KERAS[kind])
        out[path] = [np.ascontiguousarray(a) for a in arrays]
    return out


def write_keras(model: CapasNet, path: str | Path, preprocess: Preprocess | None = None) -> Path:
    """Write `model` as a Keras 3 `.keras` file (config.json, metadata.json, model.weights.h5); atomic.

    The Keras model takes 0..255 pixels (resized, channels last): its first layer, a Rescaling, does
    what `preprocess` does after resizing (default: pixels / 255). import-keras reads that Rescaling
    back as the run's preprocessing, so the round trip computes the same outputs.
    """
    h5py = _h5()
    spec = model.spec
    names = [_free_name(spec, "preprocessing"), *(info.name for info in spec.layer_infos())]
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as file:
        file.create_group("layers")
        for (group, arrays), name in zip(keras_weights(model).items(), names, strict=True):
            variables = file.create_group(f"{group}/vars")
            variables.attrs["name"] = name
            for i, array in enumerate(arrays):
                variables.create_dataset(str(i), data=array)
        file.create_group("vars").attrs["name"] = spec.name
    metadata = {
        "keras_version": KERAS_FORMAT_VERSION,
        "date_saved": datetime.now(UTC).strftime("%Y-%m-%d@%H:%M:%S"),
    }

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w") as archive:
            archive.writestr("metadata.json", json.dumps(metadata))
            archive.writestr("config.json", json.dumps(keras_config(spec, preprocess)))
            archive.writestr("model.weights.h5", buffer.getvalue())

    try:
        return atomic.write_with(path, write)
    except OSError as error:  # a full disk, a folder that refuses the file
        raise CapasError(f"{path}: cannot write it ({error.strerror or error})") from None


def export_keras(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write a run's model as a `.keras` file (default RUN/model.keras).

    The Keras model takes 0..255 pixels resized to the run's input size, channels last; its first
    layer, a Rescaling, scales them as preprocess.json says.
    """
    if out is not None:
        atomic.check_file_target(Path(out), "--out", "model.keras")
        check_not_in_another_run(Path(out), run_dir)
        if Path(out).suffix != ".keras":  # Keras' load_model reads a .h5 as legacy HDF5, refuses others
            raise CapasError(
                f"--out {out}: a Keras 3 file must end in .keras (keras.saving.load_model and capas "
                f"import-keras tell its format by the extension), e.g. {Path(out).with_suffix('.keras')}"
            )
    out = Path(out) if out is not None else Path(run_dir) / "model.keras"
    with reading(run_dir):
        run = load_run(run_dir)
        model = run.float_model("export")
        if run.spec.backbone is not None:
            raise CapasError(
                f"{run.path}: the model has a {run.spec.backbone.name} backbone, which has no Keras layers in "
                "capas; only models of capas' own layers export to Keras"
            )
        path = write_keras(model, out, run.preprocess)
    run.warn_exported(path)
    return path
