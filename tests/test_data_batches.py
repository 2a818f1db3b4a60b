"""Preprocessing, augmentation and batching as whole-tensor operations."""

import pydantic
import pytest
import torch

from capas.data import ArrayDataset, Preprocess, augment_batch, default_preprocess, iterate_batches
from capas.errors import CapasError
from capas.spec import Augment


def gray_constant(n=2, value=77, size=28) -> torch.Tensor:
    return torch.full((n, 1, size, size), value, dtype=torch.uint8)


def test_gray_28_to_rgb_48_keeps_a_constant_image_constant():
    out = Preprocess(size=(48, 48), channels=3)(gray_constant())
    assert out.shape == (2, 3, 48, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full_like(out, 77 / 255))


def test_same_size_is_only_scaled():
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(Preprocess(size=(8, 8), channels=3)(images), images.float() / 255)


def test_downsizing_antialiases():
    stripes = torch.zeros(1, 1, 4, 16, dtype=torch.uint8)
    stripes[..., ::4] = 255  # one bright column in four: plain bilinear sampling at 1/4 misses them all
    out = Preprocess(size=(4, 4), channels=1)(stripes)
    torch.testing.assert_close(out[..., 1:3], torch.full_like(out[..., 1:3], 0.25))  # away from the edges


def test_rgb_to_gray_uses_bt601_luma():
    images = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    for c in range(3):
        images[c, c] = 255  # pure red, green, blue
    out = Preprocess(size=(4, 4), channels=1)(images)
    assert out.shape == (3, 1, 4, 4)
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([0.299, 0.587, 0.114]))


def test_normalization():
    p = Preprocess(size=(28, 28), channels=3, mean=(0.5, 0.2, 0.0), std=(0.5, 1.0, 2.0))
    out = p(gray_constant(value=255))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([1.0, 0.8, 0.5]))


def test_preprocess_config_is_validated_and_round_trips_through_json():
    p = Preprocess(size=(32, 32), channels=3, mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0))
    assert Preprocess.model_validate_json(p.model_dump_json()) == p
    with pytest.raises(pydantic.ValidationError, match="both mean and std"):
        Preprocess(size=(32, 32), channels=3, mean=(0.1, 0.2, 0.3))
    with pytest.raises(pydantic.ValidationError, match="3 values each"):
        Preprocess(size=(32, 32), channels=3, mean=(0.1,), std=(1.0,))
    with pytest.raises(pydantic.ValidationError):
        Preprocess(size=(32, 32), channels=2)
    with pytest.raises(CapasError, match="uint8"):
        Preprocess(size=(32, 32), channels=3)(torch.zeros(1, 3, 32, 32))
    assert default_preprocess((28, 28, 1)) == Preprocess(size=(28, 28), channels=1)


def test_augment_is_deterministic_for_a_seed():
    x = torch.rand(64, 3, 8, 8)
    augment = Augment(crop_padding=2, hflip=True)
    a, b = (augment_batch(x, augment, torch.Generator().manual_seed(7)) for _ in range(2))
    c = augment_batch(x, augment, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(augment_batch(x, Augment(), torch.Generator()), x)


def test_random_crop_shifts_each_image_within_the_padding():
    n, c, h, w, p = 200, 2, 6, 5, 2
    x = torch.rand(n, c, h, w) + 1  # no zeros in the image: zeros come from the padding only
    out = augment_batch(x, Augment(crop_padding=p), torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    offsets = set()
    for i in range(n):
        matches = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + h, dx : dx + w])
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) == (2 * p + 1) ** 2  # 200 draws cover all 25 offsets


def test_hflip_mirrors_about_half_of_the_images():
    x = torch.rand(400, 1, 3, 4)
    out = augment_batch(x, Augment(hflip=True), torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x, strict=True)])
    same = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x, strict=True)])
    assert (flipped ^ same).all()
    assert 150 < int(flipped.sum()) < 250


def labelled(n=10) -> ArrayDataset:
    """Image i is the constant i; its label is i % 3."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return ArrayDataset(images, torch.arange(n) % 3, ("a", "b", "c"))


def test_iterate_batches_in_order():
    batches = list(iterate_batches(labelled(), 4, preprocess=Preprocess(size=(4, 4), channels=3)))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    x, y = batches[0]
    assert x.shape == (4, 3, 4, 4) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0, 0, 0] * 255, torch.arange(4.0))


def test_iterate_batches_shuffled_is_a_deterministic_permutation():
    preprocess = Preprocess(size=(4, 4), channels=1)

    def seen(seed: int, **kwargs) -> list[tuple[int, int]]:
        batches = iterate_batches(
            labelled(),
            3,
            preprocess=preprocess,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            **kwargs,
        )
        return [
            (round(float(v) * 255), int(label))
            for x, y in batches
            for v, label in zip(x[:, 0, 0, 0], y, strict=True)
        ]

    first = seen(0)
    assert sorted(first) == [(i, i % 3) for i in range(10)]  # every image once, with its own label
    assert first == seen(0) and first != seen(1)
    assert len(seen(0, drop_last=True)) == 9


def test_channels_last_and_augment():
    batches = iterate_batches(
        labelled(),
        5,
        preprocess=Preprocess(size=(8, 8), channels=3),
        augment=Augment(crop_padding=1, hflip=True),
        generator=torch.Generator().manual_seed(0),
        channels_last=True,
    )
    x, _ = next(batches)
    assert x.shape == (5, 3, 8, 8) and x.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(CapasError, match="batch_size"):
        next(iterate_batches(labelled(), 0, preprocess=Preprocess(size=(4, 4), channels=1)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_with_a_cpu_generator():
    data = labelled(64)
    for source in (data, data.to("cuda")):
        batches = iterate_batches(
            source,
            16,
            preprocess=Preprocess(size=(8, 8), channels=3, mean=(0.5,) * 3, std=(0.25,) * 3),
            augment=Augment(crop_padding=2, hflip=True),
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
            device="cuda",
        )
        for x, y in batches:
            assert x.device.type == "cuda" and y.device.type == "cuda" and x.shape == (16, 3, 8, 8)
