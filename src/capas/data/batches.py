"""From an in-memory dataset to float batches on the device: preprocessing and augmentation as
whole-batch tensor operations (no per-image Python loop), so they run as fast on the GPU."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, PositiveInt, model_validator

from capas.data.dataset import ArrayDataset
from capas.errors import CapasError
from capas.spec.train import Augment

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601: gray = 0.299 R + 0.587 G + 0.114 B


class Preprocess(BaseModel):
    """What inference needs to turn uint8 images into model inputs; saved into run directories."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: tuple[PositiveInt, PositiveInt]  # target (H, W)
    channels: Literal[1, 3]
    mean: tuple[float, ...] | None = None  # per channel, applied after scaling to 0..1; None: 0..1 only
    std: tuple[float, ...] | None = None

    @model_validator(mode="after")
    def _check_normalization(self) -> Preprocess:
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != self.channels or len(self.std) != self.channels:
                raise ValueError(f"mean and std need {self.channels} values each, one per channel")
            if min(self.std) <= 0:
                raise ValueError("std values must be positive")
        return self

    def __call__(self, images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """(N, C, H, W) uint8 -> (N, channels, *size) float32, on the images' device (channels-last
        memory when asked: resizing writes it directly)."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            got = f"{images.dtype} {tuple(images.shape)}"
            raise CapasError(f"Preprocess expects uint8 (N, C, H, W) images, got {got}")
        c = images.shape[1]
        if c not in (1, self.channels) and not (c == 3 and self.channels == 1):
            raise CapasError(f"cannot turn {c}-channel images into {self.channels}-channel inputs")
        x = images.float()  # (N, C, H, W), 0..255
        if c == 3 and self.channels == 1:  # before resizing: a third of the work
            weights = torch.tensor(LUMA_WEIGHTS, device=x.device).view(1, 3, 1, 1)
            x = (x * weights).sum(1, keepdim=True)
        # Scaling, normalising and channel copies are per-pixel affine maps, which commute with
        # interpolation (its weights sum to 1): they run on whichever side has fewer pixels.
        enlarging = x.shape[-2] * x.shape[-1] < self.size[0] * self.size[1]
        if enlarging:
            x = self._scale(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # interpolate keeps the memory format
        if x.shape[-2] > self.size[0] and x.shape[-1] < self.size[1]:
            # interpolate resizes the width first: a tall strip (1 × 4,000,000 pixels) would become
            # 4,000,000 × the model's width before shrinking. Its height first, resized as a width:
            # to a width of 1, PyTorch 2.14's antialiased resize gives every row the first's value
            x = _resize(x.transpose(-2, -1), (x.shape[-1], self.size[0])).transpose(-2, -1)
            x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        x = _resize(x, self.size)
        return x if enlarging else self._scale(x)

    def each(self, images: Iterable[torch.Tensor]) -> torch.Tensor:
        """uint8 (C, H, W) images of any sizes, each preprocessed alone -> one (N, channels, *size) batch:
        nothing full-size is ever stacked (from an iterator, one full-size image exists at a time), so
        memory follows the model's input size."""
        return torch.cat([self(image.unsqueeze(0)) for image in images])

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        """0..255 -> 0..1, grayscale copied to three channels, the per-channel normalisation."""
        x = x / 255
        if x.shape[1] == 1 and self.channels == 3:
            x = x.repeat(1, 3, 1, 1)
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x


def _image_bits(index: torch.Tensor, seed: int) -> torch.Tensor:
    """One pseudo-random bit per dataset index, fixed for a seed (a 32-bit integer hash): the
    per-image choice that alternating flips keep across epochs, without state to checkpoint."""
    h = (index.long() + seed * 1_000_003) & 0xFFFFFFFF
    for _ in range(2):  # products stay below 2**59: no int64 overflow
        h = (((h >> 16) ^ h) * 0x45D9F3B) & 0xFFFFFFFF
    return (((h >> 16) ^ h) & 1).bool()


def flips(
    cfg: Augment,
    n: int,
    generator: torch.Generator,
    index: torch.Tensor | None = None,
    epoch: int = 0,
    seed: int = 0,
) -> torch.Tensor | None:
    """Which of a batch's `n` images `cfg.hflip` mirrors (bool (N,), on the generator's device or the
    index's), drawn as augment_batch draws them; None without flips."""
    if cfg.hflip == "alternate":
        if index is None:
            raise CapasError("augment.hflip 'alternate' needs the images' dataset indices")
        return _image_bits(index, seed) ^ bool(epoch % 2)
    if cfg.hflip:
        return torch.rand(n, generator=generator, device=generator.device) < 0.5
    return None


def augment_batch(
    x: torch.Tensor,
    cfg: Augment,
    generator: torch.Generator,
    index: torch.Tensor | None = None,
    epoch: int = 0,
    seed: int = 0,
) -> torch.Tensor:
    """Random training-time changes as `cfg` says, drawn per image from `generator`.

    (N, C, H, W) float -> the same shape; random numbers come from `generator`'s device.
    Alternating flips need the images' dataset `index` (N,), the `epoch` and the run's `seed`.
    """
    if cfg.off:
        return x  # nothing to do: any tensor passes (cached backbone features are (N, F))
    n, c, h, w = x.shape
    if cfg.crop_padding:
        p = cfg.crop_padding
        mode = "reflect" if cfg.crop_fill == "reflect" else "constant"  # reflect: p < side (train checks)
        padded = F.pad(x, (p, p, p, p), mode=mode)  # (N, C, H + 2p, W + 2p)
        # per-image offsets in 0..2p: offset p is the uncropped image
        offsets = torch.randint(0, 2 * p + 1, (2, n, 1), generator=generator, device=generator.device)
        dy, dx = offsets.to(x.device)
        rows = dy + torch.arange(h, device=x.device)  # (N, H) rows of `padded` to keep
        cols = dx + torch.arange(w, device=x.device)  # (N, W)
        # one gather: out[i, ch, r, q] = padded[i, ch, rows[i, r], cols[i, q]]
        x = padded[
            torch.arange(n, device=x.device).view(n, 1, 1, 1),
            torch.arange(c, device=x.device).view(1, c, 1, 1),
            rows.view(n, 1, h, 1),
            cols.view(n, 1, 1, w),
        ]
    if (flip := flips(cfg, n, generator, index, epoch, seed)) is not None:
        x = torch.where(flip.to(x.device).view(n, 1, 1, 1), x.flip(3), x)
    if cfg.cutout:
        # DeVries & Taylor's cutout: a size × size square of zeros around a random centre anywhere in
        # the image, clipped at its borders (so a centre near an edge blanks less)
        centres = torch.stack(
            [
                torch.randint(0, h, (n,), generator=generator, device=generator.device),
                torch.randint(0, w, (n,), generator=generator, device=generator.device),
            ]
        ).to(x.device)
        top_left = centres - cfg.cutout // 2  # (2, N)
        rows = torch.arange(h, device=x.device) - top_left[0].view(n, 1)  # (N, H): row - top
        cols = torch.arange(w, device=x.device) - top_left[1].view(n, 1)
        inside = ((rows >= 0) & (rows < cfg.cutout)).view(n, 1, h, 1) & (
            (cols >= 0) & (cols < cfg.cutout)
        ).view(n, 1, 1, w)
        x = x.masked_fill(inside, 0.0)
    return x


def default_preprocess(input_shape_hwc: tuple[int, int, int]) -> Preprocess:
    """Resize to the model's (H, W, C) input and scale to 0..1, without normalization."""
    h, w, c = input_shape_hwc
    if c not in (1, 3):
        raise CapasError(f"input shape {input_shape_hwc}: capas models take 1 or 3 channels, not {c}")
    return Preprocess(size=(h, w), channels=c)


def iterate_batches(
    data: ArrayDataset,
    batch_size: int,
    *,
    preprocess: Preprocess,
    augment: Augment | None = None,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
    epoch: int = 0,
    seed: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (float images (B, channels, H, W), int64 labels (B,)) on `device`, one pass over `data`.

    Alternating flips (`augment.hflip: alternate`) follow the `epoch` and the run's `seed`.

    Shuffling and augmentation draw from `generator` (the global one when None). For the fastest
    GPU epochs pass `data.to(device)`: batches are then gathered on the GPU and nothing crosses the bus.
    """
    if batch_size < 1:
        raise CapasError(f"batch_size must be at least 1, got {batch_size}")
    generator = torch.default_generator if generator is None else generator
    n = len(data)
    if shuffle:
        order = torch.randperm(n, generator=generator, device=generator.device).to(data.images.device)
    else:
        order = torch.arange(n, device=data.images.device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        # uint8 crosses to the device before the float conversion: a quarter of the bytes
        images = data.images[index].to(device, non_blocking=True)
        labels = data.labels[index].to(device, non_blocking=True)
        x = preprocess(images, channels_last)
        if augment is not None:
            x = augment_batch(x, augment, generator, index=index, epoch=epoch, seed=seed)
        if channels_last:  # augmentation may have changed the memory format
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, labels


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear and antialiased; interpolate keeps the batch's memory format."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
