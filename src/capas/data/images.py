"""Decoding one image file (prediction, serving) into the uint8 (C, H, W) tensors datasets hold."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from capas.errors import CapasError

MAX_PIXELS = 40_000_000  # larger images are refused before decoding (decompression bombs)


def read_image(
    source: Path | bytes, *, name: str | None = None, max_pixels: int = MAX_PIXELS
) -> torch.Tensor:
    """A file or its bytes as uint8 (C, H, W): grey images keep 1 channel, everything else becomes RGB.

    The size is checked from the header before any pixel is decoded, so a tiny file that claims
    20,000×20,000 pixels is refused without allocating memory for it.
    """
    label = name or (str(source) if isinstance(source, Path) else "image")
    try:
        raw = source.read_bytes() if isinstance(source, Path) else source
    except OSError as error:
        raise CapasError(f"{label}: cannot read ({error.strerror or error})") from None
    if not raw:
        raise CapasError(f"{label}: empty file, not an image")
    try:
        with Image.open(io.BytesIO(raw)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise CapasError(f"{label}: {width}×{height} pixels is more than the {max_pixels:,} allowed")
            image = image.convert("L" if image.mode in ("1", "L", "I;16", "I") else "RGB")
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise CapasError(f"{label}: not a readable image ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt data
        raise CapasError(f"{label}: damaged or truncated image ({error})") from None
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()
