"""Image folders: decoding, the gray/colour rule, size and error checks, and the decoded cache."""

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hostile
from capas.data import folder, load_dataset
from capas.errors import CapasError

CIFAR_JPEG = Path("/work/shared/datasets/cifar10-jpeg/train")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPAS_CACHE", str(tmp_path / "cache"))


def pixels(seed: int, mode: str, size=(12, 10)) -> np.ndarray:
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95)
    return path


def test_colour_folder(tmp_path):
    arrays = {
        f"{cls}/{i}.png": pixels(10 * c + i, "RGB")
        for c, cls in enumerate(["cat", "ant", "dog"])
        for i in range(2)
    }
    for rel, array in arrays.items():
        write(tmp_path / "imgs" / rel, array)
    write(tmp_path / "imgs" / "cat" / "2.jpg", pixels(99, "RGB"))
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / "dog" / "IMG_1.HEIC").write_bytes(b"a phone's photo")
    (tmp_path / "imgs" / ".hidden").mkdir()
    # files of other formats are left out, and said so (a folder of phone photos lost them unsaid)
    with pytest.warns(
        UserWarning,
        match=r"imgs: 2 files left out, not of a format capas decodes "
        r"\(\.heic 1, \.txt 1; e\.g\. cat/notes\.txt\)",
    ):
        train, test = load_dataset(f"folder:{tmp_path / 'imgs'}")
    assert test is None
    assert train.classes == ("ant", "cat", "dog")  # sorted by name
    assert train.images.shape == (7, 3, 10, 12) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
    # PNG is lossless: pixels come back exactly, as (C, H, W)
    assert torch.equal(train.images[0], torch.from_numpy(arrays["ant/0.png"]).permute(2, 0, 1))
    assert torch.equal(train.images[6], torch.from_numpy(arrays["dog/1.png"]).permute(2, 0, 1))


def test_gray_folder_keeps_one_channel(tmp_path):
    gray = pixels(1, "L")
    write(tmp_path / "a" / "x.png", gray)
    write(tmp_path / "b" / "y.jpg", pixels(2, "L"))
    data, _ = load_dataset(f"folder:{tmp_path}")
    assert data.images.shape == (2, 1, 10, 12)
    assert torch.equal(data.images[0, 0], torch.from_numpy(gray))


def test_one_colour_image_makes_the_folder_rgb(tmp_path):
    gray = pixels(1, "L")
    write(tmp_path / "a" / "x.png", gray)
    write(tmp_path / "b" / "y.png", pixels(2, "RGB"))
    data, _ = load_dataset(f"folder:{tmp_path}")
    assert data.images.shape == (2, 3, 10, 12)
    assert torch.equal(data.images[0], torch.from_numpy(gray).expand(3, -1, -1))


def test_second_load_comes_from_the_cache(tmp_path, monkeypatch):
    for i in range(40):
        write(tmp_path / "imgs" / f"c{i % 4}" / f"{i}.jpg", pixels(i, "RGB", (32, 32)))
    start = time.perf_counter()
    first, _ = load_dataset(f"folder:{tmp_path / 'imgs'}")
    decode_s = time.perf_counter() - start
    (cache,) = (tmp_path / "cache" / "folders").iterdir()
    assert cache.suffix == ".npz"

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache holds the folder")

    monkeypatch.setattr(folder, "read_image", no_decoding)
    start = time.perf_counter()
    second, _ = load_dataset(f"folder:{tmp_path / 'imgs'}")
    cached_s = time.perf_counter() - start
    print(f"40 images: decoded in {decode_s * 1e3:.1f} ms, from the cache in {cached_s * 1e3:.1f} ms")
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert first.classes == second.classes

    # editing a file changes the fingerprint: the folder is decoded again
    os.utime(tmp_path / "imgs" / "c0" / "0.jpg", ns=(0, 0))
    with pytest.raises(AssertionError, match="decoded although"):
        load_dataset(f"folder:{tmp_path / 'imgs'}")


def test_swapping_two_files_of_one_size_and_time_is_seen(tmp_path):
    """Two images of one size and modification time (as tar, cp -p or rsync -a leave them) swapped
    between classes kept the fingerprint: the cache gave the old images under the old labels."""
    a, b = (
        write(tmp_path / "data" / c / "0.png", np.full((4, 4), 10 + 10 * i, np.uint8))
        for i, c in enumerate("ab")
    )
    assert a.stat().st_size == b.stat().st_size
    for path in (a, b):
        os.utime(path, ns=(10**18, 10**18))
    before, _ = load_dataset(f"folder:{tmp_path / 'data'}")
    a.rename(tmp_path / "swap.png")
    b.rename(a)
    (tmp_path / "swap.png").rename(b)
    after, _ = load_dataset(f"folder:{tmp_path / 'data'}")
    assert before.images[:, 0, 0, 0].tolist() == [10, 20] and after.images[:, 0, 0, 0].tolist() == [20, 10]


