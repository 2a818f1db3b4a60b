"""Export, quantization and pruning of a real (tiny) run trained on Fashion-MNIST."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from typer.testing import CliRunner

from capas.cli import app
from capas.data import ArrayDataset, Preprocess, splits_for
from capas.deploy.compress import compress_run
from capas.deploy.export import ATOL, export_run
from capas.deploy.measure import Candidate, Repeats, measure
from capas.deploy.prune import _prune_structured
from capas.errors import CapasError
from capas.lock import LOCK, exclusive
from capas.models import build_model
from capas.predict import evaluate_run, predict, run_splits
from capas.runs import OnnxModel, load_run, write_run
from capas.runs.reference import load_reference, save_reference
from capas.spec import DataConfig, ModelSpec, TrainConfig
from capas.train import train

TINY = {
    "name": "tiny-mnist",
    "input_shape": [28, 28, 1],
    "layers": [
        {"Conv2D": {"filters": 8, "kernel_size": 3, "activation": "relu"}},
        {"Conv2D": {"filters": 16, "kernel_size": 3, "activation": "relu"}},
        {"MaxPooling2D": {"pool_size": 2}},
        {"Dropout": {"rate": 0.25}},
        "Flatten",
        {"Dense": {"units": 32, "activation": "relu"}},
        {"Dropout": {"rate": 0.5}},
        {"Dense": {"units": 10, "activation": "softmax"}},
    ],
}
FAST = Repeats(batch1=10, batch64=3, warmup=1)
# holds a folder's lock until killed: exclusive as `capas train --out FOLDER` does, or shared as export does
HOLD = (
    "import sys, time\nfrom capas.lock import exclusive\n"
    "with exclusive(sys.argv[1], 'run directory', shared=sys.argv[2] == 'shared'):\n"
    "    print('held', flush=True)\n    time.sleep(600)"
)
runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    spec = ModelSpec.from_dict(TINY)
    train(
        spec,
        DataConfig(name="fashion-mnist", limit=2000, test_limit=400),
        TrainConfig(epochs=1, batch_size=64, device="cpu"),
        out,
    )
    return out


def hashes(folder: Path) -> dict[str, str]:
    """The digests of a run's files (not its lock file, which says who held the folder last)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file() and p.name != LOCK
    }


def fails_cleanly(args: list[str], *words: str):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "error:" in result.output
    for word in words:
        assert word in result.output, result.output
    return result


