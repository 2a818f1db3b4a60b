"""The one image decoder: training folders, `capas predict` and `capas serve` all turn files into
uint8 (C, H, W) tensors here, so a model sees the same pixels wherever its images come from.

How image modes become 8-bit pixels (the rules a user can rely on):
- EXIF orientation is applied (a phone photo taken upright is upright), as image viewers do.
- 16-bit grey images (PNG, TIFF, and PGM deeper than 8 bits) are scaled from 0..65535 to 0..255
  (value × 255 / 65535, rounded); 16-bit PNGs with colour or alpha keep each value's high byte
  (value // 256), which is all Pillow decodes of them (as RGB or RGBA, grey with alpha included):
  within one level of the scaled value.
- 32-bit integer images: values already within 0..255 are kept; within 0..65535 they are scaled as
  16-bit; otherwise the image's own minimum..maximum is stretched to 0..255.
- 32-bit float images: values within 0..1 are scaled by 255; within 0..255 kept; otherwise the
  image's minimum..maximum is stretched to 0..255 (NaN becomes 0).
- Transparent pixels are composited on a white background (BACKGROUND), as a browser shows them.
- Grey images (with or without alpha, any depth but 16-bit with alpha) keep 1 channel; every other mode becomes RGB.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from capas.errors import CapasError

# The formats capas decodes: Pillow's other plugins (EPS runs Ghostscript; AVIF, BLP, DDS, SPIDER…
# fail on damaged files in ways of their own) stay out of reach of a served request. JPEG includes
# the multi-picture JPEGs of phone cameras (Pillow's MPO); PPM covers PBM, PGM and PPM.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
MAX_PIXELS = 40_000_000  # larger images are refused before decoding (decompression bombs)
# With a model's size, larger images are shrunk while decoding (a 4000×4000 one costs 64 MB whole);
# smaller ones decode whole, as a training folder's images do, so that they reach the model as the
# tensor training made of them: shrinking first (a box average before the resize) moves pixels, by
# up to 24/255 on a photo
SHRINK_ABOVE = 2**20  # pixels: 1024×1024
# larger files are refused unread past this: more than any image of MAX_PIXELS needs, uncompressed
# at 16 bits in four channels; a device or pipe that never ends (/dev/zero) stops here
MAX_BYTES = 512 * 2**20
BACKGROUND = 255  # the grey level (and RGB value) transparent pixels are composited on: white
ORIENTATION = 0x0112  # the EXIF tag
# EXIF orientation -> the transpose that makes the image upright (as PIL.ImageOps.exif_transpose)
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _raw(source: Path | bytes, label: str) -> bytes:
    try:
        if isinstance(source, Path):
            with source.open("rb") as file:
                raw = file.read(MAX_BYTES + 1)
        else:
            raw = source
    except OSError as error:
        raise CapasError(f"{label}: cannot read ({error.strerror or error})") from None
    if len(raw) > MAX_BYTES:
        raise CapasError(f"{label}: more than {MAX_BYTES // 2**20} MiB, larger than any image capas decodes")
    if not raw:
        raise CapasError(f"{label}: empty file, not an image")
    return raw


def _label(source: Path | bytes, name: str | None) -> str:
    return name or (str(source) if isinstance(source, Path) else "image")


def image_size(source: Path | bytes, *, name: str | None = None) -> tuple[int, int]:
    """(height, width) of an image as it will be decoded (EXIF orientation applied), from its header
    alone: no pixel is decoded, so budgets can be checked before any memory is spent."""
    label = _label(source, name)
    raw = _raw(source, label)
    with _decoding(label), Image.open(io.BytesIO(raw), formats=FORMATS) as image:
        width, height = _stored_size(image)
        if image.format == "PNG" and "exif" not in image.info:
            # an eXIf chunk after the pixels: Pillow's getexif() would decode them all to reach it
            exif = Image.Exif()
            if (chunk := _png_chunk(raw, b"eXIf")) is not None:
                exif.load(b"Exif\x00\x00" + chunk)
        else:
            exif = image.getexif()
        rotated = exif.get(ORIENTATION, 1) in (5, 6, 7, 8)
    return (width, height) if rotated else (height, width)


def _png_chunk(raw: bytes, kind: bytes) -> bytes | None:
    """The data of a PNG's first chunk of `kind`, found by the chunks' lengths: nothing is inflated."""
    at = 8  # past the signature; each chunk: length (4 bytes, big-endian), type (4), data, CRC (4)
    while at + 8 <= len(raw):
        length, found = int.from_bytes(raw[at : at + 4], "big"), raw[at + 4 : at + 8]
        if found == kind:
            return raw[at + 8 : at + 8 + length]
        if found == b"IEND":
            return None
        at += 12 + length
    return None


def _stored_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as the file stores the pixels: Pillow 13 reports a TIFF's size already turned
    by its orientation tag (and turns its pixels as it loads them), other formats' as stored."""
    if image.format == "TIFF":
        return image.tag_v2[256], image.tag_v2[257]  # ImageWidth, ImageLength
    return image.size


