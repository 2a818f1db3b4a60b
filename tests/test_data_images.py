"""The one image decoder (capas.data.images): modes, EXIF orientation, alpha, shrinking while decoding."""

import io
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

import hostile
from capas.data import Preprocess, image_size, read_image
from capas.data.images import BACKGROUND
from capas.errors import CapasError

RAMP = np.rint(np.linspace(0, 255, 28)).astype(np.int16)  # what every ramp of the corpus means in 8 bits


@pytest.mark.parametrize("name", ["grey16.png", "int32.tiff", "float32.tiff"])
def test_deep_images_are_scaled_to_8_bits_not_clipped(name):
    image = read_image(hostile.images()[name])
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8
    row = image[0, 0].numpy().astype(np.int16)
    assert np.abs(row - RAMP).max() <= 1, row  # clipped, 99% of a 16-bit ramp would be 255


def test_32_bit_values_outside_16_bits_are_stretched():
    values = np.array([[-5, 0, 10**9]], np.int32)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, "TIFF")
    assert read_image(buffer.getvalue())[0, 0].tolist() == [0, 0, 255]


@pytest.mark.parametrize("maxval", [65535, 4095])
def test_a_16_bit_pgm_is_scaled_as_16_bit_however_dark(maxval):
    """Pillow opens a PGM deeper than 8 bits as a 32-bit integer image ('I') on its 0..65535 scale:
    a dark one (every value within 0..255) was kept as 8-bit values, about 257 times too bright."""
    values = np.array([[0, maxval // 256, maxval // 2, maxval]], ">u2")
    pgm = f"P5\n4 1\n{maxval}\n".encode() + values.tobytes()
    assert read_image(pgm)[0, 0].tolist() == [0, 1, 127, 255]
    assert read_image(pgm.replace(values.tobytes(), (values // 256).astype(">u2").tobytes()))[0, 0].max() <= 1


def test_exif_orientation_is_applied():
    image = read_image(hostile.images()["exif-rotated.jpg"])  # stored 40 wide × 20 high, left half white
    assert image.shape == (1, 40, 20)  # upright: 20 wide × 40 high, the white half on top
    assert image[0, :18].float().mean() > 250 and image[0, 22:].float().mean() < 5
    assert image_size(hostile.images()["exif-rotated.jpg"]) == (40, 20)


UPRIGHT_3X2 = {  # a 2-high, 3-wide image with its first pixel white, displayed by orientation tag
    1: [[255, 0, 0], [0, 0, 0]],
    2: [[0, 0, 255], [0, 0, 0]],
    3: [[0, 0, 0], [0, 0, 255]],
    4: [[0, 0, 0], [255, 0, 0]],
    5: [[255, 0], [0, 0], [0, 0]],
    6: [[0, 255], [0, 0], [0, 0]],
    7: [[0, 0], [0, 0], [0, 255]],
    8: [[0, 0], [0, 0], [255, 0]],
}


@pytest.mark.parametrize("fmt", ["TIFF", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_is_displayed_upright_in_every_format(fmt, orientation):
    """Pillow 13 orients a TIFF itself as it opens and loads it (its size already swapped, the tag then
    dropped): capas turned it again, tags 2 to 4 undone and 6 and 8 upside down."""
    pixels = np.zeros((2, 3), np.uint8)
    pixels[0, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, exif=exif, **({"lossless": True} if fmt == "WEBP" else {}))
    expected = UPRIGHT_3X2[orientation]
    assert read_image(buffer.getvalue())[0].tolist() == expected
    assert image_size(buffer.getvalue()) == (len(expected), len(expected[0]))


def _png_with_exif_last(pixels: np.ndarray, orientation: int) -> bytes:
    """A PNG whose eXIf chunk comes after its pixels (IDAT), just before IEND, as the PNG spec allows."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    plain = io.BytesIO()
    Image.fromarray(pixels).save(plain, "PNG")
    data = exif.tobytes()[6:]  # without Pillow's "Exif\0\0" prefix, which PNG's chunk has not
    chunk = len(data).to_bytes(4, "big") + b"eXIf" + data + zlib.crc32(b"eXIf" + data).to_bytes(4, "big")
    raw = plain.getvalue()
    return raw[:-12] + chunk + raw[-12:]  # IEND is the last 12 bytes


@pytest.mark.parametrize("orientation", [1, 6])
def test_a_pngs_size_comes_from_its_chunks_without_decoding_it(monkeypatch, orientation):
    """Pillow's getexif() decodes a PNG whole to look for an eXIf chunk after the pixels: image_size
    decoded every PNG (a 0.5 MB PNG of 12,000×12,000 pixels took 5 s and 505 MB before serve refused
    it as too large) and a training folder's PNGs were decoded twice."""
    pixels = np.zeros((2, 3), np.uint8)
    pixels[0, 0] = 255
    raw = _png_with_exif_last(pixels, orientation)
    expected = UPRIGHT_3X2[orientation]
    assert read_image(raw)[0].tolist() == expected  # Pillow reads such a chunk as it decodes

    def no_decoding(self):
        raise AssertionError("decoded the pixels")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    assert image_size(raw) == (len(expected), len(expected[0]))


def test_alpha_is_composited_on_the_background():
    image = read_image(hostile.images()["alpha.png"])  # black; left half opaque, right half transparent
    assert image.shape == (3, 28, 28)
    assert image[:, :, :14].eq(0).all() and image[:, :, 14:].eq(BACKGROUND).all()
    grey_alpha = io.BytesIO()
    Image.fromarray(np.dstack([np.zeros((4, 4), np.uint8), np.full((4, 4), 128, np.uint8)]), "LA").save(
        grey_alpha, "PNG"
    )
    assert read_image(grey_alpha.getvalue()).eq(round(BACKGROUND * 127 / 255)).all()  # half-transparent black


def test_large_images_shrink_while_decoding_to_twice_the_model_size():
    palette = hostile.palette_png()  # 4000 × 4000
    assert image_size(palette) == (4000, 4000)
    small = read_image(palette, size=(28, 28))
    assert small.shape == (3, 57, 57)  # 4000 // 70: at least twice 28 on each side
    assert read_image(hostile.palette_png(40), size=(28, 28)).shape == (3, 40, 40)  # never enlarged
    photo = io.BytesIO()
    Image.fromarray(np.full((3000, 2000, 3), 90, np.uint8)).save(photo, "JPEG")
    shrunk = read_image(photo.getvalue(), size=(32, 32))
    assert shrunk.shape[1] >= 64 and shrunk.shape[2] >= 64 and shrunk.shape[1] < 200
    assert abs(shrunk.float().mean().item() - 90) < 2


def test_a_long_strip_shrinks_along_its_length_and_resizes_without_a_large_intermediate(monkeypatch):
    """A 1 × 4,000,000 PNG (8 kB) was not shrunk (its one-pixel side set the factor), and interpolate,
    which resizes the width first, made it 4,000,000 × the model's width: 680 MB → 2.3 GB in serve
    for a 32×32 model, tens of GB for 224×224."""
    strip = io.BytesIO()
    Image.new("P", (1, 4_000_000)).save(strip, "PNG")
    image = read_image(strip.getvalue(), size=(32, 32))
    assert image.shape == (3, 64, 1)  # at least twice 32 down its length, its one column kept
    shapes = []
    interpolate = torch.nn.functional.interpolate

    def recording(x, **kwargs):
        out = interpolate(x, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr("capas.data.batches.F.interpolate", recording)
    tall = torch.randint(0, 256, (1, 3, 100_000, 1), dtype=torch.uint8)
    out = Preprocess(size=(224, 224), channels=3)(tall)
    assert out.shape == (1, 3, 224, 224)
    assert max(math.prod(shape) for shape in shapes) == 3 * 224 * 224  # never 100,000 × 224
    expected = interpolate(tall.float() / 255, size=(224, 224), mode="bilinear", antialias=True)
    assert (out - expected).abs().max() < 1e-4


def test_images_a_training_folder_may_hold_decode_whole_whatever_the_model_size():
    """A 256×256 image for a 28×28 model was shrunk while decoding, so `capas serve` gave the model
    other pixels than training, which decodes a folder's images whole."""
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8)).save(noise, "PNG")
    assert torch.equal(read_image(noise.getvalue(), size=(28, 28)), read_image(noise.getvalue()))


def test_pixel_limit_is_checked_before_decoding():
    for read in (read_image, image_size):  # Pillow's own limit (179 M pixels), its size in capas' words
        with pytest.raises(CapasError, match=r"^bomb.png: 400,000,000 pixels, more than capas decodes"):
            read(hostile.bomb_png(), name="bomb.png")
    with pytest.raises(CapasError, match="4000×4000 pixels is more than the 1,000,000 allowed"):
        read_image(hostile.palette_png(), max_pixels=1_000_000)


def test_a_file_that_never_ends_is_refused_after_the_byte_limit(monkeypatch):
    """`capas predict RUN /dev/zero` read until memory ran out."""
    monkeypatch.setattr("capas.data.images.MAX_BYTES", 2**20)
    with pytest.raises(CapasError, match="/dev/zero: more than 1 MiB, larger than any image"):
        read_image(Path("/dev/zero"))


@pytest.mark.parametrize("name", sorted(hostile.REFUSED))
def test_bad_files_are_refused_with_their_name_and_what_is_wrong(name):
    data = hostile.images()[name]
    with pytest.raises(CapasError, match=f"{name}: .*{hostile.REFUSED[name]}") as refused:
        read_image(data, name=name)
    assert "object at 0x" not in str(refused.value)  # no Python object in the message
    if "format" in hostile.REFUSED[name]:
        assert "PNG, JPEG" in str(refused.value)  # says what it reads
        with pytest.raises(CapasError, match=name):
            image_size(data, name=name)