def test_export_onnx_matches_pytorch_with_dynamic_batch(run_dir, tmp_path):
    out = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", str(run_dir), "--onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "same class for 100.0%" in " ".join(result.output.split())  # Rich wraps at the terminal width
    onnx.checker.check_model(str(out), full_check=True)
    graph = onnx.load(str(out)).graph
    assert [o.name for o in graph.output] == ["logits", "embedding"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch dimension

    run, model = load_run(run_dir), OnnxModel(out)
    images = torch.randint(0, 256, (7, 1, 28, 28), dtype=torch.uint8)
    for batch in (1, 7):
        x = run.preprocess(images[:batch])
        assert torch.allclose(model(x), run.model(x), atol=ATOL, rtol=ATOL)
        assert torch.allclose(model.embed(x), run.model.embed(x), atol=ATOL, rtol=ATOL)
    check = export_run(run_dir, tmp_path / "again.onnx").parity
    assert check.within_tolerance and check.images == 256 and check.max_abs_logits < ATOL


@pytest.mark.parametrize("fmt", ["--onnx", "--keras"])
def test_an_export_into_another_run_directory_is_refused(run_dir, tmp_path, fmt):
    """`capas export RUN --onnx --out OTHER/model.onnx` replaced another (an int8) run's model with this
    float one: that run then evaluated as the float model, its compress.json still saying int8."""
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    (other / "model.onnx").write_bytes(b"the other run's model")
    name = "model.onnx" if fmt == "--onnx" else "model.keras"
    result = runner.invoke(app, ["export", str(run_dir), fmt, "--out", str(other / name)])
    assert result.exit_code == 2
    assert f"--out {other / name}: inside the run directory {other}" in " ".join(result.output.split())
    assert (other / "model.onnx").read_bytes() == b"the other run's model"


@pytest.mark.parametrize("where", ["images", "run"])
def test_a_compressed_run_inside_an_image_folder_or_a_run_is_refused(run_dir, tmp_path, where):
    """`capas compress RUN --out IMAGES/x` made a class folder without images of the run's dataset, and
    every later evaluate and train on it failed; `--out RUN/sub` put a run inside a run."""
    (tmp_path / "images" / "a").mkdir(parents=True)
    data = DataConfig(name=f"folder:{tmp_path / 'images'}") if where == "images" else None
    out = tmp_path / "images" / "x" if where == "images" else run_dir / "sub"
    message = (
        r"inside the image folder .*images of the run's data"
        if where == "images"
        else r"inside the run directory"
    )
    with pytest.raises(CapasError, match=message):
        compress_run(run_dir, quantize="dynamic", out=out, data=data)
    assert not out.exists() and [p.name for p in (tmp_path / "images").iterdir()] == ["a"]


def test_export_interrupted_during_its_parity_check_leaves_no_file(run_dir, tmp_path, monkeypatch):
    """The file was renamed into place before the parity check: Ctrl-C during the check left an
    unchecked model.onnx (or replaced the previous export) while capas said 'nothing was written'."""
    import capas.deploy.export as export

    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous export")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "parity", interrupted)
    result = runner.invoke(app, ["export", str(run_dir), "--onnx", "--out", str(out)])
    assert result.exit_code == 130 and "nothing was written" in result.output, result.output
    assert out.read_bytes() == b"the previous export" and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_a_model_the_exporter_cannot_convert_is_one_line(run_dir, tmp_path, monkeypatch):
    """torch 2.6 to 2.12 (inside capas' supported range) cannot convert GlobalMaxPooling2D: `capas export
    --onnx` ended in the exporter's traceback. Its error is raised here as torch raises it."""
    import torch

    def cannot(*args, **kwargs):
        raise torch.onnx.OnnxExporterError("Failed to convert the exported program to an ONNX model.")

    monkeypatch.setattr(torch.onnx, "export", cannot)
    out = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", str(run_dir), "--onnx", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "ONNX exporter cannot convert this model (OnnxExporterError)" in " ".join(result.output.split())
    assert not any(tmp_path.iterdir())


def test_export_warns_that_the_file_lacks_the_runs_test_time_augmentation(run_dir, tmp_path):
    """A run with flip TTA exported without a word: the file's probabilities differed from capas
    predict's by 0.01 while export printed 'same class for 100.0%' (against the model alone)."""
    run = tmp_path / "tta"
    shutil.copytree(run_dir, run)
    config = json.loads((run / "config.json").read_text())
    config["train"]["tta"] = "flip"
    (run / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["export", str(run), "--keras"])  # ONNX (slower to export) says the same
    assert result.exit_code == 0, result.output
    printed = " ".join(result.output.split())  # Rich wraps at the terminal width
    assert "warning: " in printed and "without the run's flip test-time augmentation" in printed
    plain = runner.invoke(app, ["export", str(run_dir), "--keras", "--out", str(tmp_path / "m.keras")])
    assert plain.exit_code == 0 and "warning" not in plain.output


def test_export_onnx_of_a_run_with_a_backbone(run_dir, tmp_path):
    """The exported graph left the backbone out: export and int8 failed with a matmul shape RuntimeError."""
    spec = ModelSpec.from_dict(
        {
            "name": "top",
            "input_shape": [28, 28, 1],
            "backbone": {"name": "run", "weights": str(run_dir)},
            "layers": [{"Dense": {"name": "top", "units": 10, "activation": "softmax"}}],
        }
    )
    source = tmp_path / "transfer"
    train(
        spec,
        DataConfig(name="fashion-mnist", limit=300, test_limit=100),
        TrainConfig(epochs=1, device="cpu"),
        source,
    )
    check = export_run(source, tmp_path / "model.onnx").parity
    assert check.within_tolerance and check.agreement == 1.0


def test_int8_is_a_run_directory_that_evaluate_predict_and_summary_accept(run_dir, tmp_path):
    before = hashes(run_dir)
    out, comparison = compress_run(run_dir, quantize="int8", out=tmp_path / "int8", repeats=FAST)
    assert hashes(run_dir) == before
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["method"] == "quantize-int8"
    assert lineage["source_model_sha256"] == before["model.safetensors"]
    assert lineage["settings"]["calibration"] == "MinMax" and lineage["settings"]["format"] == "QDQ"
    assert {"compress.json", "compress.md", "runtime.json", "model.onnx", "reference.safetensors"} <= set(
        hashes(out)
    )
    assert "QuantizeLinear" in {node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node}

    original, float_onnx, int8 = comparison.measurements
    assert original.bytes / int8.bytes > 3.0  # weights to int8; the Dense layer dominates this model
    assert abs(int8.accuracy - original.accuracy) < 0.03
    assert float_onnx.accuracy == pytest.approx(original.accuracy, abs=1e-3)

    run = load_run(out)
    assert isinstance(run.model, OnnxModel)
    _, evaluation = evaluate_run(run)
    assert evaluation.accuracy == pytest.approx(int8.accuracy)
    images = [torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8) for _ in range(3)]
    predictions = predict(run, images)
    assert len(predictions) == 3 and all(abs(sum(p.probabilities) - 1) < 1e-4 for p in predictions)
    assert run.model.embed(run.preprocess(torch.stack(images))).shape == (3, 32)

    result = runner.invoke(app, ["evaluate", str(out)])
    assert result.exit_code == 0 and "test accuracy" in result.output
    result = runner.invoke(app, ["summary", str(out)])
    assert result.exit_code == 0 and "float architecture" in result.output and "75,338" in result.output


