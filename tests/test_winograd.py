"""train.winograd: F(4×4, 3×3) convolutions in float32 CPU training, against PyTorch's own."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from pydantic import ValidationError
from torch.nn import functional as F

from capas.spec import DataConfig, ModelSpec, TrainConfig
from capas.train import fit, train
from capas.train.loop import resolved
from capas.train.winograd import Convolutions, auto, conv2d, pays


def _grads(conv, x, w, b, grad, **kwargs):
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    y = conv(x, w, b, **kwargs)
    return (y, *torch.autograd.grad(y, (x, w, b), grad))


@pytest.mark.parametrize(
    ("side", "padding"), [(6, 0), (9, 0), (12, 1), (13, "same"), (7, "valid"), (10, (1, 0))]
)
def test_forward_and_gradients_are_the_convolutions(side, padding):
    """In float64 the transforms are exact to rounding: output, input, weight and bias gradients
    equal F.conv2d's, whole tiles or not, padded or not."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, side, side + 3, dtype=torch.float64).to(memory_format=torch.channels_last)
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    y = F.conv2d(x, w, b, padding=padding)
    grad = torch.randn_like(y)
    expected = _grads(F.conv2d, x, w, b, grad, padding=padding)
    got = _grads(conv2d, x, w, b, grad, padding=padding)
    for e, g in zip(expected, got, strict=True):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_without_bias_and_from_a_contiguous_nchw_input():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 11, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, w, padding=1)
    grad = torch.randn_like(y)
    got = conv2d(x, w, padding=1)
    assert got.shape == y.shape
    torch.testing.assert_close(got, y, rtol=1e-10, atol=1e-10)
    expected = torch.autograd.grad(y, (x, w), grad)
    for e, g in zip(expected, torch.autograd.grad(got, (x, w), grad), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_a_second_derivative_is_refused_not_wrong():
    """Its backward works on the forward's saved transforms, which have no graph: a double backward
    (a gradient penalty) dropped the terms through the weights silently (norm 120,682 against 213,993)."""
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(conv2d(x, w, padding=1).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        grad_x.square().sum().backward()
    with pytest.raises(RuntimeError, match="not have been used in the graph"):  # not a wrong number either
        torch.autograd.grad(grad_x.square().sum(), w)


def test_float32_error_is_float32_rounding_at_128_channels():
    torch.manual_seed(0)
    x = torch.randn(2, 128, 14, 14).to(memory_format=torch.channels_last)
    w = torch.randn(128, 128, 3, 3) * 0.05
    b = torch.zeros(128)
    y = F.conv2d(x.double(), w.double(), padding=1)
    grad = torch.randn_like(y)
    exact = _grads(F.conv2d, x.double(), w.double(), b.double(), grad, padding=1)
    got = _grads(conv2d, x, w, b, grad.float(), padding=1)
    for e, g in zip(exact[:3], got[:3], strict=True):
        assert (g.double() - e).norm() / e.norm() < 1e-5


def _net(channels=128):
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, channels, 3, padding=1),
        torch.nn.Conv2d(channels, channels, 3, padding=1),  # eligible at 128
        torch.nn.Conv2d(channels, channels, 3, stride=2),  # strided: never
        torch.nn.Conv2d(channels, channels, 3, dilation=2),  # dilated: never
    )


def _backward_names(net, x, enabled=True):
    """The autograd node that computed each layer's output, beneath its layout permutes."""
    names = []
    with Convolutions(net).active() if enabled else contextlib.nullcontext():
        y = x
        for layer in net:
            y = layer(y)
            node = y.grad_fn
            while type(node).__name__ == "PermuteBackward0":
                node = node.next_functions[0][0]
            names.append(type(node).__name__)
    return names


def test_the_mode_computes_the_eligible_calls_that_train_in_float32():
    torch.manual_seed(0)
    net = _net()
    x = torch.randn(2, 1, 16, 16)
    assert _backward_names(net, x)[1] == "_WinogradBackward"
    assert _backward_names(net, x, enabled=False)[1] == "ConvolutionBackward0"
    small = torch.randn(2, 1, 7, 7)  # 7×7 outputs, 77% of 8×8 tiles: direct at 128 channels
    assert _backward_names(net[:2], small)[1] == "ConvolutionBackward0"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _backward_names(net, x)[1] == "ConvolutionBackward0"
    with torch.no_grad(), Convolutions(net).active():
        y = net[1](net[0](x))
    assert torch.equal(y, net[1](net[0](x)))  # no gradients: the direct convolution, bit for bit


