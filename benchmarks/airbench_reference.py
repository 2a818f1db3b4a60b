"""airbench94's own code on the cifar10-airbench recipe's split: is a gap to 94% capas' or the data's?

airbench94 reaches 94.01% on the official CIFAR-10 (50,000 PNG-exact training images, the
official test set). The shared folder holds the 50,000 training images JPEG-compressed, and the
recipe trains on 38,400 of them and tests on a held-out 10,000. This script runs Keller Jordan's
uncompiled airbench94 as written — `legacy/airbench94.py` of github.com/KellerJordan/cifar10-airbench
(MIT; not vendored: pass your checkout's file) — on exactly the recipe's training and test images,
so its accuracy is the bar capas' version of the recipe should meet on this data.

What changes, from outside the script (its code is imported, not edited):
- its CifarLoader takes the recipe's splits (`splits_for` of examples/recipes/cifar10-airbench.train.yaml)
  instead of torchvision's download; normalisation, alternating flips and translation are its own;
- on the CPU: the model stays float32 and runs its forward passes under bfloat16 autocast (the
  script casts it to float16 on CUDA), `.cuda()` is a no-op and CUDA events time with
  `time.perf_counter`;
- epochs and batch size default to the recipe's (16 epochs of 512, the same images seen as
  capas' run); `--epochs 9.9 --batch-size 1024` are airbench's own.

Each seed runs `main` once after `torch.manual_seed(seed)`; the table gives its final test accuracy
with its own test-time augmentation (mirror + translate) and wall time.

    python benchmarks/airbench_reference.py --script PATH/legacy/airbench94.py [--seeds 3]
    python benchmarks/fast_recipes.py cifar10 --seeds 3     # capas' recipe on the same split
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
from rich.console import Console
from rich.table import Table

from capas.data import splits_for
from capas.runs import machine_line
from capas.spec import DataConfig, TrainConfig, load_document

RECIPE = Path(__file__).parent.parent / "examples/recipes/cifar10-airbench.train.yaml"


class CpuEvent:
    """torch.cuda.Event's timing interface on the host clock."""

    def __init__(self, enable_timing: bool = False):
        self.at = 0.0

    def record(self) -> None:
        self.at = time.perf_counter()

    def elapsed_time(self, end: CpuEvent) -> float:  # milliseconds, as CUDA's
        return 1e3 * (end.at - self.at)


def load_airbench(script: Path, splits) -> ModuleType:
    """Import airbench94's script with its loader reading `splits` and its CUDA calls made host-side."""
    spec = importlib.util.spec_from_file_location("airbench94", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = [name for name in ("hyp", "CifarLoader", "make_net", "main") if not hasattr(module, name)]
    if missing:
        sys.exit(f"{script} is not airbench's legacy/airbench94.py: it lacks {', '.join(missing)}")
    original = module.CifarLoader

    class SplitLoader(original):
        def __init__(self, path, train=True, batch_size=500, aug=None, drop_last=None, shuffle=None, gpu=0):
            split = splits.train if train else splits.test
            # what the original does after loading its uint8 tensors, in float32 for the CPU
            self.images = (split.images.float() / 255).contiguous(memory_format=torch.channels_last)
            self.labels, self.classes = split.labels, split.classes
            self.normalize = module.T.Normalize(module.CIFAR_MEAN, module.CIFAR_STD)
            self.proc_images, self.epoch, self.aug = {}, 0, aug or {}
            self.batch_size = batch_size
            self.drop_last = train if drop_last is None else drop_last
            self.shuffle = train if shuffle is None else shuffle

    module.CifarLoader = SplitLoader
    make_net = module.make_net

    def make_autocast_net():
        # the forward pass under bfloat16 autocast, its output in float32 (as the loss sees it under
        # autocast); the whitening's covariance and eigenvectors, computed outside it, stay float32
        net = make_net()
        forward = torch.autocast("cpu", torch.bfloat16)(net.forward)
        net.forward = lambda inputs: forward(inputs).float()
        return net

    module.make_net = make_autocast_net
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.half = lambda self: self  # bfloat16 autocast instead of float16 weights
    torch.cuda.Event = CpuEvent
    torch.cuda.synchronize = lambda *args, **kwargs: None
    return module


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--script", type=Path, required=True, help="airbench's legacy/airbench94.py")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=None, help="default: the recipe's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    args = parser.parse_args()
    if not args.script.is_file():
        sys.exit(f"--script: no file at {args.script} (airbench's legacy/airbench94.py)")

    document = load_document(RECIPE)
    cfg = TrainConfig.model_validate(document["train"])
    started = time.perf_counter()
    splits = splits_for(DataConfig.model_validate(document["data"]))
    data_seconds = time.perf_counter() - started
    airbench = load_airbench(args.script, splits)
    airbench.hyp["opt"]["train_epochs"] = args.epochs or cfg.epochs
    airbench.hyp["opt"]["batch_size"] = args.batch_size or cfg.batch_size

    runs = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        started = time.perf_counter()
        accuracy = airbench.main(seed)
        runs.append((seed, 100 * accuracy, time.perf_counter() - started))
        print(
            f"airbench94 seed {seed}: test accuracy {100 * accuracy:.2f}%, wall {runs[-1][2]:.1f} s",
            flush=True,
        )

    console = Console()
    opt = airbench.hyp["opt"]
    table = Table(
        title=f"airbench94's own code, {opt['train_epochs']:g} epochs of {opt['batch_size']}, on "
        f"{len(splits.train):,} training images, tested on {len(splits.test):,} ({splits.info['test_source']})"
    )
    for column in ("seed", "test accuracy (its TTA)", "wall s"):
        table.add_column(column, justify="right")
    for seed, accuracy, wall in runs:
        table.add_row(str(seed), f"{accuracy:.2f}%", f"{wall:.1f}")
    console.print(table)
    accuracy = [a for _, a, _ in runs]
    spread = f" ± {statistics.stdev(accuracy):.2f}" if len(accuracy) > 1 else ""  # one seed: no spread
    console.print(
        f"over {len(runs)} seeds: {statistics.mean(accuracy):.2f}{spread}% (min–max "
        f"{min(accuracy):.2f}–{max(accuracy):.2f}); data {data_seconds:.1f} s once; script {args.script}",
        highlight=False,
    )
    console.print(f"{machine_line()}; bfloat16 autocast on the CPU", highlight=False)


if __name__ == "__main__":
    main()