def test_dynamic_quantization_leaves_convolutions_float(run_dir, tmp_path):
    (tmp_path / ".dyn.k1lled_x").mkdir()  # what a compress killed (kill -9) while it wrote `dyn` left
    with pytest.warns(UserWarning, match=r"dyn: deleted the hidden folders killed commands left beside it"):
        out, comparison = compress_run(run_dir, quantize="dynamic", out=tmp_path / "dyn", repeats=FAST)
    assert [p.name for p in tmp_path.iterdir()] == ["dyn"]
    ops = [node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node]
    assert ops.count("Conv") == 2 and ops.count("MatMulInteger") == 2
    assert "convolutions were left in float32" in comparison.notes[0]
    assert abs(comparison.measurements[-1].accuracy - comparison.measurements[0].accuracy) < 0.03
    # summary said the graph had int8 weights, its convolutions' among them
    result = runner.invoke(app, ["summary", str(out)])
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and "convolutions float32" in said and "with int8 weights" not in said
    # an ONNX Runtime run is no start for export or compression: each says so and names its float source
    for command in (
        ["export", str(out), "--onnx"],
        ["export", str(out), "--keras"],
        ["compress", str(out), "--quantize", "int8"],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and "an ONNX Runtime run (model.onnx)" in result.output
        assert f"{command[0]} its float source instead" in result.output


@pytest.fixture(scope="module")
def gmp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "gmp"
    spec = ModelSpec.from_dict(
        {
            "name": "gmp",
            "input_shape": [28, 28, 1],
            "layers": [
                {"Conv2D": {"filters": 8, "kernel_size": 3, "activation": "relu"}},
                "GlobalMaxPooling2D",
                {"Dense": {"units": 10, "activation": "softmax"}},
            ],
        }
    )
    train(
        spec,
        DataConfig(name="fashion-mnist", limit=300, test_limit=100),
        TrainConfig(epochs=1, device="cpu"),
        out,
    )
    return out


@pytest.mark.parametrize("quantize", ["int8", "dynamic"])
def test_quantizing_global_max_pooling(gmp_run, tmp_path, quantize):
    """GlobalMaxPooling2D exports as opset 18's ReduceMax, whose axes ORT's symbolic shape inference
    could not read: quantizing the seed-000 GMP model or the fashion-mnist recipes was a TypeError."""
    out, comparison = compress_run(gmp_run, quantize=quantize, out=tmp_path / "q", repeats=FAST)
    assert abs(comparison.measurements[-1].accuracy - comparison.measurements[0].accuracy) < 0.05
    if quantize == "int8":  # the whole training split, fewer than 512 (it was recorded as 512 all the same)
        assert comparison.settings["calibration_images"] == 300
    assert evaluate_run(load_run(out))[1].accuracy == pytest.approx(comparison.measurements[-1].accuracy)


def test_int8_of_max_pooling_with_same_padding(tmp_path):
    """MaxPooling2D with padding 'same' pads with −∞, which gave that tensor a NaN int8 scale: the
    int8 model scored at chance (0.10 against 0.64 here)."""
    spec = ModelSpec.from_dict(
        {
            "name": "same",
            "input_shape": [28, 28, 1],
            "layers": [
                {"Conv2D": {"filters": 8, "kernel_size": 3, "activation": "relu"}},
                {"MaxPooling2D": {"pool_size": 3, "strides": 2, "padding": "same"}},
                "Flatten",
                {"Dense": {"units": 10, "activation": "softmax"}},
            ],
        }
    )
    source = tmp_path / "same"
    data = DataConfig(name="fashion-mnist", limit=300, test_limit=100)
    train(spec, data, TrainConfig(epochs=2, batch_size=32, device="cpu"), source)
    _, comparison = compress_run(source, quantize="int8", out=tmp_path / "int8", repeats=FAST)
    original, _, int8 = comparison.measurements
    assert original.accuracy > 0.4 and abs(int8.accuracy - original.accuracy) < 0.05


def test_structured_pruning_removes_exactly_the_channels_that_do_nothing():
    """Channels whose weights are all zero are removed, and the network computes the same function.

    The Dense columns fed by those channels sit at Keras' (H, W, C) flatten positions: pruning the
    wrong columns (channel-major order) would change the output.
    """
    spec = ModelSpec.from_dict(TINY)
    model = build_model(spec, seed=0).eval()
    layers = model.layers
    conv1, conv2 = layers["conv2d"].conv, layers["conv2d_1"].conv
    dense, head = layers["dense"].linear, layers["dense_1"].linear
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        dead1, dead2, dead_units = [0, 2, 3, 7], list(range(1, 16, 2)), list(range(0, 32, 2))
        conv1.weight[dead1], conv1.bias[dead1], conv2.weight[:, dead1] = 0, 0, 0
        conv2.weight[dead2], conv2.bias[dead2] = 0, 0
        dense.weight.view(32, 12, 12, 16)[..., dead2] = 0  # (out, H, W, C): Keras' flatten order
        dense.weight[dead_units], dense.bias[dead_units], head.weight[:, dead_units] = 0, 0, 0
    x = torch.randn(5, 1, 28, 28)
    expected = model(x)
    pruned, pruned_spec = _prune_structured(model, spec, 0.5, head)
    assert [getattr(layer, "filters", getattr(layer, "units", None)) for layer in pruned_spec.layers[:2]] == [
        4,
        8,
    ]
    assert pruned_spec.layers[5].units == 16 and pruned_spec.layers[7].units == 10
    assert torch.allclose(pruned.eval()(x), expected, atol=1e-5)


def test_structured_pruning_keeps_batchnorms_without_scale_or_offset_as_they_are():
    """airbench's BatchNormalization (`scale: false`) and one with neither scale nor offset: channels
    fed by all-zero filters go, the function stays, and the layers come back without the parameters."""
    spec = ModelSpec.from_dict(
        {
            "name": "fixed-affine",
            "input_shape": [12, 12, 1],
            "layers": [
                {"Conv2D": {"filters": 8, "kernel_size": 3, "padding": "same", "use_bias": False}},
                {"BatchNormalization": {"scale": False, "momentum": 0.6}},
                {"Activation": {"activation": "gelu"}},
                {"Conv2D": {"filters": 16, "kernel_size": 3, "padding": "same", "use_bias": False}},
                {"MaxPooling2D": {"pool_size": 2}},
                {"BatchNormalization": {"scale": False, "center": False}},
                {"Activation": {"activation": "relu"}},
                "GlobalMaxPooling2D",
                {"Dense": {"units": 10, "use_bias": False}},
            ],
        }
    )
    model = build_model(spec, seed=0)
    layers = model.layers
    conv1, conv2, head = layers["conv2d"].conv, layers["conv2d_1"].conv, layers["dense"].linear
    norm1, norm2 = layers["batch_normalization"], layers["batch_normalization_1"]
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        norm1.running_mean.uniform_(-1, 1), norm1.running_var.uniform_(0.5, 2)
        norm2.running_mean.uniform_(-1, 1), norm2.running_var.uniform_(0.5, 2)
        dead1, dead2 = [1, 4, 5, 6], list(range(0, 16, 2))
        conv1.weight[dead1], conv2.weight[:, dead1] = 0, 0
        conv2.weight[dead2], head.weight[:, dead2] = 0, 0
    x = torch.randn(5, 1, 12, 12)
    expected = model.eval()(x)
    pruned, pruned_spec = _prune_structured(model, spec, 0.5, head)
    assert [pruned_spec.layers[i].filters for i in (0, 3)] == [4, 8]
    assert pruned_spec.layers[1].scale is False and pruned_spec.layers[5].center is False
    norm1, norm2 = pruned.layers["batch_normalization"], pruned.layers["batch_normalization_1"]
    assert norm1.weight is None and norm1.bias.shape == (4,) and norm2.weight is None and norm2.bias is None
    assert norm1.running_mean.shape == (4,) and norm2.running_var.shape == (8,)
    assert torch.allclose(pruned.eval()(x), expected, atol=1e-5)


def test_structured_pruning_makes_a_smaller_run_that_summary_describes(run_dir, tmp_path):
    before = hashes(run_dir)
    out, comparison = compress_run(
        run_dir, prune=0.5, finetune_epochs=1, out=tmp_path / "pruned", repeats=FAST
    )
    assert hashes(run_dir) == before
    spec = json.loads((out / "model.json").read_text())
    assert spec["layers"][0] == {"Conv2D": {"filters": 4, "kernel_size": [3, 3], "activation": "relu"}}
    original, pruned = comparison.measurements
    assert pruned.parameters < original.parameters / 3 and pruned.bytes < original.bytes / 3
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # one fine-tuning epoch
    result = runner.invoke(app, ["summary", str(out)])
    assert result.exit_code == 0 and f"{pruned.parameters:,}" in result.output
    assert evaluate_run(load_run(out))[1].accuracy == pytest.approx(pruned.accuracy)


@pytest.mark.parametrize("method", [{"prune": 0.5}, {"quantize": "int8"}])
def test_compress_scores_every_model_as_evaluate_does(tmp_path, method):
    """A bfloat16, channels-last run with flip TTA: the table's accuracies are those `capas evaluate`
    gives the original and the compressed run (TTA applied to both, each in its own precision)."""
    source = tmp_path / "tta"
    train(
        ModelSpec.from_dict(TINY),
        DataConfig(name="fashion-mnist", limit=1000, test_limit=300),
        TrainConfig(
            epochs=1, batch_size=64, device="cpu", precision="bfloat16", channels_last=True, tta="flip"
        ),
        source,
    )
    out, comparison = compress_run(source, **method, finetune_epochs=1, out=tmp_path / "small", repeats=FAST)
    original, compressed = comparison.measurements[0], comparison.measurements[-1]
    assert original.accuracy == pytest.approx(evaluate_run(load_run(source))[1].accuracy)
    assert compressed.accuracy == pytest.approx(evaluate_run(load_run(out))[1].accuracy)
    if "quantize" in method:  # the float ONNX graph is scored with the same views, in float32
        in_float32 = evaluate_run(dataclasses.replace(load_run(source), precision="float32"))[1].accuracy
        assert comparison.measurements[1].accuracy == pytest.approx(in_float32, abs=1 / 300)
    else:  # its drift reference in the precision serve computes its features in (it was float32)
        pruned = load_run(out)
        save_reference(
            tmp_path / "bf16.safetensors", pruned.model, run_splits(pruned).val, pruned.preprocess, "bfloat16"
        )
        assert torch.equal(
            load_reference(out / "reference.safetensors").embeddings,
            load_reference(tmp_path / "bf16.safetensors").embeddings,
        )


def test_nonzero_weights_count_the_parameters_only(tmp_path):
    """BatchNormalization's running statistics are buffers, not weights: the table said 75,370 nonzero
    weights of 75,354 parameters."""
    spec = ModelSpec.from_dict(
        {
            "name": "bn",
            "input_shape": [8, 8, 1],
            "layers": [
                {"Conv2D": {"filters": 4, "kernel_size": 3}},
                "BatchNormalization",
                "Flatten",
                {"Dense": {"units": 3}},
            ],
        }
    )
    model = build_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    model.layers["batch_normalization"].running_mean.fill_(0.1)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"0")
    test = ArrayDataset(
        torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), ("a", "b", "c")
    )
    (measured,) = measure([Candidate("bn", model, weights)], test, Preprocess(size=(8, 8), channels=1), FAST)
    assert measured.nonzero == measured.parameters == 4 * 9 + 4 + 2 * 4 + 6 * 6 * 4 * 3 + 3