def test_only_wide_stride_one_3x3_convolutions_are_computed_and_recorded():
    torch.manual_seed(0)
    net, other = _net(), _net()
    convolutions = Convolutions(net)
    with convolutions.active():
        other(torch.randn(2, 1, 16, 16))  # another network's weights: not this training's
        assert convolutions.used() == []
        net(torch.randn(2, 1, 16, 16))
    assert convolutions.used() == ["1"]  # not the strided, dilated or one-channel ones
    narrow = _net(64)  # narrower: direct convolution is faster (benchmarks/winograd.py)
    convolutions = Convolutions(narrow)
    with convolutions.active():
        narrow(torch.randn(2, 1, 16, 16))
    assert convolutions.used() == []


@pytest.mark.parametrize(
    ("channels", "side", "expected"),
    [
        (128, 4, True), (128, 8, True), (128, 11, True), (128, 26, True), (128, 28, True),
        (128, 7, False), (128, 9, False), (128, 13, False), (128, 3, False),
        (256, 7, True), (256, 10, True), (256, 13, True),
        (256, 3, False), (256, 5, False), (256, 6, False), (256, 9, False), (64, 16, False),
    ],
)  # fmt: skip
def test_it_pays_where_enough_of_its_tiles_outputs_are_kept(channels, side, expected):
    """benchmarks/winograd.py: a 128-channel convolution lost or drew at 7×7, 9×9 and 13×13 (56–77%
    of the 4×4 tiles' outputs kept), a 256-channel one won at 7×7 and 13×13, drew at 6×6 and 9×9
    (56%); 3×3 and 5×5 lost at both."""
    assert pays(channels, side, side) is expected


WIDE = {
    "name": "wide",
    "input_shape": [12, 12, 1],  # whole 4×4 tiles: where it pays at 128 channels
    "layers": [
        {"Conv2D": {"filters": 128, "kernel_size": 3, "padding": "same", "activation": "relu"}},
        {
            "Conv2D": {
                "name": "wide",
                "filters": 128,
                "kernel_size": 3,
                "padding": "same",
                "activation": "relu",
            }
        },
        "GlobalAveragePooling2D",
        {"Dense": {"units": 10, "activation": "softmax"}},
    ],
}


def test_training_with_winograd_follows_the_direct_training_and_records_its_layers(tmp_path):
    data = DataConfig(name="digits", limit=300, test_limit=100, val_fraction=0.2)
    cfg = dict(epochs=2, batch_size=50, optimizer={"lr": 3e-3}, precision="float32", device="cpu")
    direct = train(ModelSpec.from_dict(WIDE), data, TrainConfig(**cfg, winograd=False), tmp_path / "direct")
    wino = train(ModelSpec.from_dict(WIDE), data, TrainConfig(**cfg, winograd=True), tmp_path / "wino")
    again = train(ModelSpec.from_dict(WIDE), data, TrainConfig(**cfg, winograd=True), tmp_path / "again")
    assert wino["winograd"] == ["wide"]  # the spec's name: its first convolution has one channel in
    assert "winograd" not in direct
    assert wino["test_loss"] == pytest.approx(direct["test_loss"], rel=1e-3)
    assert wino["test_loss"] != direct["test_loss"]  # really another computation
    assert again["test_loss"] == wino["test_loss"]  # and a deterministic one


def test_a_run_resumed_after_its_last_checkpoint_records_the_layers_its_training_computed(tmp_path):
    """Killed after the checkpoint of its last epoch (while testing or writing the run directory), the
    rerun trains no step: its test.json said winograd: [] of weights trained with it."""
    from capas.data import default_preprocess, make_splits
    from capas.models import build_model

    spec = ModelSpec.from_dict(WIDE)
    splits = make_splits("digits", limit=100)
    preprocess = default_preprocess(spec.input_shape)
    cfg = TrainConfig(epochs=1, batch_size=50, precision="float32", winograd=True, device="cpu")
    ck = tmp_path / "ck.safetensors"
    first = fit(build_model(spec), splits.train, splits.val, preprocess, cfg, checkpoint=ck)
    again = fit(build_model(spec), splits.train, splits.val, preprocess, cfg, checkpoint=ck)
    assert first.winograd == again.winograd == ["wide"]


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """A run whose layers before its classifier, a backbone for the next tests, end in 128 channels
    at 12×12: one convolution from 1 channel, one eligible."""
    out = tmp_path_factory.mktemp("wide") / "run"
    layers = [
        {"Conv2D": {"name": "widen", "filters": 128, "kernel_size": 1}},
        {"Conv2D": {"name": "body", "filters": 128, "kernel_size": 3, "padding": "same"}},
        {"Conv2D": {"filters": 10, "kernel_size": 12}},  # the classifier
        "Flatten",
    ]
    spec = ModelSpec.from_dict({"name": "src", "input_shape": [12, 12, 1], "layers": layers})
    data = DataConfig(name="digits", limit=60, test_limit=20)
    train(spec, data, TrainConfig(epochs=1, batch_size=30, winograd=False, device="cpu"), out)
    return out


