"""Post-training compression of a run directory into a new run directory, measured beside the original.

- int8 (static): ONNX Runtime's post-training quantization, QDQ format, per-channel int8 weights, uint8
  activations with MinMax ranges calibrated on training images (torch.ao.quantization is being retired).
- dynamic: ONNX Runtime's dynamic quantization of the Dense layers only (weights int8, activations
  quantized per batch at run time); convolutions stay float32, for which it has no fast kernel.
- structured pruning: torch-pruning removes whole channels and units by L1 magnitude (never the
  classifier's outputs) and rewires the following layers; the smaller dense network is fine-tuned.
- unstructured pruning: torch.nn.utils.prune zeroes the smallest weights; the tensors stay dense.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.utils.prune
from torch import nn

import capas
from capas import atomic
from capas.data import ArrayDataset
from capas.deploy.export import export_onnx
from capas.deploy.measure import Candidate, Comparison, Repeats, measure, vnni
from capas.deploy.runtime import RUNTIME, OnnxModel
from capas.errors import CapasError
from capas.models import CapasNet, build_model
from capas.predict import run_splits
from capas.runs import REFERENCE, Run, environment, load_run, save_reference, write_run
from capas.spec import ModelSpec, TrainConfig
from capas.spec.summary import summarize
from capas.train import evaluate, fit

QUANTIZE = ("int8", "dynamic")
CALIBRATION_IMAGES = 512  # training images whose activation ranges set the int8 scales
CALIBRATION_BATCH = 64
# Layer types whose channels torch-pruning can remove and rewire in a capas network.
STRUCTURED = {
    "Conv2D",
    "Dense",
    "MaxPooling2D",
    "AveragePooling2D",
    "GlobalMaxPooling2D",
    "GlobalAveragePooling2D",
    "Flatten",
    "Dropout",
    "SpatialDropout2D",
    "BatchNormalization",
    "Activation",
    "ReLU",
    "Softmax",
}


def compress_run(
    run_dir: str | Path,
    *,
    quantize: str | None = None,
    prune: float | None = None,
    structured: bool = True,
    finetune_epochs: int = 2,
    out: str | Path | None = None,
    calibration_images: int = CALIBRATION_IMAGES,
    repeats: Repeats | None = None,
) -> tuple[Path, Comparison]:
    """Compress a run directory into a new one (default: beside it) and measure both; the source is only read."""
    repeats = repeats or Repeats()
    check_method(quantize, prune, finetune_epochs)
    source = load_run(run_dir)
    if not isinstance(source.model, CapasNet):
        raise CapasError(f"{source.path}: already an ONNX Runtime run; compress its float source instead")
    if quantize:
        method = f"quantize-{quantize}"
    else:
        method = f"prune-{'structured' if structured else 'unstructured'}"
        _check_prunable(source.spec, structured)
    out = Path(out) if out is not None else default_out(source.path, quantize, prune, structured)
    if out.exists():
        raise CapasError(f"{out}: already exists; pass --out to write elsewhere or remove it")
    splits = run_splits(source)
    lineage = {
        "source": str(source.path.resolve()),
        "source_model_sha256": hashlib.sha256((source.path / "model.safetensors").read_bytes()).hexdigest(),
        "method": method,
        "capas": capas.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    parameters = sum(p.numel() for p in source.model.parameters())
    candidates = [Candidate("original (PyTorch)", source.model, source.path / "model.safetensors")]
    with _staging(out) as tmp, tempfile.TemporaryDirectory() as scratch:
        if quantize:
            # The float graph in the same runtime separates what int8 does from what ONNX Runtime does.
            float_path = export_onnx(source.model, Path(scratch) / "float.onnx")
            candidates.append(
                Candidate("float32 (ONNX Runtime)", OnnxModel(float_path), float_path, parameters)
            )
            settings, notes = _quantize(source, splits, float_path, tmp, quantize, calibration_images)
            name, weights = f"{quantize} (ONNX Runtime)", tmp / "model.onnx"
        else:
            settings, notes = _prune(source, splits, tmp, prune, structured, finetune_epochs)
            name, weights = "pruned (PyTorch)", tmp / "model.safetensors"
        candidates.append(Candidate(name, load_run(tmp).model, weights, parameters))
        comparison = Comparison(
            method, measure(candidates, splits.test, source.preprocess, repeats), settings, notes
        )
        comparison.check_speed(int8=quantize is not None)
        atomic.write_json(tmp / "lineage.json", {**lineage, "settings": settings})
        atomic.write_json(tmp / "compress.json", {**comparison.to_dict(), "environment": environment()})
        atomic.write_text(tmp / "compress.md", comparison.markdown())
    return out, comparison


def check_method(quantize: str | None, prune: float | None, finetune_epochs: int = 0) -> None:
    """Refuse a bad choice of method before any work is done (studies call this when they load)."""
    if (quantize is None) == (prune is None):
        raise CapasError("choose one method: --quantize int8|dynamic or --prune AMOUNT")
    if quantize is not None and quantize not in QUANTIZE:
        raise CapasError(f"--quantize {quantize!r}: allowed {', '.join(QUANTIZE)}")
    if prune is not None and (
        isinstance(prune, bool) or not isinstance(prune, int | float) or not 0.0 < prune < 1.0
    ):
        raise CapasError(
            f"--prune {prune}: the fraction of weights or channels to remove must lie strictly between 0 and 1"
        )
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise CapasError(f"--finetune-epochs {finetune_epochs}: must be a whole number, 0 or more")


def default_out(run_dir: Path, quantize: str | None, prune: float | None, structured: bool) -> Path:
    """Where a compressed run goes unless told: beside its source, named by the method."""
    suffix = quantize or f"pruned{round(prune * 100)}{'s' if structured else 'u'}"
    return run_dir.with_name(f"{run_dir.name}-{suffix}")


def compress_for_study(run_dir: Path, args: dict) -> dict:
    """Compress a study's freshly trained run (beside it) and return the figures its report compares.

    A compressed run already complete beside it (the study was interrupted after compressing) is
    read back rather than made again.
    """
    out = default_out(run_dir, args.get("quantize"), args.get("prune"), args.get("structured", True))
    if (out / "compress.json").is_file():
        recorded = json.loads((out / "compress.json").read_text())
    else:
        out, comparison = compress_run(run_dir, **args, out=out, repeats=Repeats(batch1=50, batch64=10))
        recorded = comparison.to_dict()
    original, compressed = recorded["measurements"][0], recorded["measurements"][-1]
    return {
        "run": str(out),
        "method": recorded["method"],
        "test_accuracy": compressed["accuracy"],
        "accuracy_change": compressed["accuracy"] - original["accuracy"],
        "bytes": compressed["bytes"],
        "size_ratio": original["bytes"] / compressed["bytes"],
        "batch1_ms": compressed["batch1_ms"][0],
        "speedup_batch1": original["batch1_ms"][0] / compressed["batch1_ms"][0],
        "speedup_batch64": original["batch64_ms"][0] / compressed["batch64_ms"][0],
    }


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A hidden folder beside `out`, renamed onto it when complete: a crash never leaves half a run."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700 folders; give the permissions mkdir would
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _test_results(model, test: ArrayDataset, run: Run) -> dict:
    result = evaluate(model, test, run.preprocess, "cpu")
    classes = len(run.classes)
    return {
        "test_loss": result.loss,
        "test_accuracy": result.accuracy,
        "per_class_accuracy": dict(zip(run.classes, result.per_class_accuracy(classes), strict=True)),
        "confusion_matrix": result.confusion(classes).tolist(),
        "classes": list(run.classes),
    }


# --- quantization ------------------------------------------------------------------------------------


def _quantize(
    source: Run, splits, float_path: Path, out: Path, kind: str, images: int
) -> tuple[dict, list[str]]:
    """Quantize the float graph into out/model.onnx and write the run files beside it; returns settings and notes."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as scratch:
        ready = Path(scratch) / "ready.onnx"
        # Shape inference and the graph fusions ORT recommends before quantizing.
        quant_pre_process(str(float_path), str(ready))
        if kind == "int8":
            # Without VNNI, x86 int8 dot products (VPMADDUBSW) can saturate; 7-bit weights avoid it there.
            reduce_range = not vnni()
            settings = {
                "format": "QDQ",
                "calibration": "MinMax",
                "calibration_images": images,
                "activations": "uint8",
                "weights": "int8 per-channel",
                "reduce_range": reduce_range,
                "calibration_split": "train",
            }
            generator = torch.Generator().manual_seed(0)
            index = torch.randperm(len(splits.train), generator=generator)[:images]
            x = source.preprocess(splits.train.images[index]).numpy()  # (N, C, H, W) float32

            class Calibration(CalibrationDataReader):
                def __init__(self) -> None:
                    self.batches = iter(
                        [{"input": x[i : i + CALIBRATION_BATCH]} for i in range(0, len(x), CALIBRATION_BATCH)]
                    )

                def get_next(self) -> dict | None:
                    return next(self.batches, None)

            atomic.write_with(
                out / "model.onnx",
                lambda tmp: quantize_static(
                    str(ready),
                    str(tmp),
                    Calibration(),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    reduce_range=reduce_range,
                ),
            )
            notes = [f"static int8: {_count_ops(out / 'model.onnx')}"]
        else:
            matmul = _gemm_to_matmul(ready)
            settings = {
                "weights": "int8 per-channel",
                "activations": "uint8, quantized per batch at run time",
                "quantized": "Dense layers (MatMul)",
                "convolutions": "left float32",
            }
            atomic.write_with(
                out / "model.onnx",
                lambda tmp: quantize_dynamic(
                    str(matmul),
                    str(tmp),
                    op_types_to_quantize=["MatMul"],
                    per_channel=True,
                    weight_type=QuantType.QInt8,
                ),
            )
            notes = [
                f"dynamic: {_count_ops(out / 'model.onnx')}; the convolutions were left in float32 (ONNX Runtime's "
                "dynamic ConvInteger has no fast kernel and its activations would be requantized per batch), so "
                "only Dense-heavy models gain from it"
            ]
    atomic.write_json(out / RUNTIME, {"runtime": "onnxruntime", "model": "model.onnx"})
    atomic.write_json(out / "model.json", source.spec.to_dict())
    atomic.write_json(out / "preprocess.json", source.read_json("preprocess.json"))
    atomic.write_json(
        out / "config.json", {**(source.read_json("config.json") or {}), "environment": environment()}
    )
    atomic.write_text(
        out / "summary.txt",
        f"The float architecture this {kind} ONNX model was quantized from (weights int8, activations quantized):\n"
        + summarize(source.spec).text(),
    )
    model = OnnxModel(out / "model.onnx")
    # Drift monitoring of this run compares live int8 features with int8 reference features.
    save_reference(out / REFERENCE, model, splits.val, source.preprocess)
    atomic.write_json(out / "test.json", _test_results(model, splits.test, source))
    return settings, notes


