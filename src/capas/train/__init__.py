"""Training: `train` makes a run directory from a spec and configs; `fit` is its loop."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from capas.data import splits_for
from capas.errors import CapasError
from capas.inference import evaluate, resolve_device
from capas.models import build_model, preprocess_for
from capas.runs import write_run
from capas.spec import DataConfig, ModelSpec, TrainConfig
from capas.train import features
from capas.train.loop import Callback, FitResult, fit
from capas.train.progress import RichProgress

__all__ = [
    "Callback",
    "FitResult",
    "RichProgress",
    "fit",
    "train",
]

if TYPE_CHECKING:
    from capas.train.distributed import Distributed

CHECKPOINT = "checkpoint.safetensors"


def train(
    spec: ModelSpec,
    data: DataConfig,
    cfg: TrainConfig,
    out: str | Path,
    *,
    callbacks: list[Callback] = (),
    dist: Distributed | None = None,
) -> dict:
    """Train `spec` on `data` and write the run directory `out`; returns the test results.

    Rerunning with the same `out` after an interruption resumes from the last epoch checkpoint.
    With `dist`, this process is one rank of a data-parallel run (capas.train.distributed): every
    rank returns the test results, rank 0 alone writes `out`.
    """
    out = Path(out)
    if cfg.finetune is not None and spec.backbone is None:
        raise CapasError(f"{spec.name}: train.finetune needs a spec with a backbone")
    splits = splits_for(data)
    classes = splits.train.classes
    units = spec.output_shape
    if units != (len(classes),):
        raise CapasError(
            f"{spec.name}: the last layer outputs {units} but {data.name} has {len(classes)} classes; "
            f"end the model with Dense: {{units: {len(classes)}, activation: softmax}}"
        )
    preprocess = preprocess_for(spec)  # a backbone's own normalisation, saved with the run for serving
    model = build_model(spec, seed=cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    feature_cache = None
    if dist is None and features.applies(model, cfg):  # only the top trains: run it on features computed once
        result, test, feature_cache = features.fit_top(
            model, splits, preprocess, data, cfg, device, callbacks=callbacks, checkpoint=out / CHECKPOINT
        )
    else:
        result = fit(
            model,
            splits.train,
            splits.val,
            preprocess,
            cfg,
            callbacks=callbacks,
            checkpoint=out / CHECKPOINT,
            dist=dist,
        )
        test = (evaluate if dist is None else dist.evaluate)(
            model, splits.test, preprocess, device, cfg.channels_last, cfg.precision
        )
    test_results = {
        **test.test_results(classes),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped": result.stopped,
        "train_seconds": result.train_seconds,
        "images_per_s": result.images_per_second,
        "wall_seconds": time.perf_counter() - started,
        "val_loss": result.history[result.best_epoch - 1]["val_loss"] if result.best_epoch else None,
        "val_accuracy": result.history[result.best_epoch - 1]["val_accuracy"] if result.best_epoch else None,
    }
    if feature_cache is not None:
        test_results["feature_cache"] = feature_cache
    config = {
        "data": data.model_dump(mode="json"),
        "train": cfg.model_dump(mode="json"),
        "splits": splits.info,
        "device": str(device),
    }
    if dist is not None and not dist.is_main:
        return test_results
    write_run(
        out,
        spec=spec,
        model=model.cpu(),
        preprocess=preprocess,
        classes=classes,
        config=config,
        history=result.history,
        test=test_results,
        reference=splits.val,
        precision=cfg.precision,
    )
    (out / CHECKPOINT).unlink(missing_ok=True)  # the run is complete; its weights are in model.safetensors
    return test_results