@pytest.mark.parametrize("frozen", ["all", 0])
def test_runs_with_a_backbone_name_the_layers_it_computed_as_the_summary_does(wide_run, tmp_path, frozen):
    """A trainable backbone's eligible convolutions are computed too (they were not), and the top
    that the feature cache trains alone (the whole backbone frozen) recorded its layer as '0.conv'."""
    top = {"Conv2D": {"name": "head", "filters": 128, "kernel_size": 3, "padding": "same"}}
    spec = ModelSpec.from_dict(
        {
            "name": "reuse",
            "input_shape": [12, 12, 1],
            "backbone": {"name": "run", "weights": str(wide_run), "frozen": frozen},
            "layers": [top, "GlobalAveragePooling2D", {"Dense": {"units": 10, "activation": "softmax"}}],
        }
    )
    data = DataConfig(name="digits", limit=60, test_limit=20)
    cfg = TrainConfig(epochs=1, batch_size=30, precision="float32", winograd=True, device="cpu")
    results = train(spec, data, cfg, tmp_path / "run")
    assert ("feature_cache" in results) is (frozen == "all")
    assert results["winograd"] == (["head"] if frozen == "all" else ["body", "head"])


def test_bfloat16_training_records_that_winograd_computed_nothing():
    from capas.data import default_preprocess, make_splits
    from capas.models import build_model

    spec = ModelSpec.from_dict(WIDE)
    splits = make_splits("digits", limit=100)
    cfg = TrainConfig(epochs=1, batch_size=50, precision="bfloat16", winograd=True, device="cpu")
    result = fit(build_model(spec), splits.train, splits.val, default_preprocess(spec.input_shape), cfg)
    assert result.winograd == []


def test_winograd_and_a_compiled_step_are_refused_together():
    with pytest.raises(ValidationError, match="winograd: true and compile: true"):
        TrainConfig(winograd=True, compile=True)
    TrainConfig(winograd=True, compile="frozen")  # a frozen backbone's graph is inference: fine
    assert resolved(TrainConfig(compile=True, precision="float32", device="cpu")).winograd is False


AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl"}


@pytest.mark.parametrize(
    ("device", "precision", "compile", "flags", "expected"),
    [
        ("cpu", "float32", False, AVX2, True),  # where benchmarks/ measured it to pay
        ("cpu", "float32", "frozen", AVX2, True),  # an inference graph of a frozen backbone only
        ("cpu", "float32", True, AVX2, False),  # a compiled step it cannot enter
        ("cpu", "bfloat16", False, AVX2, False),  # it computes nothing in bfloat16
        ("cpu", "float32", False, AVX512, False),  # not measured in float32 on AVX-512
        ("cpu", "float32", False, frozenset({"fp", "asimd", "bf16"}), False),  # Arm: not measured
        ("meta", "float32", False, AVX2, False),  # not a CPU
    ],
)  # fmt: skip
def test_auto_is_on_for_float32_training_on_cpus_with_avx2_and_without_avx512(
    device, precision, compile, flags, expected
):
    assert auto(torch.device(device), precision, compile, flags) is expected


@pytest.mark.parametrize(("flags", "computed"), [(AVX2, ["wide"]), (AVX512, None)])
def test_the_default_trains_with_winograd_where_auto_resolves_on_and_records_it(
    tmp_path, monkeypatch, flags, computed
):
    from capas import cpu

    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    cfg = TrainConfig(epochs=1, batch_size=50, precision="float32", device="cpu")
    assert cfg.winograd == "auto"
    data = DataConfig(name="digits", limit=150, test_limit=50, val_fraction=0.2)
    results = train(ModelSpec.from_dict(WIDE), data, cfg, tmp_path / "run")
    assert results.get("winograd") == computed
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["winograd"] is (computed is not None)  # as it resolved on this machine


def test_the_command_line_option_trains_with_it_and_warns_where_it_computes_nothing(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from capas.cli import app

    spec = tmp_path / "wide.yaml"
    spec.write_text(yaml.safe_dump(WIDE))
    # Winograd is a CPU computation: on a GPU machine the default device would be CUDA
    common = ["train", str(spec), "--data", "digits", "--limit", "200", "--epochs", "1", "--winograd"]
    common += ["--device", "cpu"]
    runner = CliRunner()
    result = runner.invoke(app, [*common, "--precision", "float32", "--out", str(tmp_path / "f32")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "f32" / "test.json").read_text())["winograd"] == ["wide"]
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["train"]["winograd"] is True
    result = runner.invoke(app, [*common, "--precision", "bfloat16", "--out", str(tmp_path / "bf16")])
    assert result.exit_code == 0, result.output
    assert "winograd computes float32 training on a CPU" in " ".join(result.output.split())
    assert json.loads((tmp_path / "bf16" / "test.json").read_text())["winograd"] == []
