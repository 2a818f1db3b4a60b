"""Training throughput of the 300,042-parameter seed-000 model at batch 128: capas against plain PyTorch and Keras.

The plain loops are what a user writes by hand: the same architecture as nn.Sequential, float
tensors already in memory, zero_grad/backward/step. capas' `fit` starts from uint8 images and does
its own batching and scaling. Repeats are interleaved so that a busy machine slows all alike; the
table shows medians. Achieved FLOP/s counts 3 × the forward multiply-adds (forward + backward) × 2
FLOPs, as a fraction of a measured matmul peak in the same precision (a 2048² product, the
best of ten).

The Keras side is optional: where TensorFlow is importable, the same model built in Keras 3 on
TensorFlow (Conv2D ×3, GlobalAveragePooling2D, Dense; its parameter count checked against capas')
trains with `train_on_batch` on float32 tensors already in memory, batches sliced beforehand, Adam
at 1e-3, in float32 and under the mixed_bfloat16 policy, its runs interleaved with the others;
"capas ÷ Keras" compares capas' `fit` with Keras in the same precision. capas also trains with
`train.compile` (torch.compile of the training step): a fresh model compiles during its first
epoch, so that fit trains two epochs and its second is timed, the first printed apart; and in
float32 with the other `train.winograd` than its default `auto` resolves to on this CPU (its two
128-channel convolutions by Winograd's F(4×4, 3×3), or not: capas.train.winograd.auto). Keras runs in a process
of its own that takes turns with this one. Each Keras run builds a fresh model; its first step
(tf.function tracing) is timed apart, left out of images/s and printed below the table with capas'
warm-up. Neither side's threads are set: the last line prints what each framework uses. Keep
TensorFlow out of the test venv (Keras would switch backend); a separate one does:

    python3 -m venv /work/tfvenv && /work/tfvenv/bin/pip install -c constraints.txt torch torchvision
    /work/tfvenv/bin/pip install tensorflow-cpu && /work/tfvenv/bin/pip install -e .

    python benchmarks/train_throughput.py [--batches 10] [--repeats 3] [--precisions float32 bfloat16] [--profile]

On a GPU (`--device cuda`) the comparison is the one issue #13 asks for, at batch 128 and 512 in
both precisions: a plain eager loop and the same loop under torch.compile (float images already on
the GPU, Adam, autocast for bfloat16) against capas' `fit` from uint8 images (deterministic, the
default; nondeterministic; and with `train.compile`). Each capas row trains 3 epochs and takes the
median of the last two (the first holds cuDNN's and the allocator's warm-up, or the compilation);
each plain loop runs one epoch to warm up (compile) and two timed. GPU utilisation is NVML's
busy fraction sampled every 20 ms over the timed part (capas: the whole fit, evaluation of its
small validation split included). Two deterministic fits and two nondeterministic ones are
compared weight for weight.

    python benchmarks/train_throughput.py --device cuda [--images 20480] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import statistics
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from capas.cpu import cpu_features, cpu_model, describe
from capas.data import ArrayDataset, default_preprocess, make_splits
from capas.inference import resolve_device
from capas.models import build_model
from capas.runs import environment
from capas.spec import TrainConfig, load_spec
from capas.spec.summary import summarize
from capas.train import fit, winograd

SPEC = Path(__file__).parent.parent / "examples" / "seed000-gap.yaml"
# the machines' CIFAR-10 folder beside the checkout (or beside the folder holding a git worktree)
CIFAR = next(
    (found for parent in Path(__file__).resolve().parents[1:]
     if (found := parent / "shared" / "datasets" / "cifar10-jpeg" / "train").is_dir()),
    Path(__file__).parent.parent.parent / "shared" / "datasets" / "cifar10-jpeg" / "train",
)  # fmt: skip
BATCH = 128
PRECISIONS = ("float32", "bfloat16")
COMPILED = "capas fit, train.compile"
# float32 only (it changes nothing in bfloat16): the winograd setting that `auto` does not choose here
OTHER_WINOGRAD = not winograd.auto(torch.device("cpu"), "float32", False)
WINOGRAD = f"capas fit, winograd: {str(OTHER_WINOGRAD).lower()}"
WARMUPS = {"capas fit": "warm-up (1 batch, once)", COMPILED: "first epoch (compiling), median"}


def plain_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 128, 3), nn.ReLU(), nn.Conv2d(128, 128, 3), nn.ReLU(), nn.Conv2d(128, 128, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )  # fmt: skip


def plain_loop(images: torch.Tensor, labels: torch.Tensor, channels_last: bool) -> float:
    """Images/s of a hand-written eager loop over float images already scaled to 0–1."""
    model = plain_model()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for i in range(0, len(images), BATCH):
        x, y = images[i : i + BATCH], labels[i : i + BATCH]
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return len(images) / (time.perf_counter() - start)


class Utilisation:
    """NVML's GPU busy fraction, sampled every 20 ms on a thread while the block runs (CUDA only)."""

    def __init__(self, device: torch.device):
        self.device, self.samples, self.done = device, [], threading.Event()

    def __enter__(self) -> Utilisation:
        if self.device.type == "cuda":
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.02):
            self.samples.append(torch.cuda.utilization(self.device))

    def __exit__(self, *exc) -> None:
        self.done.set()
        if self.device.type == "cuda":
            self.thread.join()

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.samples) / 100 if self.samples else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_gpu(
    images: torch.Tensor, labels: torch.Tensor, batch: int, precision: str, compiled: bool
) -> tuple[float, float | None, float]:
    """(images/s, GPU utilisation, warm-up s) of the hand-written loop on the images' device: one
    epoch to warm up (and compile), two timed."""
    device = images.device
    torch.manual_seed(0)
    model = plain_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bfloat16"):
            loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if compiled:
        step = torch.compile(step)

    def epoch() -> None:
        for i in range(0, len(images) - batch + 1, batch):  # whole batches: one compiled shape
            step(images[i : i + batch], labels[i : i + batch])

    start = time.perf_counter()
    epoch()
    synchronize(device)
    warmup = time.perf_counter() - start
    with Utilisation(device) as busy:
        start = time.perf_counter()
        epoch()
        epoch()
        synchronize(device)
        seconds = time.perf_counter() - start
    return 2 * (len(images) // batch * batch) / seconds, busy.mean, warmup


def capas_gpu(
    train: ArrayDataset, val: ArrayDataset, device: str, batch: int, precision: str, **settings
) -> tuple[float, float | None, float, list[torch.Tensor]]:
    """(images/s, GPU utilisation, first epoch s, final tensors) of capas' fit over 3 epochs; the
    median of the last two epochs' rates."""
    spec = load_spec(SPEC)
    cfg = TrainConfig(epochs=3, batch_size=batch, device=device, precision=precision, **settings)
    model = build_model(spec, seed=0)
    with Utilisation(torch.device(device)) as busy:
        result = fit(model, train, val, default_preprocess(spec.input_shape), cfg)
    rate = statistics.median(epoch["images_per_s"] for epoch in result.history[1:])
    return rate, busy.mean, result.history[0]["seconds"], [t.cpu() for t in model.state_dict().values()]


def gpu_main(args: argparse.Namespace, console: Console) -> None:
    """The accelerator comparison (module docstring)."""
    device = resolve_device(args.device)
    data = args.data or (f"folder:{CIFAR}" if CIFAR.is_dir() else "cifar10")
    splits = make_splits(data, limit=args.images, val_fraction=0.02)
    train, val = splits.train, splits.val
    floats = (train.images.float() / 255).to(device)
    labels = train.labels.to(device)
    ways = {
        "plain PyTorch": lambda b, p: plain_gpu(floats, labels, b, p, compiled=False),
        "plain PyTorch + torch.compile": lambda b, p: plain_gpu(floats, labels, b, p, compiled=True),
        "capas fit": lambda b, p: capas_gpu(train, val, args.device, b, p)[:3],
        "capas fit, nondeterministic": lambda b, p: capas_gpu(train, val, args.device, b, p, deterministic=False)[:3],
        COMPILED: lambda b, p: capas_gpu(train, val, args.device, b, p, compile=True)[:3],
    }  # fmt: skip
    runs: dict[tuple[str, int, str], list[tuple[float, float | None, float]]] = {}
    for repeat in range(args.repeats):
        for batch in args.batch_sizes:
            for precision in args.precisions:
                for name, way in ways.items():
                    measured = way(batch, precision)
                    runs.setdefault((name, batch, precision), []).append(measured)
                    busy = "" if measured[1] is None else f", GPU busy {measured[1]:.0%}"
                    console.print(
                        f"repeat {repeat + 1}: {name}, batch {batch}, {precision}: {measured[0]:,.0f} img/s"
                        f"{busy}, warm-up {measured[2]:.1f} s",
                        highlight=False,
                    )

    table = Table(title=f"Training throughput, seed-000 GAP model (300,042 params), {device}")
    for column in ("loop", "batch", "precision", "images/s (median)", "min–max", "GPU busy", "÷ compiled plain",
                   "warm-up / first epoch s"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("loop", "precision") else "right")
    for (name, batch, precision), measured in runs.items():
        rates = [m[0] for m in measured]
        busy = [m[1] for m in measured if m[1] is not None]
        reference = statistics.median(m[0] for m in runs["plain PyTorch + torch.compile", batch, precision])
        table.add_row(
            name, str(batch), precision, f"{statistics.median(rates):,.0f}",
            f"{min(rates):,.0f}–{max(rates):,.0f}", f"{statistics.median(busy):.0%}" if busy else "",
            f"{statistics.median(rates) / reference:.2f}×", f"{statistics.median(m[2] for m in measured):.1f}",
        )  # fmt: skip
    console.print(table)

    # reruns: deterministic fits must give the same weights; nondeterministic ones are shown as they come
    batch, precision = args.batch_sizes[0], args.precisions[-1]
    for deterministic in (True, False):
        weights = [
            capas_gpu(train, val, args.device, batch, precision, deterministic=deterministic)[3]
            for _ in range(2)
        ]
        same = all(torch.equal(a, b) for a, b in zip(weights[0], weights[1], strict=True))
        console.print(
            f"two {'deterministic' if deterministic else 'nondeterministic'} fits (batch {batch}, {precision}): "
            f"weights {'identical' if same else 'differ'}",
            highlight=False,
        )
    env = environment()
    console.print(
        f"{args.repeats} repeats × {len(train)} images ({data}); {env['cuda'] or device}; "
        f"Python {env['python']}, capas {env['capas']}, torch {env['torch']} (CUDA {torch.version.cuda}, "
        f"cuDNN {torch.backends.cudnn.version()}); host {cpu_model()}, {os.cpu_count()} CPUs",
        highlight=False,
    )


def capas_fit(
    train: ArrayDataset,
    val: ArrayDataset,
    precision: str = "float32",
    compile: bool = False,
    winograd: bool | str = "auto",
) -> tuple[float, float]:
    """(images/s, seconds of the first epoch): compiled, a fresh model compiles in its first
    epoch, so it trains two and the second is timed; eager, one."""
    spec = load_spec(SPEC)
    cfg = TrainConfig(
        epochs=2 if compile else 1,
        batch_size=BATCH,
        device="cpu",
        precision=precision,
        compile=compile,
        winograd=winograd,
    )
    result = fit(build_model(spec, seed=0), train, val, default_preprocess(spec.input_shape), cfg)
    timed = result.history[-1]
    return timed["images_per_s"], result.history[0]["seconds"]


class KerasStep:
    """The seed-000 model in Keras 3 on TensorFlow, trained step by step with `train_on_batch`.

    It lives in the Keras process (keras_worker). The images become float32 NHWC tensors scaled to
    0–1 once, and are cut into batches before any timing: the steps see ready tensors, as the plain
    PyTorch loops do.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, jit_compile: bool):
        # the comparison is with TensorFlow, whatever KERAS_BACKEND the shell sets
        os.environ["KERAS_BACKEND"] = "tensorflow"
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ info lines, not errors
        import keras
        import tensorflow as tf

        self.keras, self.tf, self.jit_compile = keras, tf, jit_compile
        x = tf.convert_to_tensor(images.transpose(0, 2, 3, 1).astype("float32") / 255)  # (N, 32, 32, 3)
        y = tf.convert_to_tensor(labels.astype("int32"))
        self.batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(images), BATCH)]
        self.images = len(images)

    def build(self, precision: str):
        keras = self.keras
        keras.backend.clear_session()
        keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
        try:
            model = keras.Sequential(
                [
                    keras.Input((32, 32, 3)),
                    keras.layers.Conv2D(128, 3, activation="relu"),
                    keras.layers.Conv2D(128, 3, activation="relu"),
                    keras.layers.Conv2D(128, 3, activation="relu"),
                    keras.layers.GlobalAveragePooling2D(),
                    # float32 output, as Keras' mixed-precision guide asks (a 128×10 product)
                    keras.layers.Dense(10, activation="softmax", dtype="float32"),
                ]
            )
        finally:
            keras.mixed_precision.set_global_policy("float32")
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=1e-3),
            loss="sparse_categorical_crossentropy",
            jit_compile=True if self.jit_compile else "auto",  # auto: Keras' default, no XLA on a CPU
        )
        return model

    def run(self, precision: str) -> tuple[float, float]:
        """(images/s, seconds of the first steps): a fresh model's first step on each batch shape
        traces and compiles its train function; those steps are timed apart, then every batch is."""
        model = self.build(precision)
        one_per_shape = {tuple(x.shape): (x, y) for x, y in self.batches}  # a short last batch retraces
        start = time.perf_counter()
        for x, y in one_per_shape.values():
            model.train_on_batch(x, y)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for x, y in self.batches:
            model.train_on_batch(x, y)  # returns the loss as a NumPy value: each step ends here
        return self.images / (time.perf_counter() - start), first

    def describe(self) -> dict:
        threading = self.tf.config.threading
        onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset: TensorFlow's default, on for x86")
        model = self.build("float32")
        return {
            "backend": self.keras.backend.backend(),
            "params": model.count_params(),
            "versions": f"TensorFlow {self.tf.__version__}, Keras {self.keras.__version__} "
            f"(jit_compile resolved to {model.jit_compile})",
            "threads": f"TensorFlow intra-op {threading.get_intra_op_parallelism_threads()}, inter-op "
            f"{threading.get_inter_op_parallelism_threads()} (0: its default, one per schedulable CPU: "
            f"{len(os.sched_getaffinity(0))}), TF_ENABLE_ONEDNN_OPTS {onednn}",
        }


def keras_worker(conn: Connection, images: np.ndarray, labels: np.ndarray, jit_compile: bool) -> None:
    """The Keras process: it answers a precision with (images/s, first-step s) until it gets None."""
    step = KerasStep(images, labels, jit_compile)
    conn.send(step.describe())
    while (precision := conn.recv()) is not None:
        conn.send(step.run(precision))


class KerasSide:
    """Keras on TensorFlow in a process of its own, driven step by step from this one.

    TensorFlow stays out of the process that trains with PyTorch: loaded together, importing triton
    after TensorFlow's libraries crashed that process (torch.use_deterministic_algorithms, which
    capas' fit calls, imports torch._inductor and with it triton). The two processes take turns:
    while one trains, the other waits on the pipe, so neither framework's threads compete.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, jit_compile: bool):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter, no torch state forked
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=keras_worker, args=(child, images.numpy(), labels.numpy(), jit_compile), daemon=True
        )
        self.process.start()
        child.close()
        self.info = self._receive()
        if self.info["backend"] != "tensorflow":
            raise SystemExit(f"Keras runs on {self.info['backend']}, not TensorFlow")

    def _receive(self):
        try:
            return self.conn.recv()
        except EOFError:
            self.process.join()
            raise SystemExit(f"the Keras process died (exit code {self.process.exitcode})") from None

    def run(self, precision: str) -> tuple[float, float]:
        self.conn.send(precision)
        return self._receive()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join()


