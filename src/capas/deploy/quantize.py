"""Post-training quantization of a run with ONNX Runtime, into a run directory holding an ONNX graph.

- int8 (static): QDQ format, per-channel int8 weights, uint8 activations with MinMax ranges
  calibrated on training images (torch.ao.quantization is being retired).
- dynamic: the Dense layers only (weights int8, activations quantized per batch at run time);
  convolutions stay float32, for which ONNX Runtime has no fast kernel.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from capas import atomic
from capas.data import Splits
from capas.deploy.measure import vnni
from capas.errors import CapasError
from capas.inference import evaluate
from capas.runs import OnnxModel, Run, write_run
from capas.spec import ModelSpec

QUANTIZED = {  # each method, and what it makes int8, in words
    "int8": "weights int8, activations uint8",
    "dynamic": "Dense weights int8, their inputs quantized per batch at run time; convolutions float32",
}
QUANTIZE = tuple(QUANTIZED)
CALIBRATION_BATCH = 64  # images per calibration batch


def check_quantizable(spec: ModelSpec, kind: str) -> None:
    """Refuse a method that would quantize nothing, before any work is done."""
    if kind == "dynamic" and not any(layer.type_name() == "Dense" for layer in spec.layers):
        raise CapasError(
            f"{spec.name}: --quantize dynamic quantizes Dense layers only, and it has none; "
            "--quantize int8 quantizes its convolutions"
        )


def quantize_run(
    source: Run, splits: Splits, config: dict, float_path: Path, out: Path, kind: str, images: int
) -> tuple[dict, list[str]]:
    """Quantize the float graph into out/model.onnx and write the run directory around it (with
    `config`, the source's config.json naming the dataset of `splits`); returns settings and notes."""
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
        # ONNX's shape inference and the graph fusions ORT recommends before quantizing. ORT's symbolic
        # shape inference is skipped: it is for transformers, adds nothing here (the same int8 graph for
        # models without it) and fails on opset 18's ReduceMax (GlobalMaxPooling2D) with a TypeError.
        quant_pre_process(str(float_path), str(ready), skip_symbolic_shape=True)
        if kind == "int8":
            ready = _pad_into_max_pool(ready)
            # Without VNNI, x86 int8 dot products (VPMADDUBSW) can saturate; 7-bit weights avoid it there.
            reduce_range = not vnni()
            generator = torch.Generator().manual_seed(0)
            index = torch.randperm(len(splits.train), generator=generator)[:images]  # fewer in a small split
            settings = {
                "format": "QDQ",
                "calibration": "MinMax",
                "calibration_images": len(index),
                "activations": "uint8",
                "weights": "int8 per-channel",
                "reduce_range": reduce_range,
                "calibration_split": "train",
            }
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
    model = OnnxModel(out / "model.onnx")
    write_run(
        out,
        spec=source.spec,
        model=model,
        preprocess=source.preprocess,
        classes=source.classes,
        config=config,
        history=None,
        test=evaluate(model, splits.test, source.preprocess, tta=source.tta).test_results(source.classes),
        # Drift monitoring of this run compares live int8 features with int8 reference features.
        reference=splits.val,
        summary_note=f"The float architecture this {kind} ONNX model was quantized from ({QUANTIZED[kind]}):\n",
    )
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


def _pad_into_max_pool(path: Path) -> Path:
    """Fold each Pad(constant −∞) → MaxPool pair (MaxPooling2D with padding 'same') into the MaxPool's
    own pads, which never win the maximum either: the same function, without a tensor holding −∞,
    whose calibrated range made its int8 scale NaN (the model then scored at chance)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    folded = []
    for pad in graph.node:
        if pad.op_type != "Pad" or len(pad.input) != 3 or pad.input[2] not in constants:
            continue
        users = consumers.get(pad.output[0], [])
        value, pads = constants[pad.input[2]], constants.get(pad.input[1])
        mode = next(
            (onnx.helper.get_attribute_value(a) for a in pad.attribute if a.name == "mode"), b"constant"
        )
        if (
            mode != b"constant"
            or not np.isneginf(value).all()
            or pads is None
            or pads.shape != (8,)
            or pads[[0, 1, 4, 5]].any()  # batch and channel axes
            or [user.op_type for user in users] != ["MaxPool"]
        ):
            continue
        pool = users[0]
        own = next(a for a in pool.attribute if a.name == "pads")
        top, left, bottom, right = (int(v) for v in onnx.helper.get_attribute_value(own))
        pool.attribute.remove(own)
        pool.attribute.append(
            onnx.helper.make_attribute(
                "pads", [top + int(pads[2]), left + int(pads[3]), bottom + int(pads[6]), right + int(pads[7])]
            )
        )
        pool.input[0] = pad.input[0]
        folded.append(pad)
    if not folded:
        return path
    for pad in folded:
        graph.node.remove(pad)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]  # not the pads and −∞ constants
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return _save_rewritten(model, path.with_name("maxpool.onnx"), stale={pad.output[0] for pad in folded})


def _gemm_to_matmul(path: Path) -> Path:
    """Rewrite Gemm(x, W, b) with transB=1 as MatMul(x, Wᵀ) + b: ORT's dynamic quantizer handles MatMul, not Gemm."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    nodes, transposed = [], set()
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
            transposed.add(node.input[1])
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
    return _save_rewritten(model, path.with_name("matmul.onnx"), stale=transposed)


def _save_rewritten(model, path: Path, stale: set[str]) -> Path:
    """Save a rewritten graph to `path` once onnx's checker passes it, without the recorded shapes of
    the `stale` values (removed, or transposed: the checker would compare them with the new ones)."""
    import onnx

    shapes = [v for v in model.graph.value_info if v.name not in stale]
    del model.graph.value_info[:]
    model.graph.value_info.extend(shapes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
