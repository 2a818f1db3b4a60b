"""The in-memory dataset every loader returns: uint8 images, int64 labels, class names."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ArrayDataset:
    """A whole dataset held in memory as two tensors; small enough for the datasets capas studies."""

    images: torch.Tensor  # (N, C, H, W) uint8, contiguous
    labels: torch.Tensor  # (N,) int64, index into `classes`
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"labels must be int64 ({len(images)},), got {labels.dtype} {tuple(labels.shape)}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> ArrayDataset:
        """The images at `index` (integer indices or a boolean mask), as a new dataset."""
        index = index.to(self.images.device)
        return ArrayDataset(self.images[index].contiguous(), self.labels[index], self.classes)

    def to(self, device: torch.device | str) -> ArrayDataset:
        """The same dataset on `device`, e.g. moved to the GPU once so batches never cross the bus."""
        return ArrayDataset(self.images.to(device), self.labels.to(device), self.classes)


def control_character(name: str) -> str | None:
    """The first character of a class name that would break the lines it is printed in and the
    one-name-a-line files it is written in (a newline, a tab, an escape: a C0 or C1 control, or a
    Unicode line or paragraph separator), or None."""
    return next((c for c in name if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