def read_image(
    source: Path | bytes,
    *,
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """A file or its bytes as uint8 (C, H, W), converted by the rules of the module docstring.

    The size is checked from the header before any pixel is decoded, so a tiny file that claims
    20,000×20,000 pixels is refused without allocating memory for it. With `size` (the model's
    input (H, W)), an image of more than SHRINK_ABOVE pixels is shrunk while it is decoded (JPEG's
    DCT scaling, then an integer box reduction) to no less than twice `size`, so a 4000×4000 photo
    for a 28×28 model never exists as a full-size array; the caller's Preprocess does the final
    antialiased resize.
    """
    label = _label(source, name)
    raw = _raw(source, label)
    with _decoding(label), Image.open(io.BytesIO(raw), formats=FORMATS) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise CapasError(f"{label}: {width}×{height} pixels is more than the {max_pixels:,} allowed")
        if width * height <= SHRINK_ABOVE:
            size = None  # decoded whole, as training decodes a folder's images: the same pixels
        if size is not None and image.format == "JPEG":  # Pillow leaves a JPEG's orientation to us
            turned = image.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8)
            factor = min(_factors(image.size, (size[1], size[0]) if turned else size))
            if factor > 1:  # decode at 1/2, 1/4 or 1/8 scale (both sides alike): never at full size
                image.draft(image.mode, (width // factor, height // factor))
        image.load()
        # read after loading: Pillow 13 turns a TIFF itself as it loads it, and drops its tag
        orientation = image.getexif().get(ORIENTATION, 1)
        if size is not None and orientation in (5, 6, 7, 8):
            size = (size[1], size[0])  # the loaded image is still a quarter turn from upright
        image = _eight_bit(image)  # L, LA, RGB or RGBA
        if size is not None and max(factors := _factors(image.size, size)) > 1:
            image = image.reduce(factors)  # box average of fx × fy pixels
        if orientation in UPRIGHT:
            image = image.transpose(UPRIGHT[orientation])
        array = _composite(image)  # (H, W) or (H, W, 3) uint8
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()


@contextlib.contextmanager
def _decoding(label: str) -> Iterator[None]:
    """Any failure to decode the file -> one CapasError naming it. The file is untrusted input and
    Pillow's plugins fail on damaged data with whatever their parsing meets (OSError, SyntaxError,
    ValueError, but also RuntimeError, NotImplementedError, struct.error, IndexError…): none of it
    is capas' bug, all of it is the file's."""
    try:
        yield
    except (CapasError, MemoryError):
        raise
    except UnidentifiedImageError:  # its message names a BytesIO object, not the file
        raise CapasError(
            f"{label}: not a readable image in a format capas reads ({', '.join(FORMATS)})"
        ) from None
    except Image.DecompressionBombError as error:  # Pillow's limit, far above capas' own
        claimed = re.search(r"\((\d+) pixels\)", str(error))
        pixels = f"{int(claimed[1]):,} pixels" if claimed else "more pixels than Pillow decodes"
        raise CapasError(f"{label}: {pixels}, more than capas decodes (a decompression bomb)") from None
    except Exception as error:  # truncated or corrupt data
        raise CapasError(f"{label}: damaged or truncated image ({error or type(error).__name__})") from None


@contextlib.contextmanager
def naming_warnings(label: str, shown: set[str]) -> Iterator[None]:
    """Warnings the block raises (Pillow's 'Corrupt EXIF data', which Python shows with Pillow's file
    and line and, by default, for the first image only) raised again as one line naming the image,
    unless in `shown`, the messages raised already (a folder's image warns as its size is read and
    again as it is decoded). warnings.catch_warnings swaps process-wide state: for the single-threaded
    decoders only (a training folder, predict's files), never serve's decode threads, which leave
    Pillow's warnings as they are."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        message = f"{label}: {' '.join(str(warning.message).split())}"
        if message not in shown:
            shown.add(message)
            warnings.warn(message, warning.category, stacklevel=1)


def _factors(actual: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The integer shrink factors (across, down) that keep an image of (W, H) `actual` at least twice
    (H, W) `target`, each side its own: a 1 × 4,000,000 strip shrinks down its length."""
    return max(1, actual[0] // (2 * target[1])), max(1, actual[1] // (2 * target[0]))


def _eight_bit(image: Image.Image) -> Image.Image:
    """Any mode -> L, LA, RGB or RGBA with 8 bits per channel (see the module docstring)."""
    mode = image.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    # Pillow opens a PGM deeper than 8 bits as "I", on the 0..65535 scale whatever its maxval
    if mode.startswith("I;16") or (mode == "I" and image.format == "PPM"):
        values = np.asarray(image).astype(np.uint32)  # 0..65535
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    if mode in ("I", "F"):
        return Image.fromarray(_stretch(np.asarray(image), floating=mode == "F"), "L")
    if mode in ("PA", "La", "RGBa"):
        return image.convert("LA" if mode == "La" else "RGBA")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX, …


def _stretch(values: np.ndarray, floating: bool) -> np.ndarray:
    """32-bit integer or float values -> uint8 by the rules of the module docstring."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if floating and low >= 0 and high <= 1:
        scaled = values * 255
    elif low >= 0 and high <= 255:
        scaled = values
    elif not floating and low >= 0 and high <= 65535:
        scaled = values * 255 / 65535
    else:
        scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _composite(image: Image.Image) -> np.ndarray:
    """L/RGB as an array; LA/RGBA composited on BACKGROUND: colour × alpha + background × (1 − alpha)."""
    array = np.asarray(image)
    if image.mode not in ("LA", "RGBA"):
        return array.copy()  # writable, owned by the tensor
    colour, alpha = array[..., :-1].astype(np.uint32), array[..., -1:].astype(np.uint32)
    blended = (colour * alpha + BACKGROUND * (255 - alpha) + 127) // 255
    return (blended[..., 0] if image.mode == "LA" else blended).astype(np.uint8)
