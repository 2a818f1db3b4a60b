"""Depthwise weight gradients on small maps: PyTorch's own against grown maps and against capas' kernel.

oneDNN's CPU weight gradient of a depthwise convolution can take a slow path where the feature map is
smaller than the kernel, as in EfficientNet-Lite0's last stages on small images: on a CPU with AVX2 and
without AVX-512 for every such kernel, with AVX-512 for 3×3 kernels. capas.train.depthwise grows such
maps with zeros to the kernel's size first, where that pays on this kind of CPU; with AVX-512 and
`compile: frozen`, it computes wide kernels' weight gradients on small maps by an Inductor kernel of its
own. Three measurements (`--tables`), each side by side in one process:

1. each depthwise convolution of EfficientNet-Lite0 at `--size` whose map is smaller than its kernel:
   its weight gradient at batch `--batch`, channels-last, in float32, PyTorch's own against on grown
   maps (median of `--repeats` interleaved repeats of `--calls` calls each), and whether capas grows
   it on this CPU;
2. the training step of examples/studies/frozen-layers.yaml's network (EfficientNet-Lite0 at 64×64,
   GlobalAveragePooling2D, Dense(10); seed 003's question) with its backbone's last blocks trainable,
   through capas' `fit` in float32 on CIFAR-10 images: 2 epochs of `--batches` batches, the second
   timed, as capas trains it and with the growth turned off (in this process, for the comparison only);
3. each depthwise convolution with a kernel over 3×3 of EfficientNet-Lite0 at 160×160 (the
   cifar10-transfer preset, whose fine-tuning trains the last ones), as its training step calls it
   (padded as TensorFlow pads): its weight gradient at batch 128 from bfloat16 activations and
   gradients, by oneDNN in float32 (conversions included, as capas computes it without the kernel)
   against capas.train.depthwise.WeightGradKernel (compiled first, as `compile: frozen` does), and
   whether `shift_pays` gives it to the kernel on this CPU.

    python benchmarks/depthwise.py [--size 64] [--repeats 5] [--tables maps training kernel]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from rich.console import Console
from rich.table import Table
from torch.overrides import TorchFunctionMode

import capas.train.depthwise
from capas.data import make_splits
from capas.models import build_model, preprocess_for
from capas.runs import machine_line
from capas.spec import ModelSpec, TrainConfig, load_document, load_spec
from capas.train import fit

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg" / "train"
STUDY = ROOT / "examples" / "studies" / "frozen-layers.yaml"
TRANSFER = ROOT / "examples" / "recipes" / "cifar10-transfer.yaml"
KERNEL_WAYS = ("oneDNN, float32", "capas' kernel")
TRANSFER_BATCH = 128  # the preset's
WAYS = ("PyTorch's own", "grown maps")
STEP_WAYS = ("PyTorch's own", "capas")
ANY_CPU = frozenset()  # growth()'s rule without AVX-512: every map smaller than its kernel
FROZEN = {"block6-unfrozen": 12, "block5-unfrozen": 9, "none-frozen": "none"}


def study_spec(size: int, frozen: int | str) -> ModelSpec:
    document = load_document(STUDY)["base"]["spec"]
    document["input_shape"] = [size, size, 3]
    document["backbone"]["frozen"] = frozen
    return ModelSpec.from_dict(document)


def small_map_convolutions(size: int) -> list[tuple[str, torch.Size, torch.nn.Conv2d]]:
    """(name, input shape at batch 1, module) of the network's depthwise convolutions on maps smaller
    than their kernel."""
    model = build_model(study_spec(size, "all"), seed=0, pretrained=False)
    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d) and module.groups == module.in_channels > 1:
            module.register_forward_hook(
                lambda m, args, out, name=name: found.append((name, args[0].shape, m))
            )
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    return [
        (name, shape, m)
        for name, shape, m in found
        if capas.train.depthwise.growth(shape, m.weight.shape, list(m.stride), list(m.dilation), ANY_CPU)
    ]


def weight_grad(module: torch.nn.Conv2d, x: torch.Tensor, grad: torch.Tensor, grown: bool) -> torch.Tensor:
    padding, groups = list(module.padding), module.groups
    if grown:
        grow = capas.train.depthwise.growth(x.shape, module.weight.shape, [1, 1], [1, 1], ANY_CPU)
        return capas.train.depthwise.grown_weight_grad(
            grad, x, module.weight, padding, groups, grow, torch.channels_last
        )
    return torch.ops.aten.convolution_backward(
        grad, x, module.weight, None, [1, 1], padding, [1, 1], False, [0, 0], groups, [False, True, False]
    )[1]


def time_convolutions(console: Console, args: argparse.Namespace) -> None:
    rows = []
    for name, shape, module in small_map_convolutions(args.size):
        x = torch.randn(args.batch, *shape[1:]).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            grad = torch.randn_like(module(x)).contiguous(memory_format=torch.channels_last)
        own = weight_grad(module, x, grad, False)
        error = (weight_grad(module, x, grad, True) - own).abs().max() / own.abs().max()
        times = {way: [] for way in WAYS}
        for _ in range(args.repeats):
            for way in WAYS:
                start = time.perf_counter()
                for _ in range(args.calls):
                    weight_grad(module, x, grad, way == "grown maps")
                times[way].append((time.perf_counter() - start) / args.calls * 1000)
        own, grown = (statistics.median(times[way]) for way in WAYS)
        grows = capas.train.depthwise.growth(shape, module.weight.shape, [1, 1], [1, 1]) is not None
        rows.append((name, shape, module, own, grown, error.item(), "yes" if grows else "no"))
    table = Table(
        title=f"depthwise weight gradients, EfficientNet-Lite0 at {args.size}×{args.size}, batch {args.batch}, "
        "float32, channels-last: ms per call"
    )
    for column in (
        "convolution",
        "map",
        "kernel",
        "channels",
        *WAYS,
        "speed-up",
        "largest difference ÷ largest value",
        "capas grows it",
    ):
        table.add_column(column, justify="left" if column == "convolution" else "right")
    for name, shape, module, own, grown, error, grows in rows:
        kernel = "×".join(map(str, module.kernel_size))
        table.add_row(
            name, f"{shape[2]}×{shape[3]}", kernel, str(shape[1]), f"{own:.1f}", f"{grown:.1f}",
            f"{own / grown:.2f}×", f"{error:.1e}", grows,
        )  # fmt: skip
    console.print(table)


def fit_speed(spec: ModelSpec, splits, capas_growth: bool, batch: int) -> float:
    """Training images/s of the second of two epochs of a fresh model, in float32 on the CPU."""
    cfg = TrainConfig(
        epochs=2,
        batch_size=batch,
        optimizer={"name": "adam", "lr": 1e-3, "backbone_lr_scale": 0.1},
        device="cpu",
    )
    patch = contextlib.nullcontext()
    if not capas_growth:  # the growth off, for this comparison only
        patch = mock.patch.object(capas.train.depthwise, "growth", lambda *args: None)
    with patch:
        result = fit(build_model(spec, seed=0), splits.train, splits.val, preprocess_for(spec), cfg)
    return result.history[1]["images_per_s"]


def time_training(console: Console, args: argparse.Namespace) -> None:
    batch = load_document(STUDY)["base"]["train"]["batch_size"]
    splits = make_splits(args.data, limit=round(args.batches * batch / 0.98), val_fraction=0.02)
    speeds = {(variant, way): [] for variant in FROZEN for way in STEP_WAYS}
    for _ in range(args.repeats):
        for variant, frozen in FROZEN.items():
            for way in STEP_WAYS:
                speed = fit_speed(study_spec(64, frozen), splits, way == "capas", batch)
                speeds[variant, way].append(speed)
                console.print(f"{variant} · {way}: {speed:.1f} images/s", highlight=False)
    table = Table(
        title=f"frozen-layers study's network (64×64), float32 training, batch {batch}, "
        f"{len(splits.train)} images/epoch: images/s of the second epoch"
    )
    for column in ("variant", *(f"{way} (median)" for way in STEP_WAYS), "min–max, capas", "capas ÷ own"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for variant in FROZEN:
        own, grown = (statistics.median(speeds[variant, way]) for way in STEP_WAYS)
        values = speeds[variant, "capas"]
        table.add_row(
            variant,
            f"{own:.1f}",
            f"{grown:.1f}",
            f"{min(values):.1f}–{max(values):.1f}",
            f"{grown / own:.2f}×",
        )
    console.print(table)


class _Recorded(TorchFunctionMode):
    """Records each depthwise torch.conv2d call's input shape, weight, stride and padding."""

    def __init__(self, name: list[str], calls: list):
        super().__init__()
        self.name, self.calls = name, calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d:
            x, weight, _, stride, padding, _, groups = (*args, *[None] * (7 - len(args)))
            if groups == x.shape[1] > 1 and max(weight.shape[-2:]) > 3:
                self.calls.append((self.name[0], x.shape, weight.shape, list(stride), list(padding)))
        return func(*args, **kwargs)


