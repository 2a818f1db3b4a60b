"""Running a model without gradients, the one way train, predict, serve and compress all do it:
device choice, autocast, batch sizing, test-time augmentation, evaluation and its result."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from capas.cpu import cpu_features, describe
from capas.data import ArrayDataset, Preprocess, iterate_batches
from capas.errors import CapasError

EVAL_BATCH = 512  # images per batch without gradients on a GPU, and at most on the CPU
CPU_BATCH_VALUES = 2**20  # input values per batch without gradients on the CPU


DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; a device this machine lacks is a CapasError that says so."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICES:
        raise CapasError(f"device {name!r} is not one of {', '.join(DEVICES)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise CapasError(
            f"device {name!r}: no CUDA GPU is available here (torch {torch.__version__}, {build}); use auto or cpu"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CapasError(f"device {name!r}: Apple's MPS is not available here; use auto or cpu")
    return device


PRECISIONS = ("auto", "float32", "bfloat16")


def choose_precision(
    precision: str, device: torch.device | str, flags: frozenset[str] | None = None
) -> tuple[str, str]:
    """The precision to run in, and why: 'auto' is bfloat16 where `device` computes it natively (a CPU
    with AVX512-BF16, AMX or Arm BF16; a CUDA GPU with bfloat16 units), else float32. A CPU without
    them emulates bfloat16 (usually far slower than float32: README, Performance); the
    others are taken as they are. `flags`: the CPU's (capas.cpu.cpu_flags), read here if None."""
    if precision not in PRECISIONS:
        raise CapasError(f"train.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision, "as asked"
    device = torch.device(device)
    if device.type == "cpu":
        features = cpu_features(flags)
        return ("bfloat16" if features["native_bfloat16"] else "float32"), describe(features)
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bfloat16", f"{torch.cuda.get_device_name(device)} computes bfloat16"
    return "float32", f"no native bfloat16 on {device.type}"


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a GPU (CUDA or Apple's MPS), so that the clock read next times it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def model_device(model) -> torch.device:
    """The device a model's inputs must be on: an ONNX Runtime model's (the CPU), else its parameters'
    (the CPU for a model without parameters)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def eval_batch_size(preprocess: Preprocess, device: torch.device | str) -> int:
    """Images per batch without gradients. On the CPU, about a million input values, so that a
    batch's activations stay in the caches: EfficientNet-Lite0 at 224×224 runs 3.8–5.4× faster in
    batches of 6 than of 512 on a 2-core CPU (benchmarks/transfer.py). Elsewhere EVAL_BATCH."""
    if torch.device(device).type != "cpu" or not isinstance(preprocess, Preprocess):
        return EVAL_BATCH
    return min(EVAL_BATCH, cpu_slice(preprocess.channels * preprocess.size[0] * preprocess.size[1]))


def cpu_slice(values_per_image: int) -> int:
    """Images per CPU batch without gradients: about CPU_BATCH_VALUES input values, at least one."""
    return max(1, CPU_BATCH_VALUES // max(1, values_per_image))


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The context forward passes run in: bfloat16 autocast (mixed precision) or plain float32."""
    if precision == "float32":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    if not torch.amp.is_autocast_available(device_type):
        raise CapasError(f"train.precision: {precision} is not available on {device_type}; use float32")
    return torch.autocast(device_type, dtype=torch.bfloat16)


TTA_MODES = ("none", "flip", "flip_shift")


def _mirrored(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return 0.5 * model(x).float() + 0.5 * model(x.flip(3)).float()


def tta_logits(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, C, H, W) inputs -> (B, classes) float logits averaged over the views `mode` names:
    'none' the image; 'flip' it and its mirror; 'flip_shift' those two weighted ½, plus both
    shifted one pixel up-left and down-right (border reflected), mirrored too, ¼ each."""
    if mode not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {mode!r}; allowed: {', '.join(TTA_MODES)}")
    if mode == "none":
        return model(x).float()
    logits = _mirrored(model, x)
    if mode == "flip":
        return logits
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect" if min(h, w) > 1 else "replicate")  # (B, C, H+2, W+2)
    up_left = padded[..., :h, :w]  # content moves one pixel down-right
    down_right = padded[..., 2:, 2:]  # content moves one pixel up-left
    # the views keep the input's memory format (channels-last convolutions are the fast ones on the CPU)
    fmt = (
        torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    )
    views = [view.contiguous(memory_format=fmt) for view in (up_left, down_right)]
    shifted = 0.5 * _mirrored(model, views[0]) + 0.5 * _mirrored(model, views[1])
    return 0.5 * logits + 0.5 * shifted


@dataclass
class Evaluation:
    """Loss, accuracy and every prediction of one model on one dataset."""

    loss: float
    predictions: torch.Tensor  # (N,) int64
    labels: torch.Tensor  # (N,) int64

    @property
    def accuracy(self) -> float:
        """The fraction right, exact (float32's mean makes 9,500 of 10,000 0.94999998808)."""
        return int((self.predictions == self.labels).sum()) / len(self.labels)

    def confusion(self, classes: int) -> torch.Tensor:
        """(true, predicted) counts."""
        return torch.bincount(self.labels * classes + self.predictions, minlength=classes * classes).view(
            classes, classes
        )

    def per_class_accuracy(self, classes: int) -> list[float | None]:
        """The fraction right of each class's images; None for a class without images (not 0.0)."""
        matrix = self.confusion(classes)
        return [
            int(right) / int(n) if n else None for right, n in zip(matrix.diag(), matrix.sum(1), strict=True)
        ]

    def test_results(self, classes: tuple[str, ...] | list[str]) -> dict:
        """The test figures of a run directory's test.json (training adds its own beside them)."""
        return {
            "test_loss": self.loss,
            "test_accuracy": self.accuracy,
            "per_class_accuracy": dict(zip(classes, self.per_class_accuracy(len(classes)), strict=True)),
            "confusion_matrix": self.confusion(len(classes)).tolist(),
            "classes": list(classes),
        }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: ArrayDataset,
    preprocess: Preprocess,
    device: torch.device | str | None = None,
    channels_last: bool = False,
    precision: str = "float32",
    tta: str = "none",
) -> Evaluation:
    """Loss (cross-entropy on logits) and accuracy of `model` on a whole dataset; with `tta`, on
    logits averaged over test-time views (`tta_logits`).

    `device`: where the batches go; by default the model's own device (wherever `fit` left it).
    `channels_last`: the batches' memory format, and the model's (it is converted): on a GPU, kernels for
    another one round differently (an H200 re-scoring a bfloat16 run in NCHW moved one test image of
    10,000, most likely for this reason).
    """
    device = model_device(model) if device is None else torch.device(device)
    if channels_last and isinstance(model, nn.Module):
        model.to(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    total_loss, predictions, labels = 0.0, [], []
    batch_size = eval_batch_size(preprocess, device)
    try:
        for x, y in iterate_batches(
            data, batch_size, preprocess=preprocess, device=device, channels_last=channels_last
        ):
            with autocast(device, precision):
                logits = tta_logits(model, x, tta)
            total_loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            predictions.append(logits.argmax(1).cpu())
            labels.append(y.cpu())
    finally:  # a caller's model training in its own loop stays in training mode, also after an error
        model.train(was_training)
    predictions, labels = torch.cat(predictions), torch.cat(labels)
    return Evaluation(total_loss / len(labels), predictions, labels)
