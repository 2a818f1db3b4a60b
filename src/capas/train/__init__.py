"""Training: `train` makes a run directory from a spec and configs; `fit` is its loop."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from capas.data import splits_for
from capas.errors import CapasError, first_of
from capas.inference import evaluate, resolve_device
from capas.lock import exclusive
from capas.models import build_model, preprocess_for
from capas.models.build import passes_through
from capas.models.init import WHITENING_IMAGES, fit_whitening, whitening_layers
from capas.runs import (
    CHECKPOINT,
    check_not_cwd,
    check_not_in_images,
    not_the_runs,
    recover,
    staging,
    write_run,
)
from capas.spec import DataConfig, ModelSpec, TrainConfig
from capas.spec.backbone import RUN
from capas.spec.io import config_changes, revalidated, unrecorded
from capas.train import features, frozen_cache, resizing
from capas.train.checkpoint import checkpoint_identity
from capas.train.loop import Callback, FitResult, fit, resolved
from capas.train.progress import RichProgress
from capas.train.reproducible import reproducible

__all__ = [
    "Callback",
    "FitResult",
    "RichProgress",
    "check_settings",
    "fit",
    "train",
]

if TYPE_CHECKING:
    from capas.data.splits import Splits
    from capas.models import CapasNet
    from capas.train.distributed import Distributed


def train(
    spec: ModelSpec,
    data: DataConfig,
    cfg: TrainConfig,
    out: str | Path,
    *,
    callbacks: Sequence[Callback] = (),
    dist: Distributed | None = None,
    restart: bool = False,
) -> dict:
    """Train `spec` on `data` and write the run directory `out`; returns the test results.

    Rerunning with the same `out` after an interruption resumes from the last epoch checkpoint, if
    the spec, data and training configs are the ones it was made with (else a CapasError names the
    differences; `precision: auto` and `winograd: auto` count as what they resolve to on this
    machine, which the run records); `restart` discards the checkpoint and starts over. The
    directory is locked while this runs (capas.lock): a second process training into it is refused.
    The finished run replaces `out` whole, so an `out` folder that holds anything but a run (finished
    or not) is refused before training.
    With `dist`, this process is one rank of a data-parallel run (capas.train.distributed): every
    rank returns the test results, rank 0 alone writes (and locks) `out`.
    """
    for name, value, kind, made in (
        ("spec", spec, ModelSpec, "load_spec(path)"),
        ("data", data, DataConfig, "DataConfig(name=...)"),
        ("cfg", cfg, TrainConfig, "TrainConfig(epochs=...)"),
    ):
        if not isinstance(value, kind):  # a path, a dataset name or a dict fails deep inside otherwise
            raise CapasError(
                f"train(): {name}: expected a {kind.__name__} ({made}), got {type(value).__name__} {value!r}"
            )
    data, cfg = revalidated(data, "train(): data"), revalidated(cfg, "train(): cfg")
    out = Path(out)
    if dist is None or dist.is_main:
        check_out(out)
        recover(out)  # a killed run's checkpoint, if it was moved aside, resumes
    check_not_in_images(out, data.name)
    cfg = resolved(cfg)
    check_settings(spec, cfg)
    splits = splits_for(data)
    classes = splits.train.classes
    units = spec.output_shape
    if units != (len(classes),):
        raise CapasError(
            f"{spec.name}: the last layer outputs {units} but {data.name} has {len(classes)} classes; "
            f"end the model with Dense: {{units: {len(classes)}, activation: softmax}}"
        )
    main = dist is None or dist.is_main
    with exclusive(out, "run directory") if main else contextlib.nullcontext(), reproducible(cfg):
        return _train(spec, data, cfg, out, splits, callbacks, dist, restart)


def check_settings(spec: ModelSpec, cfg: TrainConfig) -> None:
    """What `train` refuses in a spec and its training config before it loads any data; a study checks
    every variant with it before it trains any."""
    if cfg.finetune is not None and spec.backbone is None:
        raise CapasError(f"{spec.name}: train.finetune needs a spec with a backbone")
    if cfg.finetune is not None and spec.backbone.frozen in ("none", 0):
        # the switch would unfreeze nothing: the run would only restart its optimizer at a new rate
        raise CapasError(
            f"{spec.name}: train.finetune unfreezes frozen backbone layers, and backbone.frozen is "
            f"{spec.backbone.frozen!r}: freeze some (backbone.frozen: all or a number) or leave finetune out"
        )
    if cfg.finetune is not None and isinstance(cfg.finetune.unfreeze, int):
        infos = spec.layer_infos()
        frozen = sum(info.frozen for info in infos[: len(infos) - len(spec.layers)])  # the backbone's rows
        if cfg.finetune.unfreeze > frozen:  # it unfroze those and said nothing of the rest
            raise CapasError(
                f"{spec.name}: train.finetune.unfreeze ({cfg.finetune.unfreeze}) is more than the "
                f"{frozen} backbone layers frozen (backbone.frozen: {spec.backbone.frozen!r}); at most "
                f"{frozen}, or unfreeze: all"
            )
    # the last layer that computes: Dropout (SpatialDropout2D too) and a linear Activation pass their
    # input through when predicting
    last = next((layer for layer in reversed(spec.layers) if not passes_through(layer)), spec.layers[-1])
    if getattr(last, "activation", None) in ("sigmoid", "hard_sigmoid"):
        # the loss takes the outputs as logits and predictions apply a softmax to them: sigmoid
        # outputs would train slowly and be reported squashed (at most e/(e + 9) = 0.23 with 10 classes)
        raise CapasError(
            f"{spec.name}: the last layer ({last.type_name()}) ends in a {last.activation}, the output of a "
            "binary or multi-label classifier; capas trains classifiers with a softmax over the classes: "
            "end with activation: softmax (or none, the logits)"
        )
    side = min(spec.input_shape[:2])
    if (size := cfg.augment.cutout) > side:  # beyond the side, every image would be left all blank
        raise CapasError(
            f"train.augment.cutout ({size}) is more than the images' side ({side} pixels, input_shape "
            f"{list(spec.input_shape)}); at most {side}"
        )
    if (shift := cfg.augment.crop_padding) >= side:
        # a shift of the whole side moves the whole image out (zeros: about 7% of the images all blank,
        # with their labels); reflect mirrors the border, which needs a shift below the side
        raise CapasError(
            f"train.augment.crop_padding ({shift}) is not below the images' side ({side} pixels, input_shape "
            f"{list(spec.input_shape)}): a shift that large moves the whole image out; at most {side - 1}"
        )
    if not any(info.trainable for info in spec.layer_infos() if not info.frozen):
        raise CapasError(
            f"{spec.name}: nothing to train: no layer has trainable weights (layers with trainable: false "
            "and the backbone's frozen layers keep theirs, also before train.finetune unfreezes any); "
            "make a layer trainable"
        )
    if cfg.cache_frozen or cfg.progressive_resizing is not None:  # what the network itself allows
        model = build_model(spec, seed=0, pretrained=False)
        if cfg.cache_frozen:
            frozen_cache.frozen_rows(model, cfg)
        if cfg.progressive_resizing is not None:
            h, w, channels = spec.input_shape
            resizing.check_model(model, cfg.progressive_resizing, (h, w), channels)


def check_out(out: Path) -> None:
    """Refuse an `out` folder that holds other things than a run: the finished run replaces the folder
    whole (capas.runs.staging), which would delete them. A run, an unfinished one (its checkpoint or
    lock) and an empty folder are taken, if they hold nothing else (`not_the_runs`: a user's notes, a
    run or a study inside); the current folder is not (its replacement would leave the shell in a
    deleted folder)."""
    check_not_cwd(out)
    if not out.is_dir() or not (names := not_the_runs(out)):
        return
    if any((out / name).exists() for name in ("model.json", CHECKPOINT)):
        raise CapasError(
            f"{out}: a run directory that also holds {first_of(names, 3)}, which are not part of a run; "
            "the new run replaces the folder whole and would delete them: move them out, or choose another "
            "--out"
        )
    raise CapasError(
        f"{out}: a folder that is not a run directory (it holds {first_of(names, 3)}); the finished run "
        "replaces the folder whole and would delete them: choose another --out, or empty the folder"
    )


def _train(
    spec: ModelSpec,
    data: DataConfig,
    cfg: TrainConfig,
    out: Path,
    splits: Splits,
    callbacks: Sequence[Callback],
    dist: Distributed | None,
    restart: bool,
) -> dict:
    classes = splits.train.classes
    # the processes that share every batch (--nproc, torchrun): the weights depend on them (on the CPU
    # each normalises BatchNorm over its own share; the gradients' sums round otherwise)
    processes = 1 if dist is None else dist.world
    identity = {
        "spec": spec.to_dict(),
        "data": data.model_dump(mode="json"),
        "train": cfg.model_dump(mode="json"),
        "splits": splits.info,  # what the data held: a folder that changed since would split otherwise
        "processes": processes,
    }
    if spec.backbone is not None:  # the spec names a weights file, whose contents may change
        identity["backbone_weights"] = features.weights_id(spec.backbone, cfg.seed)
    checkpoint = out / CHECKPOINT
    if restart and (dist is None or dist.is_main):
        checkpoint.unlink(missing_ok=True)
    if dist is not None:
        dist.barrier()  # no rank reads the checkpoint before rank 0 has deleted it
    saved = checkpoint_identity(checkpoint)
    if saved is None and checkpoint.exists():
        saved = {}  # an older capas' checkpoint, which recorded no settings
    if saved is not None:  # checkpoints from before `processes` was recorded: one process' runs
        saved.setdefault("processes", 1)
    if saved is not None and saved != identity:
        if missing := unrecorded(saved, identity):
            raise CapasError(
                f"{out} holds an unfinished run checkpointed by an older capas, which did not record {missing}: "
                "it cannot be checked against this run's settings; add --restart to start it over"
            )
        changes = config_changes(saved, identity)
        raise CapasError(
            f"{out} holds an unfinished run made with other settings ({'; '.join(changes)}): "
            "rerun with its settings to resume it, or add --restart to start it over"
        )
    preprocess = preprocess_for(spec)  # a backbone's own normalisation, saved with the run for serving
    model = build_model(spec, seed=cfg.seed)
    started = time.perf_counter()
    # A whitening first layer is computed from training images (a resumed run recomputes the same
    # kernels, then loads its checkpoint over them); the weights file then holds it for serving.
    whitening = None
    if whitening_layers(model):
        sample = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(cfg.seed))
        raw = splits.train.images[sample[:WHITENING_IMAGES]]
        whitening = fit_whitening(model, (preprocess(part) for part in raw.split(256)))
    device = resolve_device(cfg.device)
    feature_cache = None
    if dist is None and features.applies(model, cfg):  # only the top trains: run it on features computed once
        result, test, feature_cache = features.fit_top(
            model,
            splits,
            preprocess,
            data,
            cfg,
            device,
            callbacks=callbacks,
            checkpoint=checkpoint,
            identity=identity,
        )
    else:
        result = fit(
            model,
            splits.train,
            splits.val,
            preprocess,
            cfg,
            callbacks=callbacks,
            checkpoint=checkpoint,
            dist=dist,
            identity=identity,
        )
        test = (evaluate if dist is None else dist.evaluate)(
            model, splits.test, preprocess, device, cfg.channels_last, cfg.precision, cfg.tta
        )
    # Training cost includes everything the variant needs before it can train: with the feature
    # cache, computing the training and validation features (a cache hit reports what they cost).
    cache_seconds = feature_cache["compute_seconds"] if feature_cache is not None else 0.0
    train_seconds = result.train_seconds + cache_seconds
    test_results = {
        **test.test_results(classes),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped": result.stopped,
        "train_seconds": train_seconds,
        "images_per_s": result.images / train_seconds if train_seconds else 0.0,  # over the same seconds
        "precision": cfg.precision,  # the one trained and tested in (`auto` chooses per machine)
        "bn_recalibration": cfg.bn_recalibration,
        "bn_gap": result.bn_gap,
        # an interrupted run's earlier processes count too, up to the checkpoint this one resumed from
        "wall_seconds": time.perf_counter() - started + result.earlier_seconds,
        "val_loss": result.history[result.best_epoch - 1]["val_loss"] if result.best_epoch else None,
        "val_accuracy": result.history[result.best_epoch - 1]["val_accuracy"] if result.best_epoch else None,
    }
    if feature_cache is not None:
        test_results["feature_cache"] = feature_cache
    if result.frozen_cache is not None:
        test_results["frozen_cache"] = result.frozen_cache
    if result.winograd is not None:
        test_results["winograd"] = result.winograd  # the layers it computed: none in bfloat16 or on a GPU
    config = {
        "data": data.model_dump(mode="json"),
        "train": cfg.model_dump(mode="json"),
        "splits": splits.info,
        "device": str(device),
        "processes": processes,
    }
    if whitening is not None:
        config["whitening"] = whitening
    if spec.backbone is not None and spec.backbone.name == RUN:  # what load_run checks it against
        config["backbone_run"] = {"model_json_sha256": identity["backbone_weights"]["model_json_sha256"]}
    if dist is not None and not dist.is_main:
        return test_results
    # Written beside `out` and swapped in whole: retraining into a finished run's folder never
    # leaves the new model.json beside the old weights after a crash.
    with staging(out) as staged:
        write_run(
            staged,
            spec=spec,
            model=model.cpu(),
            preprocess=preprocess,
            classes=classes,
            config=config,
            history=result.history,
            test=test_results,
            reference=splits.val,
            precision=cfg.precision,
            summary_note=_finetune_note(spec, model, cfg, result.best_epoch),
        )
    checkpoint.unlink(missing_ok=True)  # the run is complete; its weights are in model.safetensors
    return test_results


def _finetune_note(spec: ModelSpec, model: CapasNet, cfg: TrainConfig, best_epoch: int) -> str:
    """What summary.txt says above its table when the saved weights are of an epoch after fine-tuning
    unfroze backbone layers: the table is the spec's, which shows them frozen, as they were when
    training started (early stopping may keep an epoch from before the switch: then it holds)."""
    if cfg.finetune is None or model.backbone is None or best_epoch <= cfg.finetune.after_epochs:
        return ""
    infos = spec.layer_infos()
    rows = [info for info in infos[model.frozen : len(model.backbone)] if info.frozen]
    if not rows:
        return ""
    return (
        f"Fine-tuned: after epoch {cfg.finetune.after_epochs}, backbone layers {rows[0].index}-{rows[-1].index} "
        f"({rows[0].name} to {rows[-1].name}) were unfrozen and trained too, at {cfg.finetune.backbone_lr_scale:g}× "
        f"the learning rate: {sum(r.trainable for r in rows):,} more trainable parameters than the table "
        "counts, which shows how training started.\n"
    )
