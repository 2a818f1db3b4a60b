"""The feature cache: when nothing below the top trains, compute the frozen part's output once.

With every backbone layer frozen (and in inference mode), no augmentation and no fine-tuning, each
image's features are the same in every epoch and in every study variant that shares the backbone,
weights, data split and resolution. They are computed once, in eval mode, and kept on disk as
safetensors under `$CAPAS_CACHE/features/` (else `~/.cache/capas/features/`), one file per split,
named by a hash of everything they depend on; training then runs only the top.

The cached part is the backbone plus the top's leading layers without weights or randomness
(Flatten, global pooling): a GlobalAveragePooling2D after EfficientNet-Lite0 makes 1,280 floats
per image instead of 7×7×1,280.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from capas import atomic
from capas.data import ArrayDataset, Preprocess, Splits, iterate_batches
from capas.data.download import cache_root
from capas.inference import Evaluation, autocast, eval_batch_size, evaluate
from capas.models import CapasNet
from capas.models.backbones import imagenet_file
from capas.runs import architecture_digest
from capas.spec import BackboneConfig, DataConfig, TrainConfig
from capas.spec.backbone import RUN
from capas.train.loop import Callback, FitResult, fit

CACHE_FORMAT = 3  # part of the key: bump it when feature computation changes
PASS_THROUGH = {"Flatten", "GlobalAveragePooling2D", "GlobalMaxPooling2D", "MaxPooling2D", "AveragePooling2D"}
"""Top layers without weights or randomness: cached together with the backbone."""


@dataclass(frozen=True)
class Features:
    """Cached features of one split, batched like images by `iterate_batches`."""

    images: torch.Tensor  # (N, ...) float32 features
    labels: torch.Tensor  # (N,) int64
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def applies(model: CapasNet, cfg: TrainConfig) -> bool:
    """Whether training can run on cached features: the whole backbone frozen and in inference mode,
    no augmentation (at training or test time), no fine-tuning schedule, no progressive resizing."""
    spec = model.spec
    return (
        model.backbone is not None
        and model.frozen == len(model.backbone)
        and spec.backbone.bn_frozen
        and cfg.augment.off
        and cfg.tta == "none"
        and cfg.finetune is None
        and cfg.progressive_resizing is None
    )


def _prefix(model: CapasNet) -> int:
    """How many of the top's leading layers the cache covers."""
    count = 0
    for layer in model.spec.layers:
        if layer.type_name() not in PASS_THROUGH:
            break
        count += 1
    return count


def weights_id(cfg: BackboneConfig, seed: int) -> dict:
    """What identifies a backbone's weights: `none` with the seed that drew them, the library's own
    ImageNet weights, or the digest of the file they were read from (a file's size and modification
    time can stay when its contents change: `cp -p`, `rsync -a`). A run's checkpoint records it too."""
    if cfg.weights == "none":
        return {"weights": cfg.weights, "seed": seed}
    if cfg.weights == "imagenet":
        if (path := imagenet_file(cfg.name)) is None:
            return {"weights": cfg.weights}
    else:
        path = Path(cfg.weights) / "model.safetensors" if cfg.name == RUN else Path(cfg.weights)
    with path.open("rb") as file:
        found = {"weights_sha256": hashlib.file_digest(file, "sha256").hexdigest()}
    if cfg.name == RUN:  # a run's layers: their architecture too (another activation, the same weights)
        found["model_json_sha256"] = architecture_digest(cfg.weights)
    return found


def cache_paths(
    model: CapasNet,
    data: DataConfig,
    cfg: TrainConfig,
    split_info: dict,
    preprocess: Preprocess,
    device: torch.device,
    weights: dict,
) -> dict[str, Path]:
    """The cache file of each split: a hash of backbone, `weights` (weights_id's), cached layers,
    precision, PyTorch's version, the kind of device, data, split and resolution."""
    key = {
        "format": CACHE_FORMAT,
        "backbone": model.spec.backbone.model_dump(mode="json", exclude={"frozen"}),
        **weights,
        "layers": model.spec.to_dict()["layers"][: _prefix(model)],
        "preprocess": preprocess.model_dump(mode="json"),
        "precision": cfg.precision,
        # another PyTorch's kernels, or another device's (a GPU's float32 is TF32), compute other digits
        "torch": torch.__version__,
        "device": device.type,
        "data": {"name": data.name, "data_dir": data.data_dir},
        "splits": split_info,
    }
    paths = {}
    for split in ("train", "val", "test"):
        digest = hashlib.sha256(json.dumps({**key, "split": split}, sort_keys=True).encode()).hexdigest()[:24]
        paths[split] = cache_root() / "features" / f"{model.spec.backbone.name}-{split}-{digest}.safetensors"
    return paths


