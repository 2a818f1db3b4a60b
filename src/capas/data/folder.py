"""Image folders (`<root>/<class>/<image>`), decoded once and cached as a .npz file (no pickle)."""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import PIL
import torch

from capas import atomic
from capas.data.dataset import ArrayDataset, control_character
from capas.data.download import cache_root
from capas.data.images import image_size, naming_warnings, read_image
from capas.errors import CapasError

# the file names of the formats read_image decodes (images.FORMATS), all that Pillow registers for
# them: any other file is not an image
SUFFIXES = (".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".gif", ".bmp", ".tif", ".tiff")
SUFFIXES += (".webp", ".pbm", ".pgm", ".ppm", ".pnm", ".pfm")
# part of the fingerprint, with Pillow's version: bump it when capas' decoding changes, to ignore old
# caches (4: a TIFF's orientation tag applied once)
CACHE_FORMAT = 4
MAX_PIXELS = 16_000_000  # per training image, checked from the header before decoding


def load_folder(path: str | Path) -> ArrayDataset:
    """Every image in `path/<class>/`, classes in name order; decoded on first use, then cached.

    Images are decoded by `read_image` (capas.data.images: the decoder predict and serve use) and
    kept as one channel when every image is gray (R = G = B). They must all have one size, checked
    from the headers before any image is decoded: resizing belongs to `Preprocess`, which applies
    it to batches. A symbolic link that leads outside `path`, or nowhere, is refused. The cache is
    keyed by Pillow's version and a fingerprint of the folder's real path and each file's relative path, size,
    modification and change times and inode, so adding, removing, editing or renaming a file
    decodes the folder again (the change time, which no tool sets back, catches a file swapped
    with another of its size and modification time, as tar, cp -p or rsync -a leave them).
    """
    _check_text(str(path), f"image folder {os.fsencode(path)}")  # the run records it, serve's /info shows it
    root = Path(path).expanduser()
    if not os.path.isdir(root):  # os.path's: False for a name too long to be a file's, where Path's raise
        raise CapasError(
            f"image folder {root} {'is not a folder' if os.path.exists(root) else 'does not exist'}"
        )
    classes, files, labels = _scan(root)
    cache = cache_root() / "folders" / f"{_fingerprint(root, files)}.npz"
    if cache.is_file():
        return _load_cache(cache)
    dataset = _decode(root, [rel for rel, _ in files], labels, classes)
    _save_cache(cache, dataset)
    return dataset


def _scan(root: Path) -> tuple[tuple[str, ...], list[tuple[str, tuple[int, ...]]], list[int]]:
    """(class names, [(relative path, (size, mtime_ns, ctime_ns, inode))], labels) for the images
    under `root`."""
    real_root = root.resolve()
    folders = [e for e in _listing(root) if _followed(e).is_dir()]
    for entry in folders:
        _inside(real_root, entry)
    classes = tuple(e.name for e in folders)  # in name order, as _listing gives them
    for name in classes:  # a class's name is text in the run's JSON, a study's report and serve's answers
        _check_text(name, f"class folder {os.fsencode(name)} in {root}")
    if not classes:
        raise CapasError(f"image folder {root} has no class folders: expected {root}/<class>/<image>")
    if len(classes) == 1:  # trains to accuracy 1.0: almost surely one level too deep
        raise CapasError(
            f"image folder {root} has a single class folder {classes[0]!r}: a classifier needs two or "
            f"more ({root}/<class>/<image>); did you mean its parent, {root.parent}?"
        )
    files, labels, others = [], [], []
    for label, name in enumerate(classes):
        entries = _listing(root / name)
        if nested := next((e for e in entries if _followed(e).is_dir()), None):
            raise CapasError(
                f"class folder {root / name} holds a folder, {nested.name!r}, whose images would be left "
                f"out: capas reads {root}/<class>/<image> only; move them up into {root / name}, or the "
                f"folder out of {root}"
            )
        images = [e for e in entries if _is_image(e)]
        others += [f"{name}/{e.name}" for e in entries if not _is_image(e)]
        if not images:
            raise CapasError(f"class folder {root / name} holds no images ({', '.join(SUFFIXES)})")
        for entry in images:
            _inside(real_root, entry)
            stat = entry.stat()
            stamp = (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
            files.append((f"{name}/{entry.name}", stamp))
        labels += [label] * len(images)
    if others:  # as a phone's .heic photos: left out, as Keras' image_dataset_from_directory does, but said
        counts = Counter(Path(other).suffix.lower() or "no suffix" for other in others)
        kinds = sorted(counts.items(), key=lambda item: (-item[1], item[0]))  # the most first, then by name
        warnings.warn(
            f"{root}: {len(others)} file{'s' if len(others) != 1 else ''} left out, not of a format capas decodes "
            f"({', '.join(f'{kind} {count}' for kind, count in kinds)}; e.g. {others[0]})",
            stacklevel=4,
        )
    return classes, files, labels


def _check_text(name: str, what: str) -> None:
    """Refuse a name of bytes in another encoding than UTF-8, which Python keeps as surrogates: JSON
    answers, reports and plots cannot hold them; and one with a control character (a newline), which
    breaks the lines of predict's output and of the confusion matrix."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise CapasError(
            f"{what}: its name is not UTF-8 text (made on a system with another encoding, such as a "
            "Windows zip's); rename it"
        ) from None
    if (control := control_character(name)) is not None:
        raise CapasError(f"{what}: its name holds the control character {control!r}; rename it")


def _listing(folder: Path) -> list[os.DirEntry]:
    """The entries of `folder` but its hidden ones (.DS_Store, ._photo.jpg…), in name order."""
    try:
        with os.scandir(folder) as entries:
            return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as err:
        raise CapasError(f"cannot read the folder {folder} ({err.strerror})") from None


def _is_image(entry: os.DirEntry) -> bool:
    return entry.name.lower().endswith(SUFFIXES) and entry.is_file()


def _followed(entry: os.DirEntry) -> os.DirEntry:
    """`entry`, refused if it is a symbolic link that leads nowhere (its target missing, or a loop):
    the class or image it stands for would otherwise vanish from the dataset unsaid, or fail as an
    OSError."""
    try:
        entry.stat()
    except OSError as err:
        if not entry.is_symlink():  # a file removed between the listing and now
            raise CapasError(
                f"{entry.path} disappeared while capas read the folder ({err.strerror}): rerun once "
                "nothing writes to the folder"
            ) from None
        raise CapasError(
            f"{entry.path} is a symbolic link that leads nowhere ({err.strerror}): remove it or correct it"
        ) from None
    return entry


def _inside(real_root: Path, entry: os.DirEntry) -> None:
    """Refuse a symbolic link that leads outside the dataset: training would read files nobody put
    in the folder (another user's, or /etc's), and the folder's fingerprint would not follow them."""
    if entry.is_symlink() and not Path(entry.path).resolve().is_relative_to(real_root):
        raise CapasError(
            f"image folder {real_root}: {entry.path} is a symbolic link to {Path(entry.path).resolve()}, "
            "outside the folder; copy the file in or link the whole dataset instead"
        )


def _fingerprint(root: Path, files: list[tuple[str, tuple[int, ...]]]) -> str:
    # os.fsencode: the bytes of the names as on disk, which need not be UTF-8 (a zip made on Windows)
    header = f"capas-folder-cache {CACHE_FORMAT} Pillow {PIL.__version__}\n{root.resolve()}\n"
    digest = hashlib.sha256(os.fsencode(header))
    for rel, stamp in files:
        digest.update(os.fsencode(f"{rel}\t{stamp}\n"))
    return digest.hexdigest()[:32]


def _decode(root: Path, rels: list[str], labels: list[int], classes: tuple[str, ...]) -> ArrayDataset:
    # Sizes first, from the headers alone: an odd-sized or huge image fails before any pixel is decoded.
    first_of_size: dict[tuple[int, int], str] = {}
    warned: set[str] = set()  # Pillow's warnings, each named once
    for rel in rels:
        try:
            with naming_warnings(str(root / rel), warned):
                height, width = image_size(root / rel)
        except CapasError as err:
            raise CapasError(f"cannot decode image {err}") from None
        if height * width > MAX_PIXELS:
            raise CapasError(
                f"image {root / rel}: {width}×{height} pixels is more than the {MAX_PIXELS:,} allowed "
                "for a training image"
            )
        first_of_size.setdefault((height, width), rel)
    if len(first_of_size) > 1:  # a folder of photos can hold thousands of sizes: three make the point
        examples = "; ".join(f"{h}x{w}: {root / rel}" for (h, w), rel in list(first_of_size.items())[:3])
        raise CapasError(
            f"images in {root} differ in size: {len(first_of_size)} sizes (H x W), e.g. {examples}; all "
            "must share one size (capas resizes batches to the model's input, not the files)"
        )
    # One image at a time: decoding threads were measured no faster.
    images = []
    for rel in rels:
        try:
            with naming_warnings(str(root / rel), warned):
                images.append(read_image(root / rel, max_pixels=MAX_PIXELS))  # (1 or 3, H, W)
        except CapasError as err:
            raise CapasError(f"cannot decode image {err}") from None
    if any(len(image) == 3 for image in images):
        images = [image.expand(3, -1, -1) for image in images]
    stacked = torch.stack(images)  # (N, C, H, W)
    if (
        len(stacked[0]) == 3
        and torch.equal(stacked[:, 0], stacked[:, 1])
        and torch.equal(stacked[:, 1], stacked[:, 2])
    ):
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

    atomic.write_cache(cache, write, "the decoded images")
