"""Initialisations computed from data: the patch-whitening first convolution (airbench's start).

The kernels of a Conv2D with `kernel_initializer: whitening` are the eigenvectors of the training
images' patch covariance, each scaled by 1/sqrt(eigenvalue + eps): the layer's outputs are the
patches' coordinates along their principal directions with unit variance. Filters beyond the
patch size (up to twice it) are the negatives of the leading directions, so that a following
ReLU/GELU keeps both signs. Computed once from the training split before training starts; the
result lives in the weights (model.safetensors), so evaluating or serving needs no data.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

WHITENING_IMAGES = 5000  # training images whose patches estimate the covariance (airbench: 5,000)
WHITENING_EPS = 5e-4
"""Added to every eigenvalue, relative to the mean eigenvalue (airbench's 5e-4 on images normalised
to unit variance per channel, where the mean eigenvalue is about 1): it bounds the gain of the
faintest directions, the noise of the covariance estimate."""


def whitening_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """(name, convolution) of the model's layers whose spec asks for `kernel_initializer: whitening`."""
    spec = getattr(model, "spec", None)
    if spec is None:
        return []
    out = []
    for info in spec.own_layer_infos():
        if getattr(info.layer, "kernel_initializer", None) == "whitening":
            out.append((info.name, model.layers[info.name].conv))
    return out


def patch_whitening(
    batches: Iterable[torch.Tensor], kernel: tuple[int, int], filters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, int]:
    """Whitening kernels from batches of preprocessed images (B, C, H, W) float: the (filters, C,
    kh, kw) weights, the biases that centre the outputs (filters,), the eigenvalues in decreasing
    order, the eps added to them (WHITENING_EPS × their mean), and the number of images seen.
    Batches keep the patches small (32×32×3 images with 2×2 kernels: 92 KB of float64 patches per
    image)."""
    kh, kw = kernel
    count, images, total, outer = 0, 0, 0.0, 0.0
    for part in batches:
        d = part.shape[1] * kh * kw
        # every kh×kw patch at stride 1, flattened in the kernel's (C, kh, kw) order: (patches, D)
        patches = nn.functional.unfold(part.double(), (kh, kw)).transpose(1, 2).reshape(-1, d)
        count, images = count + len(patches), images + len(part)
        total = total + patches.sum(0)
        outer = outer + patches.T @ patches
    if not count:
        raise ValueError("no images to compute the whitening from")
    c = len(total) // (kh * kw)
    mean = total / count
    covariance = outer / count - torch.outer(mean, mean)  # (D, D), in float64
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp(min=0), eigenvectors.flip(1)
    eps = WHITENING_EPS * eigenvalues.mean().clamp(min=1e-12)  # constant images have no variance
    directions = (eigenvectors / torch.sqrt(eigenvalues + eps)).T  # (D, D): row i is direction i, scaled
    kernels = torch.cat([directions, -directions])[:filters]  # (filters, D)
    bias = -(kernels @ mean)  # the mean patch maps to zero
    return kernels.reshape(filters, c, kh, kw).float(), bias.float(), eigenvalues.float(), float(eps), images


@torch.no_grad()
def fit_whitening(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict | None:
    """Set the whitening convolution of `model` (the first layer, if its spec asks for one) from
    batches of preprocessed training images (B, C, H, W); returns what to record in the run
    (layer, images used, the eps added to the eigenvalues, eigenvalues), or None when the model has
    no whitening layer."""
    for name, conv in whitening_layers(model):
        kernels, bias, eigenvalues, eps, images = patch_whitening(
            (b.float().cpu() for b in batches), conv.kernel_size, conv.out_channels
        )
        conv.weight.copy_(kernels.to(conv.weight.device))
        if conv.bias is not None:
            conv.bias.copy_(bias.to(conv.bias.device))
        return {
            "layer": name,
            "images": images,
            "eps": eps,  # the one added to the eigenvalues below
            "eigenvalues": [round(v, 8) for v in eigenvalues.tolist()],
        }
    return None