def profile_fit(
    train: ArrayDataset, val: ArrayDataset, precision: str, console: Console, rows: int = 8
) -> None:
    """Where capas' eager step spends its time: one `fit` epoch under torch.profiler, the operators with
    the most self CPU time, per training batch and as a share of the profiled time (the epoch's
    validation of its small split included)."""
    capas_fit(train, val, precision)  # warm, as the timed runs are
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        speed, _ = capas_fit(train, val, precision)
    ops = sorted(profiler.key_averages(), key=lambda op: op.self_cpu_time_total, reverse=True)
    total = sum(op.self_cpu_time_total for op in ops)
    batches = len(train) // BATCH
    table = Table(
        title=f"capas fit, {precision}: the operators with the most self CPU time ({speed:.0f} images/s profiled)"
    )
    for column in ("operator", "calls per batch", "ms per batch", "share"):
        table.add_column(column, justify="left" if column == "operator" else "right")
    for op in ops[:rows]:
        table.add_row(op.key, f"{op.count / batches:g}", f"{op.self_cpu_time_total / 1e3 / batches:.1f}",
                      f"{op.self_cpu_time_total / total:.1%}")  # fmt: skip
    table.add_row("all operators", "", f"{total / 1e3 / batches:.1f}", "100%")
    console.print(table)


