"""Epoch checkpoints in one safetensors file: weights and optimizer tensors, everything else as JSON metadata.

One file written atomically means a crash leaves either the previous checkpoint or the new one,
never a mix; and no pickle is involved in saving or loading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from capas import atomic
from capas.errors import CapasError
from capas.models.weights import load_checked

if TYPE_CHECKING:
    from capas.train.loop import FitResult


def _tensors(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.detach().cpu().contiguous() for k, v in state.items()}


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        plain["state"][str(index)] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain["state"][str(index)][key] = value
    return tensors, plain


def _join_optimizer(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state = {int(i): dict(values) for i, values in plain["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    result: FitResult,
    monitor: dict,
    best_weights: dict[str, torch.Tensor] | None,
    identity: dict | None = None,
    ema: dict[str, torch.Tensor] | None = None,
    winograd: list[str] | None = None,
    wall_seconds: float = 0.0,
) -> None:
    """Everything a rerun needs to go on after `epoch` epochs; `ema` is the weight average, if any;
    `winograd`, the convolutions train.winograd computed so far; `wall_seconds`, the time spent in
    `fit` to get here (FitResult.earlier_seconds of the run that resumes from it)."""
    optim_tensors, optim_plain = _split_optimizer(optimizer.state_dict())
    tensors = {**_tensors("model.", model.state_dict()), **optim_tensors}
    if best_weights is not None:
        tensors.update(_tensors("best.", best_weights))
    if ema is not None:
        tensors.update(_tensors("ema.", ema))
    meta = {
        "epoch": epoch,
        "history": result.history,
        "train_seconds": result.train_seconds,
        "images": result.images,
        "monitor": monitor,
        "optimizer": optim_plain,
        "identity": identity,
        "winograd": winograd or [],
        "wall_seconds": wall_seconds,
        "frozen_cache": result.frozen_cache,
    }
    atomic.write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata={"capas": json.dumps(meta)}))


@dataclass
class Resumed:
    epoch: int
    history: list[dict]
    train_seconds: float
    images: int
    monitor: dict
    best_weights: dict[str, torch.Tensor] | None
    ema: dict[str, torch.Tensor]  # the weight average (empty without one)
    winograd: list[str]  # the convolutions train.winograd computed before the checkpoint
    wall_seconds: float  # the time spent in `fit` up to the checkpoint
    frozen_cache: dict | None  # train.cache_frozen's record (FrozenViews.record) of the epochs it holds


def checkpoint_epoch(path: Path) -> int:
    """The number of epochs a checkpoint holds (0 when there is none), read without loading its tensors."""
    if not path.exists():
        return 0
    try:
        with safe_open(str(path), framework="pt") as file:
            return int(json.loads(file.metadata()["capas"])["epoch"])
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise CapasError(f"{path}: damaged checkpoint ({error}); delete it to start this run over") from None


def checkpoint_identity(path: Path) -> dict | None:
    """The spec, data and training configs a checkpoint was made with (None: none, or not recorded)."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as file:
            return json.loads(file.metadata()["capas"]).get("identity")
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise CapasError(f"{path}: damaged checkpoint ({error}); delete it to start this run over") from None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> Resumed | None:
    """Restore model and optimizer from `path` if it exists; None when there is nothing to resume."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as file:
            meta = json.loads(file.metadata()["capas"])
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise CapasError(f"{path}: damaged checkpoint ({error}); delete it to start this run over") from None
    device = next(model.parameters()).device
    # a checkpoint without recorded settings (an older capas, `fit` called directly) may hold another model
    load_checked(
        model,
        {k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
        f"{path}: the checkpoint holds another model (delete it, or rerun with --restart, to start over)",
    )
    optimizer.load_state_dict(
        _join_optimizer(tensors, meta["optimizer"])
    )  # moves state to the params' device
    best = {k[5:]: v.to(device) for k, v in tensors.items() if k.startswith("best.")} or None
    ema = {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("ema.")}
    return Resumed(
        meta["epoch"],
        meta["history"],
        meta["train_seconds"],
        meta["images"],
        meta["monitor"],
        best,
        ema,
        meta.get("winograd", []),  # not recorded by an older capas
        meta.get("wall_seconds", meta["train_seconds"]),  # not recorded by an older capas: the steps' time
        meta.get("frozen_cache"),
    )