def transfer_calls() -> list[tuple[str, torch.Size, torch.Size, list[int], list[int]]]:
    """(module, input shape at batch 1, weight shape, stride, padding) of the preset network's
    depthwise convolutions with kernels over 3×3, as they call F.conv2d."""
    model = build_model(load_spec(TRANSFER), seed=0, pretrained=False).eval()
    name, calls = [""], []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d) and module.groups == module.in_channels > 1:
            module.register_forward_pre_hook(lambda m, args, n=module_name: name.__setitem__(0, n))
    with torch.no_grad(), _Recorded(name, calls):
        model(torch.zeros(1, 3, 160, 160))
    return calls


def kernel_way(way: str, kernel, x: torch.Tensor, grad: torch.Tensor, w: torch.Tensor, stride, padding):
    """The weight gradient one way: oneDNN from the tensors made float32 (capas without the kernel), or
    capas' kernel from the bfloat16 ones."""
    if way == "capas' kernel":
        return kernel(x, grad, tuple(w.shape[-2:]), stride, padding)
    return torch.ops.aten.convolution_backward(
        grad.float(),
        x.float(),
        w,
        None,
        stride,
        padding,
        [1, 1],
        False,
        [0, 0],
        w.shape[0],
        [False, True, False],
    )[1]


def time_kernel(console: Console, args: argparse.Namespace) -> None:
    kernel, rows = capas.train.depthwise.WeightGradKernel(), []
    for name, shape, w_shape, stride, padding in transfer_calls():
        x = torch.randn(TRANSFER_BATCH, *shape[1:]).contiguous(memory_format=torch.channels_last).bfloat16()
        w = torch.randn(w_shape)
        with torch.no_grad():
            out = torch.nn.functional.conv2d(x.float(), w, None, stride, padding, 1, w_shape[0])
        grad = torch.randn_like(out).contiguous(memory_format=torch.channels_last).bfloat16()
        own, compiled = (
            kernel_way(way, kernel, x, grad, w, stride, padding) for way in KERNEL_WAYS
        )  # compiles
        error = ((compiled - own).abs().max() / own.abs().max()).item()
        times = {way: [] for way in KERNEL_WAYS}
        for _ in range(args.repeats):
            for way in KERNEL_WAYS:
                start = time.perf_counter()
                for _ in range(args.calls):
                    kernel_way(way, kernel, x, grad, w, stride, padding)
                times[way].append((time.perf_counter() - start) / args.calls * 1000)
        pays = capas.train.depthwise.shift_pays(shape, w_shape, stride, padding, [1, 1])
        rows.append(
            (
                name,
                shape,
                out.shape,
                w_shape,
                stride,
                *(statistics.median(times[way]) for way in KERNEL_WAYS),
                error,
                pays,
            )
        )
    table = Table(
        title=f"depthwise weight gradients, EfficientNet-Lite0 at 160×160, batch {TRANSFER_BATCH}, bfloat16 "
        "activations, channels-last: ms per call"
    )
    for column in ("convolution", "input", "output", "kernel", "stride", "channels", *KERNEL_WAYS, "speed-up",
                   "largest difference ÷ largest value", "capas' kernel computes it"):  # fmt: skip
        table.add_column(column, justify="left" if column == "convolution" else "right")
    for name, shape, out, w_shape, stride, own, compiled, error, pays in rows:
        table.add_row(
            name, f"{shape[2]}×{shape[3]}", f"{out[2]}×{out[3]}", "×".join(map(str, w_shape[-2:])), str(stride[0]),
            str(shape[1]), f"{own:.1f}", f"{compiled:.1f}", f"{own / compiled:.2f}×", f"{error:.1e}",
            "yes" if pays else "no",
        )  # fmt: skip
    console.print(table)


TABLES = {"maps": time_convolutions, "training": time_training, "kernel": time_kernel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", type=int, default=64, help="the network's input side for the per-convolution table"
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=16, help="training batches per epoch")
    parser.add_argument("--data", default=f"folder:{CIFAR}")
    parser.add_argument(
        "--tables", nargs="+", choices=TABLES, default=list(TABLES), help="the measurements to run"
    )
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 140)
    for name in args.tables:
        TABLES[name](console, args)
    console.print(f"{machine_line()}; median of {args.repeats} repeats", highlight=False)


if __name__ == "__main__":
    main()
