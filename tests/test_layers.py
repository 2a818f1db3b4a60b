"""Every registered layer type: shape inference, Keras parameter counts and a clean forward/backward."""

from __future__ import annotations

import contextlib
import typing
from unittest import mock

import pytest
import torch

from capas.errors import CapasError
from capas.layers import LAYERS
from capas.layers.base import ACTIVATIONS
from capas.models import build_model
from capas.models.modules import ACTIVATIONS as MODULE_ACTIVATIONS
from capas.models.modules import build_module
from capas.spec import ModelSpec
from capas.spec.model import parse_layer


def test_every_registered_layer_has_an_example_and_an_activation_module():
    assert [name for name, cls in LAYERS.items() if cls.example is None] == []
    assert set(ACTIVATIONS) == set(MODULE_ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_shape_params_and_gradients(name):
    keywords, shape = LAYERS[name].example
    layer = LAYERS[name](**keywords)
    out_shape = layer.output_shape(shape)
    module = build_module(layer, shape)
    module.train()
    x = torch.randn(3, shape[-1], *shape[:-1]) if len(shape) == 3 else torch.randn(3, *shape)
    x.requires_grad_(True)
    y = module(x)
    expected = (3, out_shape[-1], *out_shape[:-1]) if len(out_shape) == 3 else (3, *out_shape)
    assert tuple(y.shape) == expected
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    trainable, non_trainable = layer.params(shape)
    assert trainable == sum(p.numel() for p in module.parameters())
    # Keras counts BatchNormalization's moving mean and variance as non-trainable parameters.
    assert non_trainable == sum(b.numel() for n, b in module.named_buffers() if "running" in n)


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding", "expected"),
    [
        (32, 3, 1, "valid", 30),
        (32, 3, 1, "same", 32),
        (32, 3, 2, "same", 16),
        (7, 3, 2, "same", 4),
        (7, 3, 2, "valid", 3),
        (8, 2, 2, "valid", 4),
        (7, 2, 2, "same", 4),
        (28, 5, 3, "valid", 8),
    ],
)
def test_conv_output_sizes_follow_keras(size, kernel, stride, padding, expected):
    layer = LAYERS["Conv2D"](filters=1, kernel_size=kernel, strides=stride, padding=padding)
    assert layer.output_shape((size, size, 1))[:2] == (expected, expected)
    y = build_module(layer, (size, size, 1))(torch.randn(1, 1, size, size))
    assert tuple(y.shape[2:]) == (expected, expected)


@pytest.mark.parametrize(
    ("size", "kernel", "stride"), [(8, 3, 1), (8, 5, 1), (8, 2, 1), (8, 3, 2), (7, 3, 2)]
)
def test_same_convolution_pads_inside_when_symmetric_and_matches_tensorflows_padding(size, kernel, stride):
    layer = LAYERS["Conv2D"](filters=2, kernel_size=kernel, strides=stride, padding="same")
    module = build_module(layer, (size, size, 3))
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    conv = module.conv
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)  # TensorFlow: the extra pixel goes last
    before = total // 2
    expected = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (before, total - before, before, total - before)),
        conv.weight,
        conv.bias,
        stride,
    )
    assert torch.allclose(module(x), expected, atol=1e-6)
    # symmetric padding is the convolution's own (no padded copy of the input), asymmetric a Pad2d before it
    assert ("pad" in module._modules) == (total % 2 == 1)