@torch.no_grad()
def compute(
    frozen: nn.Module, data: ArrayDataset, preprocess: Preprocess, device: torch.device, precision: str
) -> torch.Tensor:
    """The frozen part's output for every image, in eval mode: (N, ...) float32 on the CPU."""
    # channels-last: oneDNN's depthwise and 1×1 convolutions run about twice as fast in it on the CPU
    frozen.eval().to(device, memory_format=torch.channels_last)
    batch_size = eval_batch_size(preprocess, device)
    batches = iterate_batches(data, batch_size, preprocess=preprocess, device=device, channels_last=True)
    with autocast(device, precision):
        out = [frozen(x).float().cpu() for x, _ in batches]
    return torch.cat(out)


def cached(
    model: CapasNet,
    data: ArrayDataset,
    path: Path,
    preprocess: Preprocess,
    device: torch.device,
    precision: str,
) -> tuple[Features, str, float]:
    """One split's features from the cache ("hit") or computed and written to it ("written", or "not
    written" with a warning where the cache cannot be written), and the seconds computing them took
    (recorded in the file, so a cache hit still knows its cost)."""
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as file:
                seconds = float((file.metadata() or {})["compute_seconds"])
            tensors = load_file(str(path))
            if torch.equal(tensors["labels"], data.labels.cpu()):
                return Features(tensors["features"], data.labels, data.classes), "hit", seconds
        except (SafetensorError, OSError, KeyError, ValueError):
            pass  # a damaged or foreign file: computed again and replaced below
    layers = list(model.layers.values())[: _prefix(model)]
    started = time.perf_counter()
    features = compute(nn.Sequential(model.backbone, *layers), data, preprocess, device, precision)
    seconds = time.perf_counter() - started
    tensors = {"features": features.contiguous(), "labels": data.labels.cpu().contiguous()}
    metadata = {"compute_seconds": repr(seconds)}
    written = atomic.write_cache(
        path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), "the features"
    )
    return Features(features, data.labels, data.classes), "written" if written else "not written", seconds


def as_is(features: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """The preprocessing of cached features: none."""
    return features


class _Top(nn.Module):
    """The layers after the cached ones, held by their spec names as CapasNet holds them (the
    training records its Winograd convolutions by these names); the spec's BatchNormalization layers
    with `trainable: false` (CapasNet.fixed) stay in inference mode, as in CapasNet.train."""

    def __init__(self, layers: list[tuple[str, nn.Module]], fixed: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.fixed = fixed

    def train(self, mode: bool = True) -> _Top:
        super().train(mode)
        for module in self.fixed:
            module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            x = layer(x)
        return x


def fit_top(
    model: CapasNet,
    splits: Splits,
    preprocess: Preprocess,
    data: DataConfig,
    cfg: TrainConfig,
    device: torch.device,
    *,
    callbacks: Sequence[Callback] = (),
    checkpoint: Path | None = None,
    identity: dict,
) -> tuple[FitResult, Evaluation, dict]:
    """Train only the top on cached features; the model's top layers end with the trained weights.

    Returns the fit result, the test evaluation and how the cache was used: "hit", "written" or "not
    written" (the cache could not be written), `seconds` this run spent on it (computing or reading),
    and `compute_seconds`, what computing the training and validation features costs (measured when
    they were written). The latter is part of the variant's training cost whether or not this run
    found them cached.
    """
    started = time.perf_counter()
    parts, states, compute_seconds = {}, {}, {}
    paths = cache_paths(model, data, cfg, splits.info, preprocess, device, identity["backbone_weights"])
    for split, path in paths.items():
        parts[split], states[split], compute_seconds[split] = cached(
            model, getattr(splits, split), path, preprocess, device, cfg.precision
        )
    seconds = time.perf_counter() - started
    top = _Top(list(model.layers.items())[_prefix(model) :], model.fixed)
    # features are (N, F) or small maps: channels_last does not apply to them; they are the whole
    # frozen part's output already, which train.cache_frozen would keep in memory
    top_cfg = cfg.model_copy(update={"channels_last": False, "cache_frozen": False})
    result = fit(
        top,
        parts["train"],
        parts["val"],
        as_is,
        top_cfg,
        callbacks=callbacks,
        checkpoint=checkpoint,
        identity=identity,
    )
    test = evaluate(top, parts["test"], as_is, device, precision=cfg.precision)
    info = {
        "cache": next((s for s in ("not written", "written") if s in states.values()), "hit"),
        "seconds": seconds,
        # the test split's features are evaluation, as the other variants' test pass is
        "compute_seconds": compute_seconds["train"] + compute_seconds["val"],
    }
    return result, test, info
