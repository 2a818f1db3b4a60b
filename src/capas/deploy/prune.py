"""Pruning a run into a new run directory, fine-tuned with the source run's training config.

- structured: torch-pruning removes whole channels and units by L1 magnitude (never the
  classifier's outputs) and rewires the following layers; the smaller dense network is fine-tuned.
  Which layer types it handles is each layer class's `structured_pruning`.
- unstructured: torch.nn.utils.prune zeroes the smallest weights; the tensors stay dense.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.utils.prune
from torch import nn

from capas.data import Splits
from capas.errors import CapasError
from capas.inference import evaluate
from capas.layers import LAYERS
from capas.models import CapasNet, build_model
from capas.runs import Run, write_run
from capas.spec import ModelSpec, TrainConfig
from capas.train import fit


def check_prunable(spec: ModelSpec, structured: bool) -> None:
    """Refuse specs a pruning method cannot handle, naming the layer, before any work is done."""
    if spec.backbone is not None:
        raise CapasError(
            f"{spec.name}: pruning a pretrained backbone is not supported; prune a model built from layers"
        )
    infos = spec.layer_infos()
    weighted = [
        info
        for info in infos
        if info.trainable + info.non_trainable and info.layer.type_name() in ("Conv2D", "Dense")
    ]
    if len(weighted) < 2:
        raise CapasError(
            f"{spec.name}: nothing to prune: the only Conv2D/Dense layer is the classifier, which is kept whole"
        )
    if all(info.frozen for info in weighted[:-1]):
        raise CapasError(
            f"{spec.name}: nothing to prune: every Conv2D/Dense layer but the classifier is frozen "
            "(trainable: false), and frozen layers are kept whole, as the classifier is"
        )
    if not structured:
        return
    for info in infos:
        if not info.layer.structured_pruning:
            supported = sorted(name for name, cls in LAYERS.items() if cls.structured_pruning)
            raise CapasError(
                f"layer {info.index} ({info.layer.type_name()} {info.name!r}): structured pruning does not support it; "
                f"supported: {', '.join(supported)}; --unstructured works with any layer"
            )
    for before, after in itertools.pairwise(infos):
        if before.layer.type_name() == "Flatten" and len(before.input_shape) == 3:
            following = next((i for i in infos[after.index :] if i.trainable + i.non_trainable), None)
            if following is not None and following.layer.type_name() != "Dense":
                raise CapasError(
                    f"layer {following.index} ({following.layer.type_name()}): structured pruning needs a Dense layer "
                    "as the first layer with weights after Flatten"
                )


def prune_run(
    source: Run, splits: Splits, config: dict, out: Path, amount: float, structured: bool, epochs: int
) -> tuple[dict, list[str]]:
    """Prune a copy of the source model, fine-tune it, and write it as a run directory (with `config`,
    the source's config.json naming the dataset of `splits`); returns settings and notes."""
    model = build_model(source.spec)
    model.load_state_dict(source.model.state_dict())
    classifier = _classifier(model)
    if structured:
        model, spec = _prune_structured(model, source.spec, amount, classifier)
        notes = [
            f"structured: {_channels(source.spec)} -> {_channels(spec)} (filters/units), each layer rounded to whole channels and keeping at least one, the classifier kept whole"
        ]
    else:
        spec = source.spec
        # frozen layers (`trainable: false`) are kept whole, as structured pruning keeps them: fine-tuning
        # could not train their remaining weights around the zeros
        targets = [
            (m, "weight")
            for m in model.modules()
            if isinstance(m, nn.Conv2d | nn.Linear) and m is not classifier and m.weight.requires_grad
        ]
        for module, name in targets:
            torch.nn.utils.prune.l1_unstructured(module, name, amount)  # masks stay on during fine-tuning
    # Fine-tuning reuses the source run's training config, for `epochs` epochs and without its budgets,
    # on this machine's device (the recorded one, e.g. cuda, may not be here).
    cfg = (
        TrainConfig.model_validate(config.get("train", {})).model_copy(
            update={"epochs": epochs, "max_seconds": None, "max_samples": None, "device": "auto"}
        )
        if epochs
        else None
    )
    history = fit(model, splits.train, splits.val, source.preprocess, cfg).history if cfg else []
    model = model.cpu().eval()
    if not structured:
        for module, name in targets:
            torch.nn.utils.prune.remove(module, name)  # bake the zeros into plain dense weights
        zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
        total = sum(m.weight.numel() for m, _ in targets)
        notes = [
            f"unstructured: {zeros:,} of {total:,} Conv2D/Dense weights ({zeros / total:.1%}) are zero, the classifier "
            "and frozen layers kept whole. The zeros sit in dense tensors: by themselves they make the file no smaller and inference "
            "no faster (see the table); that needs sparse storage or sparse kernels, or structured pruning"
        ]
    settings = {
        "amount": amount,
        "structured": structured,
        "importance": "L1 magnitude",
        "finetune_epochs": epochs,
        "scope": "per layer, every Conv2D/Dense except the classifier and frozen layers",
        "finetune": cfg.model_dump(mode="json") if cfg else None,
    }
    config = {**config, "train": cfg.model_dump(mode="json") if cfg else config.get("train")}
    write_run(
        out,
        spec=spec,
        model=model,
        preprocess=source.preprocess,
        classes=source.classes,
        config=config,
        history=history,
        test=evaluate(
            model, splits.test, source.preprocess, "cpu", source.channels_last, source.precision, source.tta
        ).test_results(source.classes),
        reference=splits.val,
        precision=source.precision,  # serve computes its features in it
    )
    return settings, notes


def _classifier(model: CapasNet) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)][-1]