def test_file_names_that_are_not_utf8_are_read(tmp_path):
    """A zip made on Windows can leave Latin-1 names (b'caf\\xe9.png'): the cache fingerprint hashed
    the names as UTF-8 and failed with a UnicodeEncodeError traceback."""
    write(tmp_path / "a" / "0.png", pixels(0, "L"))
    write(tmp_path / "b" / "0.png", pixels(1, "L"))
    os.rename(os.fsencode(tmp_path / "a" / "0.png"), os.fsencode(tmp_path / "a") + b"/caf\xe9.png")
    data, _ = load_dataset(f"folder:{tmp_path}")
    assert len(data) == 2 and data.classes == ("a", "b")


def test_a_folder_inside_a_class_is_refused(tmp_path):
    """Images in a class's sub-folder (which Keras' and torchvision's folder readers include) were
    left out of the dataset without a word."""
    write(tmp_path / "a" / "x.png", pixels(0, "L"))
    write(tmp_path / "a" / "2019" / "y.png", pixels(1, "L"))
    write(tmp_path / "b" / "z.png", pixels(2, "L"))
    with pytest.raises(
        CapasError, match=r"class folder .*/a holds a folder, '2019', whose images would be left out"
    ):
        load_dataset(f"folder:{tmp_path}")


def test_every_format_the_decoder_reads_is_in_the_dataset(tmp_path):
    """README: training folders, predict and serve share one decoder for PNG, JPEG, GIF, BMP, TIFF,
    WebP and PBM/PGM/PPM; a folder took .jpg, .jpeg, .png and .webp files only and left the others
    out without a word; then the other names Pillow gives these formats (.jfif, a browser's JPEG
    download on Windows, .jpe, .mpo, .apng, .pnm, .pfm), which `capas predict` decoded."""
    suffixes = ["png", "jpg", "gif", "bmp", "tif", "tiff", "webp", "ppm", "pgm", "PBM"]
    suffixes += ["jfif", "jpe", "mpo", "apng", "pnm", "pfm"]
    modes = {"PBM": "1", "pfm": "F"}
    for name in "ab":
        (tmp_path / name).mkdir()
        for i, suffix in enumerate(suffixes):
            image = Image.fromarray(pixels(i, "RGB", (8, 8)))
            image.convert(modes.get(suffix, "RGB")).save(tmp_path / name / f"{i}.{suffix}")
    data, _ = load_dataset(f"folder:{tmp_path}")
    assert len(data) == 2 * len(suffixes)


def test_an_unreadable_class_folder_is_named(tmp_path, monkeypatch):
    """A class folder capas may not read was a PermissionError traceback. (Root reads any folder, so
    the denial chmod 0 gives another user is what os.scandir answers here.)"""
    write(tmp_path / "data" / "a" / "x.png", pixels(0, "L"))
    write(tmp_path / "data" / "b" / "y.png", pixels(1, "L"))
    scandir = os.scandir

    def denied(path):
        if Path(path) == tmp_path / "data" / "b":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(CapasError, match=r"cannot read the folder .*data/b \(Permission denied\)"):
        load_dataset(f"folder:{tmp_path / 'data'}")


def test_sizes_must_agree(tmp_path):
    write(tmp_path / "a" / "small.png", pixels(0, "RGB", (8, 8)))
    write(tmp_path / "a" / "big.png", pixels(0, "RGB", (9, 8)))
    write(tmp_path / "b" / "other.png", pixels(1, "RGB", (8, 8)))
    with pytest.raises(
        CapasError, match=r"differ in size: 2 sizes \(H x W\), e.g. 8x9: .*a/big.png; 8x8: .*a/small.png"
    ):
        load_dataset(f"folder:{tmp_path}")
    for i in range(100):  # a folder of photos: the message names three sizes, not every one
        write(tmp_path / "b" / f"{i}.png", pixels(i, "RGB", (10 + i, 8)))
    with pytest.raises(CapasError, match=r"102 sizes") as error:
        load_dataset(f"folder:{tmp_path}")
    assert len(str(error.value)) < 500


