"""Each convolution's time inside a network's training step on the CPU, as `fit` runs it.

Timing one convolution alone misleads: outside capas' kept heap (capas.cpu.kept_heap) every call
page-faults its output in anew, and alone its rate moved widely from run to run on the 2-core AVX2
machine.
This times them where they run: hooks on every Conv2d of the spec's model record when its forward
starts and ends, when its output's gradient arrives and when its weight's gradient is done (the
backward of the input, where it needs one, and of the weights is one node), through a step of the
model's forward, cross-entropy and backward — channels-last, inside the kept heap, the ReLU after
pooling as `fit` trains (the optimizer and the augmentation, which touch no convolution, left out).
Inputs are random images of the spec's shape. Median milliseconds over the timed steps, and the
rate in GFLOP/s of the direct convolution's multiply-adds (padding's zeros counted). In float32, or
with `--precision bfloat16` under bfloat16 autocast as `fit` trains where the CPU has AVX512-BF16.

    python benchmarks/conv_in_step.py [SPEC] [--batch 512] [--steps 10] [--precision bfloat16]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from capas.cpu import kept_heap
from capas.inference import autocast
from capas.models import build_model
from capas.runs import machine_line
from capas.spec import load_spec

RECIPE = Path(__file__).parent.parent / "examples" / "recipes" / "fashion-mnist-fast.yaml"


class Timings:
    """Per-convolution times of one step (ms), and its multiply-adds per image."""

    def __init__(self, model: torch.nn.Module):
        self.convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
        self.marks: dict[str, dict[str, float]] = {name: {} for name in self.convs}
        self.macs: dict[str, int] = {}
        self.input_grad: dict[str, bool] = {}
        self.sides: dict[str, tuple[int, int]] = {}
        for name, conv in self.convs.items():
            conv.register_forward_pre_hook(lambda m, args, name=name: self._mark(name, "start"))
            conv.register_forward_hook(lambda m, args, out, name=name: self._forward(name, m, args[0], out))
            if conv.weight.requires_grad:
                conv.weight.register_hook(lambda grad, name=name: self._mark(name, "weight grad"))

    def _mark(self, name: str, what: str) -> None:
        self.marks[name][what] = time.perf_counter()

    def _forward(self, name: str, conv: torch.nn.Conv2d, x: torch.Tensor, out: torch.Tensor) -> None:
        self._mark(name, "end")
        kh, kw = conv.kernel_size
        self.macs[name] = out[0].numel() * conv.in_channels // conv.groups * kh * kw
        self.input_grad[name] = x.requires_grad
        self.sides[name] = tuple(out.shape[-2:])
        if out.requires_grad:
            out.register_hook(lambda grad: self._mark(name, "output grad"))

    def step(self) -> dict[str, tuple[float, float | None]]:
        """(forward ms, backward ms or None) per convolution of the step just taken."""
        result = {}
        for name, mark in self.marks.items():
            backward = (
                mark.get("weight grad", 0) - mark.get("output grad", 0) if "weight grad" in mark else None
            )
            result[name] = (
                1000 * (mark["end"] - mark["start"]),
                None if backward is None else 1000 * backward,
            )
            mark.clear()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default=str(RECIPE))
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    torch.manual_seed(0)
    model = build_model(spec, seed=0).to(memory_format=torch.channels_last)
    h, w, c = spec.input_shape
    x = torch.randn(args.batch, c, h, w).to(memory_format=torch.channels_last)
    y = torch.randint(0, spec.output_shape[0], (args.batch,))
    timings = Timings(model)
    steps, per_conv = [], {name: [] for name in timings.convs}
    relu_after_pooling = getattr(model, "relu_after_pooling", contextlib.nullcontext)
    with kept_heap(), relu_after_pooling():
        for index in range(2 + args.steps):  # two warm-up steps
            started = time.perf_counter()
            with autocast("cpu", args.precision):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            elapsed = 1000 * (time.perf_counter() - started)
            model.zero_grad(set_to_none=True)
            times = timings.step()
            if index >= 2:
                steps.append(elapsed)
                for name, value in times.items():
                    per_conv[name].append(value)
    table = Table(
        title=f"{spec.name}: convolutions in a {args.precision} training step, batch {args.batch}, channels-last"
    )
    for column in ("convolution", "shape", "forward ms", "GFLOP/s", "backward ms", "GFLOP/s", "backward of"):
        table.add_column(column, justify="right")
    total = 0.0
    for name, conv in timings.convs.items():
        forward = statistics.median(t[0] for t in per_conv[name])
        flop = 2 * timings.macs[name] * args.batch / 1e9
        (ho, wo), (kh, kw) = timings.sides[name], conv.kernel_size
        out = f"{conv.in_channels}→{conv.out_channels}, {kh}×{kw}, out {ho}×{wo}"
        label = name.removeprefix("layers.").removesuffix(".conv")  # the spec's layer name
        total += forward
        if per_conv[name][0][1] is None:
            table.add_row(label, out, f"{forward:.1f}", f"{flop / forward * 1e3:.0f}", "", "", "frozen")
            continue
        backward = statistics.median(t[1] for t in per_conv[name])
        passes = 2 if timings.input_grad[name] else 1
        total += backward
        table.add_row(
            label, out, f"{forward:.1f}", f"{flop / forward * 1e3:.0f}", f"{backward:.1f}",
            f"{passes * flop / backward * 1e3:.0f}", "input and weights" if passes == 2 else "weights",
        )  # fmt: skip
    console = Console(width=120)
    console.print(table)
    step = statistics.median(steps)
    console.print(
        f"step (forward, loss, backward): median {step:.0f} ms over {args.steps} steps; the convolutions "
        f"{total:.0f} ms of it ({total / step:.0%}); {machine_line()}",
        highlight=False,
    )


if __name__ == "__main__":
    main()
