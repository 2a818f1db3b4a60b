"""The drift reference of a run directory (reference.safetensors): penultimate features and input
statistics of validation images, which drift monitoring (capas.deploy.drift) compares live traffic to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from capas import atomic
from capas.data import ArrayDataset, Preprocess
from capas.errors import CapasError
from capas.inference import autocast, eval_batch_size, model_device

REFERENCE = "reference.safetensors"
REFERENCE_SIZE = 1000  # validation images kept as the drift reference
INPUT_STATS = ("pixel_mean", "pixel_std")  # the columns of input_stats (input_statistics below)


@dataclass(frozen=True)
class Reference:
    """Embeddings (N, F) and input statistics (N, 2) of reference images the model was validated on."""

    embeddings: torch.Tensor
    input_stats: torch.Tensor


def load_reference(path: str | Path) -> Reference:
    """Read `reference.safetensors`; a missing or damaged file is a CapasError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CapasError(f"{path}: no drift reference (train the run again with this capas to write one)")
    try:
        with safe_open(str(path), framework="pt") as file:
            embeddings, stats = file.get_tensor("embeddings"), file.get_tensor("input_stats")
    except (SafetensorError, OSError) as error:
        raise CapasError(f"{path}: unreadable drift reference ({error})") from None
    if embeddings.dim() != 2 or stats.shape != (len(embeddings), len(INPUT_STATS)) or len(embeddings) < 2:
        raise CapasError(
            f"{path}: drift reference has shapes {tuple(embeddings.shape)}, {tuple(stats.shape)}"
        )
    return Reference(embeddings.float(), stats.float())


def input_statistics(x: torch.Tensor) -> torch.Tensor:
    """Per-image statistics of preprocessed inputs (B, C, H, W) -> (B, 2): mean and standard deviation."""
    flat = x.flatten(1)
    return torch.stack([flat.mean(1), flat.std(1)], dim=1)


@torch.no_grad()
def save_reference(
    path: Path,
    model,
    data: ArrayDataset,
    preprocess: Preprocess,
    precision: str = "float32",
) -> None:
    """Keep what drift monitoring needs: features and input statistics of a stratified-enough sample,
    computed in batches and in the precision the server will run the model in. Fewer than two images
    make no reference (a drift test compares two samples): the run then serves with drift off."""
    if len(data) < 2:
        return
    model.eval()
    device = model_device(model)
    generator = torch.Generator().manual_seed(0)
    index = torch.randperm(len(data), generator=generator)[:REFERENCE_SIZE]
    embeddings, stats = [], []
    for part in index.split(eval_batch_size(preprocess, device)):
        x = preprocess(data.images[part]).to(device)
        with autocast(device, precision):
            embeddings.append(model.embed(x).float().cpu())  # (B, F)
        stats.append(input_statistics(x).cpu())  # (B, 2)
    tensors = {
        "embeddings": torch.cat(embeddings).contiguous(),
        "input_stats": torch.cat(stats).contiguous(),
        "labels": data.labels[index].contiguous(),
    }
    atomic.write_with(path, lambda tmp: save_file(tensors, str(tmp)))
