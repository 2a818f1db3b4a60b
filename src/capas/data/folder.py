"""Image folders (`<root>/<class>/<image>`), decoded once and cached as a .npz file (no pickle)."""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, read_file

from capas import atomic
from capas.data.dataset import ArrayDataset
from capas.data.download import cache_root
from capas.errors import CapasError

SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CACHE_FORMAT = 1  # part of the fingerprint: bump it when decoding changes, to ignore old caches


def load_folder(path: str | Path) -> ArrayDataset:
    """Every image under `path/<class>/`, classes in name order; decoded on first use, then cached.

    Images are decoded as RGB and kept as one channel when every image is gray (R = G = B). They
    must all have one size: resizing belongs to `Preprocess`, which applies it to batches.
    The cache is keyed by a fingerprint of the relative paths, sizes and modification times, so
    adding, removing or editing a file decodes the folder again.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CapasError(f"image folder {root} {'is not a folder' if root.exists() else 'does not exist'}")
    classes, files, labels = _scan(root)
    cache = cache_root() / "folders" / f"{_fingerprint(files)}.npz"
    if cache.is_file():
        return _load_cache(cache)
    dataset = _decode(root, [rel for rel, _, _ in files], labels, classes)
    _save_cache(cache, dataset)
    return dataset


def _scan(root: Path) -> tuple[tuple[str, ...], list[tuple[str, int, int]], list[int]]:
    """(class names, [(relative path, size, mtime_ns)], labels) for the images under `root`."""
    classes = tuple(sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")))
    if not classes:
        raise CapasError(f"image folder {root} has no class folders: expected {root}/<class>/<image>")
    files, labels = [], []
    for label, name in enumerate(classes):
        with os.scandir(root / name) as entries:
            images = sorted((e for e in entries if _is_image(e)), key=lambda e: e.name)
        if not images:
            raise CapasError(f"class folder {root / name} holds no images ({', '.join(SUFFIXES)})")
        for entry in images:
            stat = entry.stat()
            files.append((f"{name}/{entry.name}", stat.st_size, stat.st_mtime_ns))
        labels += [label] * len(images)
    return classes, files, labels


def _is_image(entry: os.DirEntry) -> bool:
    return entry.is_file() and not entry.name.startswith(".") and entry.name.lower().endswith(SUFFIXES)


def _fingerprint(files: list[tuple[str, int, int]]) -> str:
    digest = hashlib.sha256(f"capas-folder-cache {CACHE_FORMAT}\n".encode())
    for rel, size, mtime_ns in files:
        digest.update(f"{rel}\t{size}\t{mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _decode(root: Path, rels: list[str], labels: list[int], classes: tuple[str, ...]) -> ArrayDataset:
    # One image at a time: decoding threads were measured no faster. torchvision 0.29 deprecates its
    # decoders for TorchCodec's, but they are still the fastest here (50,000 32x32 JPEGs: 3.0 s, PIL
    # 4.4 s), so the warning is silenced until they are removed.
    images = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        for rel in rels:
            try:
                images.append(decode_image(read_file(str(root / rel)), mode=ImageReadMode.RGB))  # (3, H, W)
            except (RuntimeError, OSError, ValueError) as err:
                raise CapasError(f"cannot decode image {root / rel}: {err}") from err
    first_of_size: dict[tuple[int, int], str] = {}
    for rel, image in zip(rels, images, strict=True):
        first_of_size.setdefault((image.shape[1], image.shape[2]), rel)
    if len(first_of_size) > 1:
        examples = "; ".join(f"{h}x{w}: {root / rel}" for (h, w), rel in first_of_size.items())
        raise CapasError(f"images in {root} differ in size (H x W: {examples}); all must share one size")
    stacked = torch.stack(images)  # (N, 3, H, W)
    if torch.equal(stacked[:, 0], stacked[:, 1]) and torch.equal(stacked[:, 1], stacked[:, 2]):
        stacked = stacked[:, :1].contiguous()  # every image is gray: keep one channel
    return ArrayDataset(stacked, torch.tensor(labels, dtype=torch.int64), classes)


def _load_cache(cache: Path) -> ArrayDataset:
    try:
        with np.load(cache, allow_pickle=False) as stored:
            images, labels, classes = stored["images"], stored["labels"], stored["classes"]
        return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels), tuple(classes.tolist()))
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise CapasError(f"damaged cache file {cache} ({err}): delete it to decode the folder again") from err


def _save_cache(cache: Path, dataset: ArrayDataset) -> None:
    """Write the cache atomically (capas.atomic); warn rather than fail if it can't."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a bare name
            np.savez(
                f,
                images=dataset.images.numpy(),
                labels=dataset.labels.numpy(),
                classes=np.array(dataset.classes),
            )

    try:
        atomic.write_with(cache, write)
    except OSError as err:
        warnings.warn(f"could not cache the decoded images at {cache}: {err}", stacklevel=3)