def test_batch_64_latency_is_timed_on_64_images_from_a_small_test_split(tmp_path):
    """With fewer than 64 test images, 'batch 64' was timed on as many as there were."""
    model = build_model(ModelSpec.from_dict({**PRUNABLE, "input_shape": [8, 8, 1]}))
    batches = []
    model.register_forward_pre_hook(lambda module, inputs: batches.append(len(inputs[0])))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"0")
    test = ArrayDataset(
        torch.zeros(20, 1, 8, 8, dtype=torch.uint8), torch.zeros(20, dtype=torch.int64), tuple("abcd")
    )
    measure([Candidate("m", model, weights, accuracy=1.0)], test, Preprocess(size=(8, 8), channels=1), FAST)
    assert sorted(set(batches)) == [1, 64]


def test_unstructured_pruning_says_zeros_change_nothing_by_themselves(run_dir, tmp_path):
    # a `trainable: false` layer lost half its weights to --unstructured (fine-tuning cannot train them
    # back), where --structured keeps it whole
    source = tmp_path / "frozen"
    shutil.copytree(run_dir, source)
    spec = json.loads((source / "model.json").read_text())
    spec["layers"][0]["Conv2D"]["trainable"] = False
    (source / "model.json").write_text(json.dumps(spec))
    out = tmp_path / "sparse"
    result = runner.invoke(
        app,
        [
            "compress",
            str(source),
            "--prune",
            "0.5",
            "--unstructured",
            "--finetune-epochs",
            "0",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "compress.json").read_text())
    original, pruned = data["measurements"]
    assert pruned["parameters"] == original["parameters"] and pruned["bytes"] == original["bytes"]
    assert 0.45 < 1 - pruned["nonzero"] / original["nonzero"] < 0.55  # the classifier's 330 weights are kept
    assert "no smaller" in data["notes"][0] and "no smaller" in (out / "compress.md").read_text()
    assert load_run(out).model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    pruned_layers, source_layers = load_run(out).model.layers, load_run(source).model.layers
    assert torch.equal(pruned_layers["conv2d"].conv.weight, source_layers["conv2d"].conv.weight)
    assert (pruned_layers["conv2d_1"].conv.weight == 0).float().mean() == 0.5
    assert "frozen layers kept whole" in data["notes"][0] and "frozen layers" in data["settings"]["scope"]


