"""Where Winograd's F(4×4, 3×3) beats PyTorch's direct convolution in a float32 CPU training step.

One 3×3, stride-1, 'same' convolution's forward and backward pass (gradients of input and weights),
channels-last, inside capas' kept heap as `fit` runs it: F.conv2d (oneDNN) against
capas.train.winograd.conv2d, side by side for each shape, repeats interleaved, median milliseconds.
The grid spans the widths and sides of the networks capas trains (the seed models' 128-channel
convolutions at 26–30 pixels, VGG's 64–512 channels, airbench's 256 at 7×7 and 3×3, sides that fill
whole 4×4 output tiles and sides that do not); `winograd.pays` uses the shapes where it wins, and
the last column says whether it does.

    python benchmarks/winograd.py [--batch 128] [--repeats 5] [--channels 64 128 256] [--sides 3 4 7 8 9 12 13 16 28]
                                  [--threads N]

`--threads 1` measures it as a study's workers train (one thread each unless the study says otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from torch.nn import functional as F

from capas.cpu import cpu_features, cpu_model, describe, kept_heap
from capas.runs import environment
from capas.train.winograd import conv2d, pays


def step(conv, x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor) -> float:
    start = time.perf_counter()
    torch.autograd.grad(conv(x, w, None, padding=1), (x, w), grad)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--sides", type=int, nargs="+", default=[3, 4, 7, 8, 9, 12, 13, 16, 28])
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: PyTorch's, all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    table = Table(title=f"3×3 convolution, forward + backward, float32, batch {args.batch}, channels-last")
    columns = (
        "channels in → out",
        "side",
        "direct ms",
        "Winograd ms",
        "direct ÷ Winograd",
        "pays (capas' rule)",
    )
    for column in columns:
        table.add_column(column, justify="right")
    torch.manual_seed(0)
    with kept_heap():
        for channels in args.channels:
            for side in args.sides:
                x = torch.randn(args.batch, channels, side, side).to(memory_format=torch.channels_last)
                x.requires_grad_(True)
                w = (torch.randn(channels, channels, 3, 3) * 0.05).requires_grad_(True)
                grad = torch.randn(args.batch, channels, side, side).to(memory_format=torch.channels_last)
                times = {F.conv2d: [], conv2d: []}
                for conv in times:  # warm-up: oneDNN's kernels, the heap's growth
                    step(conv, x, w, grad)
                for _ in range(args.repeats):
                    for conv in times:
                        times[conv].append(step(conv, x, w, grad))
                direct, wino = (statistics.median(t) * 1000 for t in times.values())
                table.add_row(
                    f"{channels} → {channels}", f"{side}×{side}", f"{direct:.1f}", f"{wino:.1f}",
                    f"{direct / wino:.2f}×", "yes" if pays(channels, side, side) else "no",
                )  # fmt: skip
    console.print(table)
    env = environment()
    console.print(
        f"median of {args.repeats} interleaved repeats; {cpu_model()}; {describe(cpu_features())}; "
        f"Python {env['python']}, capas {env['capas']}, torch {env['torch']}, "
        f"{torch.get_num_threads()} threads",
        highlight=False,
    )


if __name__ == "__main__":
    main()