def _count_ops(path: Path) -> str:
    """What a quantized graph holds, in words."""
    import onnx

    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    if "MatMulInteger" in ops:  # dynamic
        return f"{ops.count('MatMulInteger')} Dense layers as MatMulInteger (int8), {ops.count('Conv')} Conv in float32"
    # QDQ: float Conv/Gemm nodes between QuantizeLinear/DequantizeLinear pairs, which ONNX Runtime fuses
    # into int8 kernels (QLinearConv, QGemm) when it loads the graph.
    return (
        f"{ops.count('Conv')} Conv and {ops.count('Gemm')} Gemm nodes between {ops.count('QuantizeLinear')} "
        f"QuantizeLinear and {ops.count('DequantizeLinear')} DequantizeLinear nodes (run as int8 kernels)"
    )


def _gemm_to_matmul(path: Path) -> Path:
    """Rewrite Gemm(x, W, b) with transB=1 as MatMul(x, Wᵀ) + b: ORT's dynamic quantizer handles MatMul, not Gemm."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        plain = (
            attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        )
        if node.op_type != "Gemm" or not plain or node.input[1] not in weights:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weights[node.input[1]])
        if attrs.get("transB", 0):
            weights[node.input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T), node.input[1]))
        product = node.output[0] + "_matmul" if len(node.input) > 2 else node.output[0]
        nodes.append(
            onnx.helper.make_node(
                "MatMul", [node.input[0], node.input[1]], [product], name=node.name + "_matmul"
            )
        )
        if len(node.input) > 2:
            nodes.append(
                onnx.helper.make_node(
                    "Add", [product, node.input[2]], [node.output[0]], name=node.name + "_add"
                )
            )
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    rewritten = path.with_name("matmul.onnx")
    onnx.save(model, str(rewritten))
    return rewritten


# --- pruning -----------------------------------------------------------------------------------------


def _check_prunable(spec: ModelSpec, structured: bool) -> None:
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
    if not structured:
        return
    for info in infos:
        if info.layer.type_name() not in STRUCTURED:
            raise CapasError(
                f"layer {info.index} ({info.layer.type_name()} {info.name!r}): structured pruning does not support it; "
                f"supported: {', '.join(sorted(STRUCTURED))}; --unstructured works with any layer"
            )
    for before, after in itertools.pairwise(infos):
        if before.layer.type_name() == "Flatten" and len(before.input_shape) == 3:
            following = next((i for i in infos[after.index :] if i.trainable + i.non_trainable), None)
            if following is not None and following.layer.type_name() != "Dense":
                raise CapasError(
                    f"layer {following.index} ({following.layer.type_name()}): structured pruning needs a Dense layer "
                    "as the first layer with weights after Flatten"
                )


def _prune(
    source: Run, splits, out: Path, amount: float, structured: bool, epochs: int
) -> tuple[dict, list[str]]:
    """Prune a copy of the source model, fine-tune it, and write it as a run directory; returns settings and notes."""
    model = build_model(source.spec)
    model.load_state_dict(source.model.state_dict())
    classifier = _classifier(model)
    if structured:
        model, spec = _prune_structured(model, source.spec, amount, classifier)
        notes = [
            f"structured: {_channels(source.spec)} -> {_channels(spec)} (filters/units), the classifier kept whole"
        ]
    else:
        spec = source.spec
        targets = [
            (m, "weight")
            for m in model.modules()
            if isinstance(m, nn.Conv2d | nn.Linear) and m is not classifier
        ]
        for module, name in targets:
            torch.nn.utils.prune.l1_unstructured(module, name, amount)  # masks stay on during fine-tuning
    recorded = source.read_json("config.json") or {}
    # Fine-tuning reuses the source run's training config, for `epochs` epochs and without its budgets.
    cfg = (
        TrainConfig.model_validate(recorded.get("train", {})).model_copy(
            update={"epochs": epochs, "max_seconds": None, "max_samples": None}
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
            "kept whole. The zeros sit in dense tensors: by themselves they make the file no smaller and inference "
            "no faster (see the table); that needs sparse storage or sparse kernels, or structured pruning"
        ]
    settings = {
        "amount": amount,
        "structured": structured,
        "importance": "L1 magnitude",
        "finetune_epochs": epochs,
        "scope": "per layer, every Conv2D/Dense except the classifier",
        "finetune": cfg.model_dump(mode="json") if cfg else None,
    }
    config = {**recorded, "train": cfg.model_dump(mode="json") if cfg else recorded.get("train")}
    write_run(
        out,
        spec=spec,
        model=model,
        preprocess=source.preprocess,
        classes=source.classes,
        config=config,
        history=history,
        test=_test_results(model, splits.test, source),
    )
    save_reference(out / REFERENCE, model, splits.val, source.preprocess)
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
    """Remove `amount` of every layer's channels/units with torch-pruning; returns the rebuilt model and its spec."""
    import torch_pruning as tp

    height, width, channels = spec.input_shape
    with _chw_flatten(model, spec):
        pruner = tp.pruner.MagnitudePruner(
            model,
            example_inputs=torch.zeros(1, channels, height, width),
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=amount,
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