@pytest.mark.parametrize("amount", ["0", "1", "1.5", "-0.2"])
def test_prune_amount_outside_zero_one(run_dir, tmp_path, amount):
    before = hashes(run_dir)
    fails_cleanly(
        ["compress", str(run_dir), "--prune", amount, "--out", str(tmp_path / "x")],
        "strictly between 0 and 1",
    )
    assert hashes(run_dir) == before and not (tmp_path / "x").exists()


def test_method_choice_is_checked(run_dir, tmp_path):
    fails_cleanly(["compress", str(run_dir)], "choose one method")
    fails_cleanly(["compress", str(run_dir), "--quantize", "int8", "--prune", "0.5"], "choose one method")
    fails_cleanly(["compress", str(run_dir), "--quantize", "int4"], "allowed int8, dynamic")
    fails_cleanly(["export", str(run_dir)], "--onnx")
    taken = tmp_path / "taken"
    taken.mkdir()
    fails_cleanly(["compress", str(run_dir), "--prune", "0.5", "--out", str(taken)], "already exists")


def test_compress_with_data_records_the_dataset_it_tested_on(run_dir, tmp_path):
    """With --data, the new run's config.json kept the source's dataset and splits (here 400 test
    images), so `capas evaluate` of it disagreed with its own test.json (measured on the 200 of --data)."""
    data = DataConfig(name="fashion-mnist", limit=1000, test_limit=200)
    out, _ = compress_run(
        run_dir,
        prune=0.5,
        structured=False,
        finetune_epochs=0,
        out=tmp_path / "small",
        data=data,
        repeats=FAST,
    )
    run = load_run(out)
    config = run.read_json("config.json")
    assert config["data"] == data.model_dump(mode="json")
    # and the splits it holds (config.json and serve's /info said the source's: 400 test images)
    assert config["splits"] == splits_for(data).info and config["splits"]["sizes"]["test"] == 200
    _, evaluation = evaluate_run(run)
    assert len(evaluation.labels) == 200
    assert evaluation.accuracy == pytest.approx(run.read_json("test.json")["test_accuracy"])