def matmul_peak(precision: str, n: int = 2048, repeats: int = 10) -> float:
    """Measured matmul FLOP/s in `precision` (the best of a few repeats)."""
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10, help="training batches of 128 per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
        help="capas and Keras run in each; the plain PyTorch loops in float32 only",
    )  # fmt: skip
    parser.add_argument(
        "--data", default=None, help=f"capas dataset name (default: folder:{CIFAR} if there, else cifar10)"
    )
    parser.add_argument(
        "--no-keras", action="store_true", help="leave Keras out even where TensorFlow is importable"
    )
    parser.add_argument(
        "--keras-jit",
        action="store_true",
        help="Keras with jit_compile=True (XLA on the CPU; Keras' default leaves it off there)",
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu (against Keras), or cuda/mps (against plain and compiled loops)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="then profile one capas fit epoch per precision (torch.profiler)",
    )
    parser.add_argument("--images", type=int, default=20_480, help="training images per run (--device cuda)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512], help="(--device cuda)")
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 160)  # a log file gets unwrapped rows
    if args.device != "cpu":
        gpu_main(args, console)
        return

    data = args.data or (f"folder:{CIFAR}" if CIFAR.is_dir() else "cifar10")
    splits = make_splits(data, limit=args.batches * BATCH, val_fraction=0.02)
    train, val = splits.train, splits.val
    floats = train.images.float() / 255  # the plain loops get their input ready-made
    labels = train.labels

    keras_side = None
    keras_name = "Keras train_on_batch" + (" (XLA)" if args.keras_jit else "")
    if args.no_keras:
        console.print("Keras/TensorFlow: left out (--no-keras)", highlight=False)
    elif importlib.util.find_spec("tensorflow") is None:
        console.print(
            "Keras/TensorFlow: not measured, tensorflow is not importable in this Python; a separate venv "
            "with tensorflow-cpu runs it (see this script's docstring)",
            highlight=False,
        )
    else:
        keras_side = KerasSide(train.images, labels, args.keras_jit)
        capas_params = sum(p.numel() for p in build_model(load_spec(SPEC), seed=0).parameters())
        keras_params = keras_side.info["params"]
        assert keras_params == capas_params, (
            f"Keras model has {keras_params} parameters, capas' {capas_params}"
        )

    runs: dict[tuple[str, str], list[float]] = {
        ("plain PyTorch (NCHW)", "float32"): [],
        ("plain PyTorch (channels-last)", "float32"): [],
    }
    for precision in args.precisions:
        runs["capas fit", precision] = []
        runs[COMPILED, precision] = []
        if precision == "float32":
            runs[WINOGRAD, precision] = []
        if keras_side is not None:
            runs[keras_name, precision] = []
    warmups: dict[tuple[str, str], list[float]] = {}
    for precision in args.precisions:  # first-call allocations, thread pools, oneDNN kernels
        start = time.perf_counter()
        capas_fit(train.subset(torch.arange(BATCH)), val, precision)
        warmups["capas fit", precision] = [time.perf_counter() - start]
    for _ in range(args.repeats):
        for name, channels_last in (("plain PyTorch (NCHW)", False), ("plain PyTorch (channels-last)", True)):
            runs[name, "float32"].append(plain_loop(floats, labels, channels_last))
        for precision in args.precisions:
            runs["capas fit", precision].append(capas_fit(train, val, precision)[0])
            speed, first = capas_fit(train, val, precision, compile=True)
            runs[COMPILED, precision].append(speed)
            warmups.setdefault((COMPILED, precision), []).append(first)
            if precision == "float32":
                runs[WINOGRAD, precision].append(capas_fit(train, val, precision, winograd=OTHER_WINOGRAD)[0])
            if keras_side is not None:
                speed, first = keras_side.run(precision)
                runs[keras_name, precision].append(speed)
                warmups.setdefault((keras_name, precision), []).append(first)

    if keras_side is not None:
        keras_side.close()

    macs = summarize(load_spec(SPEC)).macs
    # the plain loops' float32 rows too, when --precisions leaves float32 out
    peaks = {precision: matmul_peak(precision) for precision in dict.fromkeys(p for _, p in runs)}
    env = environment()
    table = Table(title=f"Training throughput, seed-000 GAP model (300,042 params), batch {BATCH}, CPU")
    columns = ["loop", "precision", "images/s (median)", "min–max", "GFLOP/s", "of matmul peak"]
    if keras_side is not None:
        columns.append("capas ÷ Keras")
    for column in columns:
        table.add_column(column, justify="left" if column in ("loop", "precision") else "right")
    for (name, precision), values in runs.items():
        median = statistics.median(values)
        flops = median * macs * 3 * 2
        row = [name, precision, f"{median:.1f}", f"{min(values):.1f}–{max(values):.1f}", f"{flops / 1e9:.1f}",
               f"{flops / peaks[precision]:.0%}"]  # fmt: skip
        if keras_side is not None:
            keras = runs.get((keras_name, precision))
            row.append(
                f"{median / statistics.median(keras):.2f}×" if name.startswith("capas") and keras else ""
            )
        table.add_row(*row)
    console.print(table)
    console.print(
        f"{args.repeats} repeats × {len(train)} images ({data}); matmul peak "
        + ", ".join(f"{precision} {peak / 1e9:,.0f} GFLOP/s" for precision, peak in peaks.items())
        + "; GFLOP/s counts the direct convolutions' multiply-adds (train.winograd does 4× fewer in "
        "its layers: its figure is the direct-equivalent rate); "
        "bfloat16: capas autocasts the forward pass"
        + (", Keras runs the mixed_bfloat16 policy" if keras_side is not None else ""),
        highlight=False,
    )
    console.print(
        "left out of images/s: "
        + "; ".join(
            f"{name} {precision} {WARMUPS.get(name, 'first step (tracing), median')} "
            f"{statistics.median(seconds):.2f} s"
            for (name, precision), seconds in warmups.items()
        ),
        highlight=False,
    )
    console.print(
        f"{cpu_model()}; {describe(cpu_features())}; Python {env['python']}, capas {env['capas']}, "
        f"torch {env['torch']}" + (f", {keras_side.info['versions']}" if keras_side is not None else ""),
        highlight=False,
    )
    console.print(
        f"threads (this script sets none): torch {torch.get_num_threads()} intra-op, "
        f"{torch.get_num_interop_threads()} inter-op"
        + (f"; {keras_side.info['threads']}" if keras_side is not None else ""),
        highlight=False,
    )
    if args.profile:
        for precision in args.precisions:
            profile_fit(train, val, precision, console)


if __name__ == "__main__":
    main()