def test_corrupt_image_is_named(tmp_path):
    write(tmp_path / "a" / "good.png", pixels(0, "RGB"))
    write(tmp_path / "b" / "good.png", pixels(1, "RGB"))
    (tmp_path / "a" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(CapasError, match=r"cannot decode image .*a/bad.jpg"):
        load_dataset(f"folder:{tmp_path}")


def test_a_warning_while_decoding_names_the_image(tmp_path):
    """Pillow's 'Corrupt EXIF data' was shown with Pillow's file and line, not the image's name."""
    write(tmp_path / "a" / "x.png", pixels(0, "L", size=(8, 8)))
    for name in ("b/bad.jpg", "b/worse.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(hostile.corrupt_exif_jpeg())
    with pytest.warns(UserWarning) as caught:  # once each, though read for its size, then decoded
        load_dataset(f"folder:{tmp_path}")
    assert [str(w.message) for w in caught] == [
        f"{tmp_path / name}: Corrupt EXIF data. Expecting to read 12 bytes but only got 4."
        for name in ("b/bad.jpg", "b/worse.jpg")
    ]


def test_missing_or_empty_folders(tmp_path):
    with pytest.raises(CapasError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(CapasError, match="does not exist"):  # was an OSError ("File name too long")
        load_dataset(f"folder:{tmp_path / ('n' * 300)}")
    with pytest.raises(CapasError, match="has no class folders"):
        load_dataset(f"folder:{tmp_path}")
    write(tmp_path / "a" / "x.png", pixels(1, "L"))
    # one class trained to accuracy 1.0: the folder given was almost surely one level too deep
    with pytest.raises(CapasError, match=r"a single class folder 'a'.*did you mean its parent"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "b").mkdir()
    with pytest.raises(CapasError, match=r"class folder .*b holds no images"):
        load_dataset(f"folder:{tmp_path}")
    with pytest.raises(CapasError, match=r"'folder:' needs a path"):  # '' read the current folder
        load_dataset("folder:")
    # a class folder named in another encoding (a Windows zip's 'Categoría' in cp1252) trained, but its
    # name, not text, made serve answer 500 and a study's report fail to write
    write(tmp_path / "b" / "x.png", pixels(2, "L"))
    latin = os.fsdecode(b"Categor\xeda")
    write(tmp_path / latin / "x.png", pixels(3, "L"))
    with pytest.raises(CapasError, match=r"class folder b'Categor\\xeda' .* not UTF-8 .*rename it"):
        load_dataset(f"folder:{tmp_path}")
    # the folder itself, which the run records and serve's /info answers with; a file's name is no text
    (tmp_path / latin).rename(tmp_path / "c")
    (tmp_path / "c" / "x.png").rename(tmp_path / "c" / os.fsdecode(b"im\xe1gen.png"))
    assert load_dataset(f"folder:{tmp_path}")[0].classes == ("a", "b", "c")
    named = tmp_path / "b" / os.fsdecode(b"dat\xe9")
    for cls in ("a", "b"):
        write(named / cls / "x.png", pixels(4, "L"))
    with pytest.raises(CapasError, match=r"image folder b'.*dat\\xe9': its name is not UTF-8"):
        load_dataset(f"folder:{named}")
    # a class named with a newline (or a tab, an escape): each line of predict's output and of the
    # confusion matrix that names it was broken in two
    (tmp_path / "c").rename(tmp_path / "cat\nx")
    with pytest.raises(CapasError, match=r"class folder b'cat\\nx' .* control character '\\n'; rename it"):
        load_dataset(f"folder:{tmp_path}")


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_JPEG.is_dir(), reason="the CIFAR-10 JPEG folder is not on this machine")
def test_real_cifar10_jpeg_folder():
    start = time.perf_counter()
    first, _ = load_dataset(f"folder:{CIFAR_JPEG}")
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    second, _ = load_dataset(f"folder:{CIFAR_JPEG}")
    cached_s = time.perf_counter() - start
    print(f"50,000 JPEGs: decoded in {decode_s:.1f} s, from the cache in {cached_s:.2f} s")
    assert first.images.shape == (50_000, 3, 32, 32)
    assert first.labels.bincount().tolist() == [5000] * 10
    assert torch.equal(first.images, second.images) and cached_s < decode_s / 3


def test_a_16_bit_png_in_a_folder_is_scaled_like_everywhere_else(tmp_path):
    values = (np.arange(120, dtype=np.uint32).reshape(10, 12) * 550).astype("<u2")  # 0..65450
    path = tmp_path / "a" / "deep.png"
    path.parent.mkdir()
    Image.frombytes("I;16", (12, 10), values.tobytes()).save(path)
    write(tmp_path / "b" / "y.png", pixels(2, "L"))
    data, _ = load_dataset(f"folder:{tmp_path}")
    assert data.images.dtype == torch.uint8 and data.images.shape == (2, 1, 10, 12)
    expected = (values.astype(np.uint32) * 255 + 32767) // 65535
    assert torch.equal(data.images[0, 0], torch.from_numpy(expected.astype(np.uint8)))


def test_a_symlink_leaving_the_folder_is_refused(tmp_path):
    write(tmp_path / "data" / "a" / "x.png", pixels(0, "L"))
    write(tmp_path / "data" / "c" / "w.png", pixels(2, "L"))
    outside = write(tmp_path / "elsewhere" / "secret.png", pixels(1, "L"))
    (tmp_path / "data" / "a" / "y.png").symlink_to(outside)
    with pytest.raises(CapasError, match=r"a/y.png is a symbolic link to .*elsewhere/secret.png, outside"):
        load_dataset(f"folder:{tmp_path / 'data'}")
    (tmp_path / "data" / "a" / "y.png").unlink()
    (tmp_path / "data" / "b").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(CapasError, match=r"data/b is a symbolic link"):
        load_dataset(f"folder:{tmp_path / 'data'}")
    (tmp_path / "data" / "b").unlink()
    (tmp_path / "data" / "a" / "z.png").symlink_to(tmp_path / "data" / "a" / "x.png")  # inside: fine
    data, _ = load_dataset(f"folder:{tmp_path / 'data'}")
    assert len(data) == 3


@pytest.mark.parametrize("name", ["a/lost.png", "a/loop.png", "b"])
def test_a_symlink_that_leads_nowhere_is_named(tmp_path, name):
    """A dangling image link vanished from the dataset unsaid; a link loop was an OSError traceback."""
    write(tmp_path / "a" / "x.png", pixels(0, "L"))
    write(tmp_path / "c" / "w.png", pixels(1, "L"))
    link = tmp_path / name
    link.symlink_to(link if "loop" in name else tmp_path / "missing")
    with pytest.raises(CapasError, match=f"{link} is a symbolic link that leads nowhere"):
        load_dataset(f"folder:{tmp_path}")


def test_a_file_removed_while_the_folder_is_read_is_not_called_a_link(tmp_path):
    """An image deleted between the folder's listing and its stat was "a symbolic link that leads nowhere"."""
    write(tmp_path / "a" / "x.png", pixels(0, "L"))
    with os.scandir(tmp_path / "a") as entries:
        (entry,) = list(entries)
    (tmp_path / "a" / "x.png").unlink()  # as another process would, while capas reads the folder
    with pytest.raises(CapasError, match=f"{entry.path} disappeared while capas read the folder"):
        folder._followed(entry)


def test_huge_images_are_refused_from_the_header(tmp_path):
    write(tmp_path / "a" / "x.png", pixels(0, "L", (5000, 4000)))  # 20 M pixels
    write(tmp_path / "b" / "y.png", pixels(0, "L"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image before checking the sizes")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(folder, "read_image", no_decoding)
        with pytest.raises(
            CapasError, match=r"a/x.png: 5000×4000 pixels is more than the 16,000,000 allowed"
        ):
            load_dataset(f"folder:{tmp_path}")


def test_another_pillow_decodes_the_folder_again(tmp_path, monkeypatch):
    """Pillow's decoders change (13 began to turn TIFFs by their orientation tag): a folder cached by
    another Pillow kept its old decoding, while predict and serve used the new one."""
    import PIL

    write(tmp_path / "imgs" / "a" / "x.png", pixels(1, "L"))
    write(tmp_path / "imgs" / "b" / "y.png", pixels(2, "L"))
    load_dataset(f"folder:{tmp_path / 'imgs'}")
    monkeypatch.setattr(PIL, "__version__", "0.0.1")
    load_dataset(f"folder:{tmp_path / 'imgs'}")
    assert len(list((tmp_path / "cache" / "folders").iterdir())) == 2


def test_the_cache_is_keyed_by_the_folder_too(tmp_path):
    """Two folders with the same names, sizes and times but other pixels are two datasets."""
    for root, seed in (("one", 0), ("two", 1)):
        for name in ("a/x.png", "b/y.png"):
            path = tmp_path / root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels(seed, "L")).save(path, compress_level=0)  # stored: same size
            os.utime(path, ns=(10**18, 10**18))
            os.utime(path.parent, ns=(10**18, 10**18))
    first, _ = load_dataset(f"folder:{tmp_path / 'one'}")
    second, _ = load_dataset(f"folder:{tmp_path / 'two'}")
    assert not torch.equal(first.images, second.images)
    assert torch.equal(second.images[0, 0], torch.from_numpy(pixels(1, "L")))