def test_compress_out_under_a_file_is_one_message(run_dir, tmp_path):
    (tmp_path / "file").write_text("")
    fails_cleanly(
        ["compress", str(run_dir), "--prune", "0.5", "--out", str(tmp_path / "file" / "small")],
        "cannot create the run directory",
        "file",
    )
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


@pytest.mark.parametrize("flag", [["--unstructured"], ["--structured"], ["--finetune-epochs", "3"]])
def test_pruning_options_with_quantize_are_refused(run_dir, tmp_path, flag):
    """--quantize int8 --finetune-epochs 3 (or --unstructured) quantized as if the option were not there."""
    out = tmp_path / "int8"
    fails_cleanly(
        ["compress", str(run_dir), "--quantize", "int8", *flag, "--out", str(out)],
        "--prune's options",
        flag[0],
    )
    assert not out.exists()


def test_tampered_run_directories_are_refused_and_left_alone(run_dir, tmp_path):
    truncated = tmp_path / "truncated"
    shutil.copytree(run_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    before = hashes(truncated)
    fails_cleanly(
        ["compress", str(truncated), "--quantize", "int8"], "model.safetensors", "unreadable weights"
    )
    fails_cleanly(["export", str(truncated), "--onnx"], "unreadable weights")
    assert hashes(truncated) == before and not (tmp_path / "truncated-int8").exists()

    mismatched = tmp_path / "mismatched"
    shutil.copytree(run_dir, mismatched)
    spec = json.loads((mismatched / "model.json").read_text())
    spec["layers"][1]["Conv2D"]["filters"] = 12
    (mismatched / "model.json").write_text(json.dumps(spec))
    before = hashes(mismatched)
    fails_cleanly(["compress", str(mismatched), "--prune", "0.5"], "do not fit the architecture")
    assert hashes(mismatched) == before


def test_tampered_onnx_run_is_refused(run_dir, tmp_path):
    out, _ = compress_run(run_dir, quantize="dynamic", out=tmp_path / "dyn", repeats=FAST)
    model = out / "model.onnx"
    model.write_bytes(model.read_bytes()[:500])
    with pytest.raises(CapasError, match="not a loadable ONNX model"):
        load_run(out)
    (out / "runtime.json").write_text(json.dumps({"runtime": "onnxruntime", "model": "../elsewhere.onnx"}))
    fails_cleanly(["evaluate", str(out)], "runtime.json")


def test_unsupported_layer_for_structured_pruning(run_dir, tmp_path):
    layer, named = {"GroupNormalization": {"groups": 4}}, "GroupNormalization"
    data = dict(TINY, layers=[*TINY["layers"][:2], layer, *TINY["layers"][2:]])
    spec = ModelSpec.from_dict(data)
    source = load_run(run_dir)
    grouped = tmp_path / "grouped"
    write_run(
        grouped,
        spec=spec,
        model=build_model(spec, seed=0),
        preprocess=source.preprocess,
        classes=source.classes,
        config=source.read_json("config.json"),
        history=[],
        test=None,
    )
    before = hashes(grouped)
    fails_cleanly(["compress", str(grouped), "--prune", "0.5"], named, "--unstructured")
    assert hashes(grouped) == before and not (tmp_path / "grouped-pruned50s").exists()


def test_a_study_can_list_compression_as_a_change(run_dir, tmp_path):
    from capas.study.spec import KINDS, Draft

    draft = Draft(spec={}, layers=[], train={}, data={}, base_names=[])
    with pytest.raises(CapasError, match="strictly between 0 and 1"):
        KINDS["compress"].apply(draft, {"prune": 2})
    with pytest.raises(CapasError, match="unknown key"):
        KINDS["compress"].apply(draft, {"quantise": "int8"})
    KINDS["compress"].apply(draft, {"quantize": "dynamic"})
    trained = tmp_path / "variant"
    shutil.copytree(run_dir, trained)
    metrics = KINDS["compress"].after_train(trained, draft.extras["compress"])
    assert metrics["method"] == "quantize-dynamic" and metrics["size_ratio"] > 3.0
    assert (
        Path(metrics["run"]).name == "variant-dynamic"
        and load_run(metrics["run"]).classes == load_run(run_dir).classes
    )


@pytest.mark.parametrize("fmt", ["--onnx", "--keras"])
def test_export_out_that_cannot_be_a_file_is_refused_before_any_work(run_dir, tmp_path, fmt):
    before = hashes(run_dir)
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    name = "model.onnx" if fmt == "--onnx" else "model.keras"
    for out, words in [
        (tmp_path, ("--out", "is a directory", name)),
        (tmp_path / "notes.txt" / name, ("--out", "notes.txt is not a folder")),
    ]:
        result = fails_cleanly(["export", str(run_dir), fmt, "--out", str(out)], *words)
        assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no temporary left behind
    assert hashes(run_dir) == before


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux' /proc, where no file can be made")
@pytest.mark.parametrize("fmt", ["--onnx", "--keras"])
def test_export_to_a_folder_that_refuses_files_is_one_message(run_dir, fmt):
    fails_cleanly(["export", str(run_dir), fmt, "--out", "/proc/capas-model"], "/proc/capas-model")


PRUNABLE = {
    "name": "p",
    "input_shape": [12, 12, 1],
    "layers": [
        {"Conv2D": {"filters": 8, "kernel_size": 3, "activation": "relu"}},
        {"Conv2D": {"filters": 32, "kernel_size": 3, "activation": "relu"}},
        "Flatten",
        {"Dense": {"units": 16}},
        {"Dense": {"units": 4}},
    ],
}


@pytest.mark.parametrize(
    ("amount", "channels"),
    [(0.5, "4/16/8/4"), (0.85, "1/5/2/4"), (0.9, "1/3/2/4"), (0.95, "1/2/1/4"), (0.99, "1/1/1/4")],
)
def test_structured_pruning_rounds_each_layer_and_keeps_one_channel(amount, channels):
    """torch-pruning skipped a layer whose kept count rounded down to 0: at 0.9 the 8-filter layer
    stayed whole, at 0.99 nothing was pruned."""
    from capas.deploy.prune import _channels, _classifier

    spec = ModelSpec.from_dict(PRUNABLE)
    model = build_model(spec, seed=0)
    _, pruned_spec = _prune_structured(model, spec, amount, _classifier(model))
    assert _channels(pruned_spec) == channels


def test_structured_pruning_keeps_frozen_layers_whole():
    """A frozen layer after the first was cut by --prune itself: 8 -> 4 filters at 0.5; then, given
    no ratio, it kept its filters but lost the input channels of the layer before it, which was
    pruned (weights (32, 8, 3, 3) -> (32, 4, 3, 3)), weights fine-tuning cannot adapt. The layer that
    feeds a frozen one now keeps its outputs."""
    from capas.deploy.prune import _channels, _classifier

    layers = list(PRUNABLE["layers"])
    layers[1] = {"Conv2D": {"filters": 32, "kernel_size": 3, "activation": "relu", "trainable": False}}
    spec = ModelSpec.from_dict({**PRUNABLE, "layers": layers})
    model = build_model(spec, seed=0)
    name = spec.layer_infos()[1].name
    frozen = model.layers[name].conv.weight.detach().clone()
    pruned, pruned_spec = _prune_structured(model, spec, 0.5, _classifier(model))
    assert _channels(pruned_spec) == "8/32/8/4"
    assert not pruned_spec.layers[1].trainable
    assert torch.equal(pruned.layers[name].conv.weight, frozen)


@pytest.mark.parametrize("structured", [True, False])
def test_pruning_a_model_whose_only_prunable_layers_are_frozen_is_refused(structured):
    from capas.deploy.prune import check_prunable

    layers = [{"Conv2D": {"filters": 8, "kernel_size": 3, "trainable": False}}, "Flatten", TINY["layers"][-1]]
    with pytest.raises(
        CapasError, match="nothing to prune: every Conv2D/Dense layer but the classifier is frozen"
    ):
        check_prunable(ModelSpec.from_dict({**TINY, "layers": layers}), structured)


def test_structured_pruning_that_would_remove_nothing_is_refused():
    from capas.deploy.prune import _classifier

    spec = ModelSpec.from_dict(PRUNABLE)
    model = build_model(spec, seed=0)
    with pytest.raises(CapasError, match=r"--prune 0.01: removes no channel.*8/32/16/4"):
        _prune_structured(model, spec, 0.01, _classifier(model))


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs dataset-fashion-mnist"
)
def test_compress_and_export_look_for_the_recorded_dataset_in_data_dir(run_dir, tmp_path):
    """A run whose recorded data_dir has moved: --data-dir without --data was ignored by compress and
    export (`data_dir (--data-dir) …: no such folder`), though evaluate takes it; --data instead lost
    the run's limits (tested on another test split)."""
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    config = json.loads((moved / "config.json").read_text())
    config["data"]["data_dir"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    files = tmp_path / "files"
    files.mkdir()
    for path in Path("/usr/share/datasets/fashion-mnist").glob("*.gz"):
        (files / path.name).symlink_to(path)
    result = runner.invoke(app, ["export", str(moved), "--onnx", "--data-dir", str(files)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "small"
    result = runner.invoke(
        app, ["compress", str(moved), "--quantize", "dynamic", "--data-dir", str(files), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["data"] == {**config["data"], "data_dir": str(files)}  # the run's limits kept
    assert sum(map(sum, json.loads((out / "test.json").read_text())["confusion_matrix"])) == 400


def test_export_keras_refuses_data_dir(run_dir, tmp_path):
    """--keras uses no dataset: --data-dir was ignored without a word (--data was refused)."""
    fails_cleanly(
        ["export", str(run_dir), "--keras", "--data-dir", str(tmp_path), "--out", str(tmp_path / "m.keras")],
        "--data-dir",
        "--onnx",
    )
    assert not (tmp_path / "m.keras").exists()


def test_dynamic_quantization_of_a_model_without_dense_layers_is_refused(tmp_path):
    """It quantized nothing, and the note said the graph's Conv nodes ran 'as int8 kernels'."""
    spec = ModelSpec.from_dict(
        {
            "name": "all-conv",
            "input_shape": [28, 28, 1],
            "layers": [
                {"Conv2D": {"filters": 4, "kernel_size": 3, "activation": "relu"}},
                {"Conv2D": {"filters": 10, "kernel_size": 1}},
                "GlobalAveragePooling2D",
            ],
        }
    )
    source, data = tmp_path / "source", DataConfig(name="fashion-mnist", limit=300, test_limit=100)
    write_run(
        source,
        spec=spec,
        model=build_model(spec),
        preprocess=Preprocess(size=(28, 28), channels=1),
        classes=splits_for(data).test.classes,
        config={"data": data.model_dump(mode="json")},
        history=None,
        test=None,
    )
    out = tmp_path / "dynamic"
    fails_cleanly(["compress", str(source), "--quantize", "dynamic", "--out", str(out)], "Dense", "int8")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_pruning_a_run_trained_on_a_gpu_fine_tunes_on_this_machine(run_dir, tmp_path):
    """A run trained with --device cuda, pruned on a CPU-only machine: fine-tuning failed with 'device
    'cuda': no CUDA GPU is available here; use auto or cpu', an option compress does not have."""
    moved = tmp_path / "gpu"
    shutil.copytree(run_dir, moved)
    config = json.loads((moved / "config.json").read_text())
    config["train"]["device"] = "cuda"
    (moved / "config.json").write_text(json.dumps(config))
    out, _ = compress_run(moved, prune=0.5, finetune_epochs=1, out=tmp_path / "pruned", repeats=FAST)
    assert json.loads((out / "config.json").read_text())["train"]["device"] == "auto"


@pytest.mark.parametrize(
    "args, words",
    [
        ({"quantize": "int8", "finetune_epochs": 3}, "quantize takes neither"),
        ({"quantize": "int8", "structured": False}, "quantize takes neither"),
        ({"prune": 0.5, "structured": "no"}, "structured must be true or false"),
    ],
)
def test_a_study_refuses_compress_options_that_would_be_ignored(args, words):
    """As `capas compress` refuses them: a study quantized as if they were not there, and took the
    string 'no' for structured pruning."""
    from capas.study.spec import KINDS, Draft

    draft = Draft(spec={}, layers=[], train={}, data={}, base_names=[])
    with pytest.raises(CapasError, match=words):
        KINDS["compress"].apply(draft, args)


def test_the_default_out_of_a_run_named_by_dot_or_dot_dot_lies_beside_it(tmp_path, monkeypatch):
    """`capas compress .` from inside a run was a ValueError traceback ('.' has an empty name);
    `compress ..` named the new run '..-int8' inside the current folder."""
    from capas.deploy.compress import default_out

    (tmp_path / "run" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "run")
    assert default_out(Path("."), None, 0.5, True) == tmp_path / "run-pruned50s"
    monkeypatch.chdir(tmp_path / "run" / "sub")
    assert default_out(Path(".."), "int8", None, True) == tmp_path / "run-int8"
    assert default_out(Path("../sub/.."), "int8", None, True) == tmp_path / "run-int8"
    assert default_out(Path("../sub"), "int8", None, True) == Path("../sub-int8")  # named: kept as given


def test_export_onnx_out_must_end_in_onnx(run_dir, tmp_path):
    """--out RUN/model.safetensors replaced the run's weights with the ONNX graph: the run no longer loaded."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = hashes(run)
    fails_cleanly(
        ["export", str(run), "--onnx", "--out", str(run / "model.safetensors")],
        "must end in .onnx",
        str(run / "model.onnx"),
    )
    assert hashes(run) == before


def test_compress_onto_an_existing_out_says_what_to_change(run_dir, tmp_path):
    """With --out given, the refusal said "pass --out to write elsewhere"."""
    fails_cleanly(
        ["compress", str(run_dir), "--prune", "0.5", "--out", str(run_dir)],
        "already exists; choose another --out or remove it",
    )


@pytest.mark.parametrize(
    "command", [["export", "--onnx"], ["export", "--keras"], ["compress", "--quantize", "dynamic"]]
)
def test_export_and_compress_of_a_run_being_trained_into_are_refused(run_dir, tmp_path, command):
    """`capas export RUN` (or compress) while `capas train --restart --out RUN` ran: the training's end
    replaced the folder whole, and the export, which had loaded the old model, then wrote the old model's
    file into the new run (seen: RUN/model.onnx 0.86 off the run's own logits); compress wrote a
    lineage.json naming the new weights beside a model compressed from the old ones. They now hold the
    run's lock (shared), which the training holds exclusively: refused, naming it; and the reverse."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = hashes(run)
    holder = subprocess.Popen(  # a real process holding the lock `capas train --out RUN` takes
        [sys.executable, "-c", HOLD, str(run), "exclusive"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        words = ("this run directory is in use by", f"pid {holder.pid}")
        fails_cleanly([command[0], str(run), *command[1:]], *words)
    finally:
        holder.kill()
        holder.wait()
    assert hashes(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    reader = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run), "shared"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert reader.stdout.readline() == "held\n"
        refused = pytest.raises(CapasError, match=f"this run directory is in use by pid {reader.pid}")
        with refused, exclusive(run, "run directory"):  # a training into it
            pass
        with exclusive(run, "run directory", shared=True):  # another reader: at the same time
            pass
    finally:
        reader.kill()
        reader.wait()