def _channels(spec: ModelSpec) -> str:
    return "/".join(
        str(getattr(layer, "filters", None) or layer.units)
        for layer in spec.layers
        if layer.type_name() in ("Conv2D", "Dense")
    )


def _prune_structured(
    model: CapasNet, spec: ModelSpec, amount: float, classifier: nn.Module
) -> tuple[CapasNet, ModelSpec]:
    """Remove `amount` of every layer's channels/units with torch-pruning, rounded to the nearest
    channel and keeping at least one; returns the rebuilt model and its spec."""
    import torch_pruning as tp

    height, width, channels = spec.input_shape
    ratios = _layer_ratios(model, spec, amount, classifier)
    if not any(ratios.values()):
        raise CapasError(
            f"--prune {amount}: removes no channel: rounded to whole channels, every layer keeps all of its "
            f"{_channels(spec)} (filters/units); prune a larger fraction"
        )
    with _chw_flatten(model, spec), _fixed_affine(model):
        pruner = tp.pruner.MagnitudePruner(
            model,
            example_inputs=torch.zeros(1, channels, height, width),
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=amount,
            pruning_ratio_dict=ratios,
            ignored_layers=[classifier],
        )
        pruner.step()
    layers = []
    for info, layer in zip(spec.layer_infos(), spec.layers, strict=True):
        module = model.layers[info.name]
        if layer.type_name() == "Conv2D":
            layer = layer.model_copy(update={"filters": module.conv.out_channels})
        elif layer.type_name() == "Dense":
            layer = layer.model_copy(update={"units": module.linear.out_features})
        layers.append(layer)
    pruned = ModelSpec(
        name=f"{spec.name}-pruned{round(amount * 100)}", input_shape=spec.input_shape, layers=tuple(layers)
    )
    # Rebuilding from the new spec and loading the pruned weights proves the spec describes the network.
    rebuilt = build_model(pruned)
    rebuilt.load_state_dict(model.state_dict())
    return rebuilt, pruned


def _layer_ratios(
    model: CapasNet, spec: ModelSpec, amount: float, classifier: nn.Module
) -> dict[nn.Module, float]:
    """Each Conv2D/Dense layer's pruning ratio for torch-pruning, which removes n − int(n·(1 − ratio))
    of n channels and skips a layer whose count would reach 0 (at --prune 0.99 it pruned nothing in
    layers under 100 channels): the ratio that keeps round(n·(1 − amount)) channels, at least 1; 0 for
    a frozen layer (torch-pruning cuts a layer it is given no ratio for by `amount`), and for the layer
    that feeds one: its outputs are the frozen layer's inputs, which fine-tuning could not make up for."""
    ratios = {}
    before = None  # the Conv2D/Dense weights before this one: they feed it
    for info in spec.layer_infos():
        kind, module = info.layer.type_name(), model.layers[info.name]
        if kind not in ("Conv2D", "Dense"):
            continue
        weights, count = (
            (module.conv, info.layer.filters) if kind == "Conv2D" else (module.linear, info.layer.units)
        )
        if not info.layer.trainable and before is not None and before is not classifier:
            ratios[before] = 0.0
        if weights is not classifier:
            keep = min(count, max(1, round(count * (1 - amount))))
            # int(count · (keep + 0.5)/count) == keep; a frozen layer is kept whole
            ratios[weights] = max(0.0, 1 - (keep + 0.5) / count) if info.layer.trainable else 0.0
        before = weights
    return ratios


@contextlib.contextmanager
def _fixed_affine(model: CapasNet) -> Iterator[None]:
    """Give BatchNormalization layers without a scale or an offset (`scale`/`center: false`) their
    fixed values as parameters while torch-pruning works, and take them away after.

    torch-pruning cuts a BatchNorm's weight and bias together and ranks channels partly by the
    weight; a fixed scale of 1 is what the layer computes, adds the same to every channel's score
    and so leaves the ranking to the convolutions around it.
    """
    fixed = []
    for norm in model.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            for name, fill in (("weight", torch.ones), ("bias", torch.zeros)):
                if getattr(norm, name) is None:
                    norm.register_parameter(name, nn.Parameter(fill(norm.num_features), requires_grad=False))
                    fixed.append((norm, name))
    try:
        yield
    finally:
        for norm, name in fixed:
            norm.register_parameter(name, None)


@contextlib.contextmanager
def _chw_flatten(model: CapasNet, spec: ModelSpec) -> Iterator[None]:
    """Present Keras' (H, W, C) Flatten to torch-pruning as PyTorch's (C, H, W) one, and back after.

    torch-pruning maps a removed channel to the Dense inputs it feeds assuming channel-major flattening;
    with Keras' channel-last order it would cut the wrong columns. The Dense weight's columns are
    permuted to (C, H, W) order for the pruning and back after, so the function computed is unchanged.
    """
    infos = spec.layer_infos()
    flat = next((i for i in infos if i.layer.type_name() == "Flatten" and len(i.input_shape) == 3), None)
    if flat is None:
        yield
        return
    height, width, _ = flat.input_shape
    dense = next(model.layers[i.name].linear for i in infos[flat.index :] if i.layer.type_name() == "Dense")
    original = model.layers[flat.name]
    with torch.no_grad():
        w = dense.weight  # (out, H*W*C)
        dense.weight.copy_(w.view(len(w), height, width, -1).permute(0, 3, 1, 2).reshape(len(w), -1))
    model.layers[flat.name] = nn.Flatten()
    try:
        yield
    finally:
        model.layers[flat.name] = original
        with torch.no_grad():
            w = dense.weight.detach()  # (out', C'*H*W) after pruning
            dense.weight.data = (
                w.view(len(w), -1, height, width).permute(0, 2, 3, 1).reshape(len(w), -1).contiguous()
            )