def test_same_max_pooling_ignores_padding_and_average_pooling_does_not_count_it():
    x = -torch.ones(1, 1, 3, 3)  # all negative: zero padding would leak into a max
    assert build_module(LAYERS["MaxPooling2D"](pool_size=2, padding="same"), (3, 3, 1))(x).max() == -1
    assert torch.allclose(
        build_module(LAYERS["AveragePooling2D"](pool_size=2, padding="same"), (3, 3, 1))(x),
        -torch.ones(1, 1, 2, 2),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_global_max_pooling_on_a_cpu_gives_the_maximum_and_its_gradient_in_the_input_layout(dtype):
    # ties included: bfloat16 maps of rounded values, the first maximum of each map gets the gradient
    x = (torch.randn(4, 8, 5, 5) * 4).round().to(dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = build_module(LAYERS["GlobalMaxPooling2D"](), (5, 5, 8))(x)
    g = torch.randn(4, 8).to(dtype)
    y.backward(g)
    values, first = x.detach().flatten(2).max(dim=2)
    assert torch.equal(y, values)
    expected = torch.zeros(4, 8, 25, dtype=dtype).scatter_(2, first[..., None], g[..., None]).view(4, 8, 5, 5)
    assert torch.equal(x.grad, expected)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_on_a_cpu_keeps_each_value_with_one_minus_rate_and_scales_it_once(dtype):
    module = build_module(LAYERS["Dropout"](rate=0.25), (16, 16, 64))
    x = (torch.randn(64, 64, 16, 16) + 3).to(dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    torch.manual_seed(0)
    y = module(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.002  # 1,048,576 draws: σ = 0.0004
    # the kept values are x scaled by 1/(1 − rate), rounded once, as torch's own dropout rounds them
    assert torch.equal(y[kept], (x.detach()[kept].float() * (1 / 0.75)).to(dtype))
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, (kept * (1 / 0.75)).to(dtype))
    torch.manual_seed(0)
    assert torch.equal(module(x), y)  # the global generator draws the mask: seeded runs repeat
    assert torch.equal(module.eval()(x), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_moved_after_max_pooling_computes_the_same_values_and_gradients(dtype):
    """Conv2D(relu) → MaxPooling2D (padding same) and Activation(relu) → GlobalMaxPooling2D: while
    `relu_after_pooling` lasts the ReLU runs after the pooling, and values and gradients equal those
    in the spec's order, exactly, on integer inputs and weights where maxima tie and whole windows
    are ≤ 0; after it the layers are as built."""
    spec = ModelSpec.from_dict(
        {
            "name": "relu-pool",
            "input_shape": [9, 9, 2],
            "layers": [
                {"Conv2D": {"filters": 6, "kernel_size": 2, "activation": "relu"}},
                {"MaxPooling2D": {"pool_size": 3, "strides": 2, "padding": "same"}},
                {"Conv2D": {"filters": 5, "kernel_size": 2}},
                {"Activation": {"activation": "relu"}},
                "GlobalMaxPooling2D",
                {"Dense": {"units": 3}},
            ],
        }
    )
    model = build_model(spec, seed=0)
    as_built = str(model)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-2, 3, p.shape))
    model.to(dtype)
    x = torch.randint(-3, 4, (8, 2, 9, 9)).to(dtype)
    g = torch.linspace(-1, 1, 24).view(8, 3).to(dtype)
    outputs, grads = [], []
    for moved in (False, True):
        model.zero_grad()
        with model.relu_after_pooling() if moved else contextlib.nullcontext():
            layers = model.layers
            assert hasattr(layers["conv2d"], "act") is not moved
            assert (type(layers["activation"]) is torch.nn.Identity) is moved
            assert (type(layers["global_max_pooling2d"][-1]) is torch.nn.ReLU) if moved else True
            y = model(x)
            y.backward(g)
        outputs.append(y.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert torch.equal(*outputs)
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    assert str(model) == as_built


def test_fit_trains_with_relu_after_pooling_and_leaves_the_layers_as_built(tiny_spec):
    from capas.data import ArrayDataset
    from capas.models import preprocess_for
    from capas.spec import TrainConfig
    from capas.train import fit

    spec = tiny_spec  # Conv2D(relu) → MaxPooling2D
    model = build_model(spec, seed=0)
    seen = []
    original = type(model.layers["max_pooling2d"]).forward

    def spy(self, x):
        seen.append([type(m).__name__ for m in self])
        return original(self, x)

    data = ArrayDataset(
        torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8), torch.arange(64) % 2, ("a", "b")
    )
    with mock.patch.object(type(model.layers["max_pooling2d"]), "forward", spy):
        fit(model, data, data, preprocess_for(spec), TrainConfig(epochs=1, batch_size=32, device="cpu"))
    assert ["Sequential", "ReLU"] in seen  # the pooling wrapped with the ReLU during training
    assert hasattr(model.layers["conv2d"], "act") and len(model.layers["max_pooling2d"]) == 1


def test_flatten_uses_keras_channel_last_order():
    x = torch.arange(2 * 2 * 3, dtype=torch.float32).view(1, 3, 2, 2)  # (B, C, H, W)
    y = build_module(LAYERS["Flatten"](), (2, 2, 3))(x)
    assert y[0, :3].tolist() == [x[0, 0, 0, 0], x[0, 1, 0, 0], x[0, 2, 0, 0]]


def test_layer_normalization_normalises_over_channels_only():
    y = build_module(LAYERS["LayerNormalization"](), (4, 4, 8))(torch.randn(2, 8, 4, 4) * 5 + 3)
    assert torch.allclose(y.mean(1), torch.zeros(2, 4, 4), atol=1e-5)


def test_group_normalization_with_one_group_per_channel_is_instance_normalization():
    x = torch.randn(2, 4, 5, 5) * 3 + 1
    y = build_module(LAYERS["GroupNormalization"](groups=4), (5, 5, 4))(x)
    assert torch.allclose(y.mean((2, 3)), torch.zeros(2, 4), atol=1e-5)


FLOAT_KEYWORDS = [
    (name, keyword)
    for name, cls in sorted(LAYERS.items())
    for keyword, field in cls.model_fields.items()
    if float in (field.annotation, *typing.get_args(field.annotation))
]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(("name", "keyword"), FLOAT_KEYWORDS)
def test_every_float_keyword_must_be_finite(name, keyword, value):
    """`Rescaling: {scale: .nan}` or `BatchNormalization: {epsilon: .inf}` passed the summary and
    trained a model of NaNs."""
    keywords, _ = LAYERS[name].example
    with pytest.raises(
        CapasError, match=f"^layer 0 \\({name}\\): keyword '{keyword}': Input should be a finite number"
    ):
        parse_layer(0, {name: {**keywords, keyword: value}})


@pytest.mark.parametrize(
    ("name", "keywords"),
    [
        ("Dense", {"units": True}),
        ("Conv2D", {"filters": True, "kernel_size": 3}),
        ("Conv2D", {"filters": 4, "kernel_size": [True, 3]}),
        ("MaxPooling2D", {"strides": [2, True]}),
        ("GroupNormalization", {"groups": True}),
    ],
)
def test_a_boolean_is_not_a_count(name, keywords):
    """pydantic takes true for 1: `units: true` was a one-unit Dense."""
    with pytest.raises(
        CapasError, match=f"^layer 0 \\({name}\\): keyword '.*': Input should be a whole number"
    ):
        parse_layer(0, {name: keywords})


@pytest.mark.parametrize(
    ("name", "keywords"),
    [
        ("MaxPooling2D", {"strides": 2**31}),
        ("AveragePooling2D", {"pool_size": [2, 10**30], "padding": "same"}),
        ("Conv2D", {"filters": 4, "kernel_size": 3, "strides": [1, 10**30]}),
    ],
)
def test_a_size_pytorch_cannot_take_is_refused(name, keywords):
    """`strides: 1e30` passed the summary (its output is 1×1) and `capas train` was PyTorch's overflow
    traceback (its pooling takes C ints: 2**31 overflowed)."""
    with pytest.raises(
        CapasError, match=rf"^layer 0 \({name}\): keyword '\w+\.[01]': Input should be less than"
    ):
        parse_layer(0, {name: keywords})


@pytest.mark.parametrize(
    ("name", "keywords"),
    [
        ("Rescaling", {"scale": 1e300}),
        ("Rescaling", {"scale": 1.0, "offset": -1e300}),
        ("BatchNormalization", {"epsilon": 1e39}),
        ("ReLU", {"max_value": 1e300}),
    ],
)
def test_a_float_keyword_beyond_float32_is_refused(name, keywords):
    """`Rescaling: {scale: 1e300}` is finite, but infinite in the float32 model: it trained a model of
    NaNs (test loss NaN), as `.inf` did before it was refused."""
    with pytest.raises(
        CapasError, match=rf"^layer 0 \({name}\): keyword '\w+': Input should be a finite float32"
    ):
        parse_layer(0, {name: keywords})
