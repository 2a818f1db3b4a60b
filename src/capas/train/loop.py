"""The training loop: one readable `fit`, typed hooks, epoch checkpoints that resume."""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from capas.cpu import kept_heap
from capas.data import ArrayDataset, Preprocess, iterate_batches
from capas.errors import CapasError
from capas.inference import autocast, choose_precision, evaluate, resolve_device, synchronize
from capas.spec.io import revalidated
from capas.spec.train import EarlyStopping, OptimizerConfig, TrainConfig
from capas.train import batchnorm, depthwise, frozen_cache, resizing, winograd
from capas.train.checkpoint import checkpoint_epoch, load_checkpoint, save_checkpoint
from capas.train.ema import WeightAverage
from capas.train.optim import Plateau, lr_factor, make_optimizer, set_lr
from capas.train.reproducible import reproducible

if TYPE_CHECKING:
    from capas.train.distributed import Distributed


class Callback:
    """Typed hooks called by `fit`; they observe and never change the training state."""

    def on_fit_start(self, epochs: int, steps_per_epoch: int, start_epoch: int) -> None: ...

    def on_batch_end(self, images: int, loss: torch.Tensor, correct: torch.Tensor) -> None:
        """After each step: the epoch's running sums of loss and correct predictions so far, 0-dim
        tensors on the device (reading them with .item() waits for the device: do it sparingly), and
        `images`, this process' images of the step. With several processes the sums are this
        process' times their number: an estimate of the whole batches'."""

    def on_epoch_end(self, metrics: dict) -> None: ...

    def on_fit_end(self, result: FitResult) -> None: ...


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0  # 1-based epoch whose weights the model holds at the end
    stopped: str = "max epochs"  # or "early stopping", "time budget", "sample budget"
    train_seconds: float = 0.0  # time in training steps only, without evaluation
    # wall time the processes that trained the epochs of the checkpoint it resumed from spent in `fit`
    # up to that checkpoint (0: not resumed); train_seconds counts their steps too
    earlier_seconds: float = 0.0
    images: int = 0
    bn_gap: dict | None = None  # batchnorm.mode_gap of the final weights (None: no BatchNorm trains)
    # train.cache_frozen: FrozenViews.record() (its seconds are in train_seconds)
    frozen_cache: dict | None = None
    # train.winograd: the convolutions it computed (eligible ones of a float32 training on a CPU)
    winograd: list[str] | None = None


class _Monitor:
    """Early stopping's bookkeeping: the best value, its epoch, epochs since."""

    def __init__(self, cfg: EarlyStopping | None):
        self.cfg = cfg
        self.best: float | None = None
        self.best_epoch = 0
        self.wait = 0

    def improved(self, metrics: dict) -> bool:
        if self.cfg is None:
            self.best_epoch = metrics["epoch"]
            return True
        value = metrics[self.cfg.monitor]
        sign = 1.0 if self.cfg.monitor == "val_loss" else -1.0  # lower loss, higher accuracy
        if self.best is None or sign * (self.best - value) > self.cfg.min_delta:
            self.best, self.best_epoch, self.wait = value, metrics["epoch"], 0
            return True
        self.wait += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.cfg is not None and self.wait >= self.cfg.patience

    def state(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load(self, state: dict) -> None:
        self.best, self.best_epoch, self.wait = state["best"], state["best_epoch"], state["wait"]


def resolved(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its `auto` settings replaced by what they mean on `cfg.device` here: `precision`
    (capas.inference.choose_precision), then `winograd` (capas.train.winograd.auto)."""
    if cfg.precision != "auto" and cfg.winograd != "auto":
        return cfg
    device = resolve_device(cfg.device)
    precision = cfg.precision if cfg.precision != "auto" else choose_precision("auto", device)[0]
    use = cfg.winograd if cfg.winograd != "auto" else winograd.auto(device, precision, cfg.compile)
    return cfg.model_copy(update={"precision": precision, "winograd": use})


def fit(
    model: nn.Module,
    train: ArrayDataset,
    val: ArrayDataset,
    preprocess: Preprocess,
    cfg: TrainConfig,
    *,
    callbacks: Sequence[Callback] = (),
    checkpoint: Path | None = None,
    dist: Distributed | None = None,
    identity: dict | None = None,
) -> FitResult:
    """Train `model` in place; with `checkpoint`, state is saved each epoch and a rerun resumes from it.

    With `dist` (capas.train.distributed), this process trains on its slice of every global batch
    through DDP; metrics are reduced over the processes and only rank 0 saves checkpoints.

    With early stopping, the model ends with its best epoch's weights (also when the epochs run out
    before patience does); without it, with the last epoch's, as Keras does.

    While it trains, a ReLU that feeds max pooling runs after the pooling (CapasNet.relu_after_pooling:
    exact, and faster), and `cfg.threads` and `cfg.deterministic` apply (capas.train.reproducible).
    `identity` (the run's spec, data and training configs) is saved in each checkpoint, so that
    `train` can refuse to resume it under other settings. `precision: auto` and `winograd: auto` train
    as they resolve here (`resolved`).
    """
    cfg = resolved(revalidated(cfg, "fit(): cfg"))
    on_cpu = resolve_device(cfg.device).type == "cpu"
    relu_after_pooling = getattr(model, "relu_after_pooling", contextlib.nullcontext)
    with reproducible(cfg), kept_heap() if on_cpu else contextlib.nullcontext(), relu_after_pooling():
        try:
            return _fit(model, train, val, preprocess, cfg, callbacks, checkpoint, dist, identity)
        finally:
            if hasattr(model, "compile_frozen"):
                model.compile_frozen(False)  # its constants are this training's weights
            if cfg.compile:
                # The graphs die with the training that compiled them: frozen rows' graphs hold their
                # weights, and Dynamo compiles a code object for at most 8 models per process before
                # running the next ones eagerly (a study worker trains many). Other compiled code in
                # the process recompiles on its next call.
                torch.compiler.reset()


def _fit(
    model: nn.Module,
    train: ArrayDataset,
    val: ArrayDataset,
    preprocess: Preprocess,
    cfg: TrainConfig,
    callbacks: Sequence[Callback],
    checkpoint: Path | None,
    dist: Distributed | None,
    identity: dict | None,
) -> FitResult:
    fit_started = time.perf_counter()
    device = resolve_device(cfg.device)
    if cfg.compile and device.type == "cpu":
        _check_cpp_compiler()
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    train, val = _resident(train, device), _resident(val, device)
    cached_rows = None
    if cfg.cache_frozen:  # one process only (capas.train.distributed.check)
        cached_rows = frozen_cache.frozen_rows(model, cfg)  # before a resumed fine-tuning unfreezes rows
    tuning = (
        cfg.finetune is not None
        and checkpoint is not None
        and checkpoint_epoch(checkpoint) > cfg.finetune.after_epochs
    )
    if tuning:
        _unfreeze(model, cfg)  # resuming after the switch: the saved optimizer holds the unfrozen layers
    optimizer = make_optimizer(model, _optimizer_config(cfg, tuning))
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    if cfg.drop_last and len(train) < cfg.batch_size:
        raise CapasError(
            f"train.drop_last leaves out each epoch's short last batch, and the training split holds "
            f"{len(train)} images, less than one batch of {cfg.batch_size}: no step would run; lower "
            "batch_size or turn drop_last off"
        )
    steps_per_epoch = len(train) // cfg.batch_size if cfg.drop_last else -(-len(train) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    batchnorm.warn_short_last_batch(model, len(train), cfg)
    if cfg.ema is not None and cfg.ema.every > total_steps:
        raise CapasError(
            f"ema.every is {cfg.ema.every} optimizer steps, and this training takes {total_steps} "
            f"({cfg.epochs} epochs of {steps_per_epoch}): the average would never be taken, and the run "
            "would validate, test and save its starting weights; lower ema.every or train longer"
        )
    monitor = _Monitor(cfg.early_stopping)
    plateau = Plateau(cfg.schedule, cfg.optimizer.learning_rate)
    result, best_state, start_epoch, end_epoch = FitResult(), None, 0, cfg.epochs
    computed = []  # the convolutions train.winograd computed in the epochs of the checkpoint

    ema = WeightAverage(model, cfg.ema) if cfg.ema is not None else None
    if checkpoint is not None and (state := load_checkpoint(checkpoint, model, optimizer)) is not None:
        start_epoch, best_state = state.epoch, state.best_weights
        result.history, result.train_seconds, result.images = state.history, state.train_seconds, state.images
        result.earlier_seconds = state.wall_seconds
        monitor.load(state.monitor["early_stopping"])
        plateau.load(state.monitor["plateau"])
        if ema is not None:
            ema.load(state.ema)
        computed = state.winograd
        result.frozen_cache = state.frozen_cache
        # a run killed after the checkpoint of the epoch that stopped it (while testing or writing the
        # run directory) stays stopped: it trains no epoch that the uninterrupted run did not
        if (stop := _stop_reason(cfg, result, monitor)) is not None:
            result.stopped, end_epoch = stop, start_epoch
    if cfg.progressive_resizing is not None:
        resizing.check_model(model, cfg.progressive_resizing, preprocess.size, preprocess.channels)
    net = _training_net(model, dist, cfg)
    views = val_views = None
    # computed again on resuming (the same values), unless no epoch is left to train on them (the
    # checkpoint's record of them stands; an older capas' checkpoint has none)
    if cached_rows is not None and (start_epoch < end_epoch or result.frozen_cache is None):
        views = frozen_cache.compute(
            model,
            cached_rows,
            train,
            preprocess,
            cfg,
            device,
            mirrored=bool(cfg.augment.hflip),
            compiled=True,
        )
        val_views = frozen_cache.compute(
            model, cached_rows, val, preprocess, cfg, device, mirrored=False, compiled=False
        )
        result.train_seconds += views.seconds
        result.frozen_cache = views.record()
    # depthwise convolutions' CPU backward (capas.train.depthwise: float32 gradients for bfloat16,
    # weight gradients on maps grown to the kernel's size, or with `compile: frozen` by an Inductor
    # kernel where that pays); not inside a compiled step: Dynamo compiles the mode's frames one by one
    # (a recompile per call signature up to its limit) where the step breaks its graph for the frozen rows
    cpu_depthwise = device.type == "cpu" and cfg.compile is not True and depthwise.has_depthwise(model)
    weight_grads = depthwise.WeightGradKernel() if cpu_depthwise and cfg.compile == "frozen" else None
    # train.winograd computes float32 training on a CPU only; asked for elsewhere, it records that it
    # computed nothing
    wino = (
        winograd.Convolutions(model, computed)
        if cfg.winograd and device.type == "cpu" and cfg.precision == "float32"
        else None
    )
    world = 1 if dist is None else dist.world
    evaluate_all = evaluate if dist is None else dist.evaluate

    for cb in callbacks:
        cb.on_fit_start(cfg.epochs, steps_per_epoch, start_epoch)
    for epoch in range(start_epoch, end_epoch):
        if cfg.finetune is not None and epoch == cfg.finetune.after_epochs:
            # fine-tuning starts: a new optimizer over the now-trainable parameters, backbone at a smaller rate
            _unfreeze(model, cfg)
            optimizer = make_optimizer(model, _optimizer_config(cfg, tuning=True))
            base_lrs = [group["lr"] for group in optimizer.param_groups]
            net = _training_net(model, dist, cfg)  # DDP learns the new trainable set
        # Seeding per epoch makes a resumed run draw the same batches, crops and dropout masks. Every
        # process draws the batches and crops alike (each keeps its share of them); the layers' own
        # draws (Dropout masks) are per process, or the k-th image of each share would get the same
        # mask. The CPU generator keeps a seed's low 32 bits: the processes' seeds are 2**20 apart,
        # more epochs than a run trains.
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        torch.manual_seed(cfg.seed * 100_003 + epoch + (0 if dist is None else dist.rank) * 2**20)
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen, step, started = 0, epoch * steps_per_epoch, time.perf_counter()
        if views is not None:
            batches = views.batches(
                cfg.batch_size,
                cfg.augment,
                generator,
                device,
                cfg.channels_last,
                epoch,
                cfg.seed,
                drop_last=cfg.drop_last,
            )
        else:
            batches = iterate_batches(
                train,
                cfg.batch_size,
                preprocess=preprocess,
                augment=cfg.augment,
                shuffle=True,
                generator=generator,
                drop_last=cfg.drop_last,
                device=device,
                channels_last=cfg.channels_last,
                epoch=epoch,
                seed=cfg.seed,
            )
        for x, y in batches:
            n = len(y)  # the global batch: counts, budgets and callbacks see whole batches
            if dist is not None:
                x, y = dist.shard(x), dist.shard(y)
            if cfg.progressive_resizing is not None:
                x = resizing.resize(
                    x, resizing.size(cfg.progressive_resizing, step, total_steps, preprocess.size)
                )
            factor = lr_factor(cfg.schedule, step, steps_per_epoch, total_steps) * plateau.scale
            set_lr(optimizer, base_lrs, factor)
            with (
                autocast(device, cfg.precision),
                depthwise.backward(cpu_depthwise, weight_grads),
                wino.active() if wino is not None else contextlib.nullcontext(),
            ):
                logits = net(x) if views is None else net(x, start_row=views.rows)
                loss = nn.functional.cross_entropy(
                    logits, y, label_smoothing=cfg.label_smoothing, reduction="sum"
                )
            optimizer.zero_grad(set_to_none=True)
            # the mean over the global batch; DDP divides the summed gradients by `world`, hence the factor
            (loss * world / n).backward()
            optimizer.step()
            if ema is not None:
                ema.update(model, step + 1, total_steps)
            # Running sums stay on the device: no host sync per step (a .item() here stalls a GPU).
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            seen, step = seen + n, step + 1
            for cb in callbacks:  # with several processes, this one's slices stand for the whole batch
                cb.on_batch_end(n, loss_sum * world, correct * world)
            if _over_budget(cfg, result, seen, started):
                break
        synchronize(device)  # the steps still queued on a GPU belong to the training time
        train_time = time.perf_counter() - started  # the steps alone: validation comes below
        result.train_seconds += train_time
        result.images += seen
        if dist is not None:
            dist.sum(loss_sum, correct)  # this process' slices -> the whole epoch's
        # with an EMA, the averaged weights are the model: recalibrated, validated, kept as the best, saved
        with ema.applied(model) if ema is not None else contextlib.nullcontext():
            if cfg.bn_recalibration:
                # every rank recomputes the same statistics (same batches): no reduction needed
                batchnorm.recalibrate(model, train, preprocess, cfg)
            if val_views is not None:
                val_eval = val_views.evaluate(model, device, cfg.precision)
            else:
                val_eval = evaluate_all(model, val, preprocess, device, cfg.channels_last, cfg.precision)
            improved = monitor.improved(
                {"epoch": epoch + 1, "val_loss": val_eval.loss, "val_accuracy": val_eval.accuracy}
            )
            if improved and cfg.early_stopping is not None:
                best_state = copy.deepcopy(model.state_dict())
        metrics = {
            "epoch": epoch + 1,
            "loss": loss_sum.item() / seen,
            "accuracy": correct.item() / seen,
            "val_loss": val_eval.loss,
            "val_accuracy": val_eval.accuracy,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - started,  # the whole epoch, its validation included
            "images_per_s": seen / train_time,  # training throughput, as test.json's
        }
        result.history.append(metrics)
        plateau.update(val_eval.loss)
        for cb in callbacks:
            cb.on_epoch_end(metrics)
        stop = _stop_reason(cfg, result, monitor)
        if checkpoint is not None and (dist is None or dist.is_main):
            save_checkpoint(
                checkpoint,
                model,
                optimizer,
                epoch + 1,
                result,
                {"early_stopping": monitor.state(), "plateau": plateau.state()},
                best_state,
                identity,
                ema=None if ema is None else ema.tensors(),
                winograd=None if wino is None else wino.used(),
                wall_seconds=result.earlier_seconds + time.perf_counter() - fit_started,
            )
        if stop:
            result.stopped = stop
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    elif ema is not None:
        if not ema.taken:  # a budget stopped it within the first `every` steps
            warnings.warn(
                f"training stopped ({result.stopped}) before the weight average's first update (ema.every "
                f"{cfg.ema.every} optimizer steps): the run keeps its own trained weights, not an average",
                stacklevel=2,
            )
        ema.copy_to(model)
        if cfg.bn_recalibration:  # the statistics the last validation used, not the average's own
            batchnorm.recalibrate(model, train, preprocess, cfg)
    result.best_epoch = monitor.best_epoch
    result.bn_gap = batchnorm.mode_gap(model, train, preprocess, cfg)
    if cfg.winograd:
        result.winograd = [] if wino is None else wino.used()
    for cb in callbacks:
        cb.on_fit_end(result)
    return result


def _training_net(model: nn.Module, dist: Distributed | None, cfg: TrainConfig) -> nn.Module:
    """What the training steps call: the model, in DDP with several processes (it averages the
    gradients), compiled with `cfg.compile`. Only the training forward and backward go through it:
    evaluation, BatchNorm recalibration, checkpoints and the saved weights use `model` itself.
    Compiling (`true` or `'frozen'`) also compiles a frozen backbone's rows for inference
    (CapasNet.compile_frozen)."""
    if hasattr(model, "compile_frozen"):
        model.compile_frozen(bool(cfg.compile))
    net = model if dist is None else dist.wrap(model)
    # one batch shape per run (plus the last, shorter batch): two static graphs beat a dynamic one
    return torch.compile(net, dynamic=False) if cfg.compile is True else net


def _resident(data: ArrayDataset, device: torch.device) -> ArrayDataset:
    """The dataset on a CUDA device when its uint8 images take at most a quarter of the free memory
    (else it stays on the host): each step then gathers its batch on the GPU, with no host copy
    and no transfer to wait for. The batches are the same either way (the order and augmentation
    draws come from the CPU generator)."""
    if device.type != "cuda" or not isinstance(data, ArrayDataset) or data.images.device == device:
        return data  # a transfer run's cached features (train.features.Features) stay where they are
    free, _ = torch.cuda.mem_get_info(device)
    size = data.images.numel() * data.images.element_size() + data.labels.numel() * 8
    return data.to(device) if size <= free // 4 else data


def _check_cpp_compiler() -> None:
    """train.compile on a CPU: Inductor compiles C++, so say before training starts when it finds no
    compiler (its own error comes from deep inside the first step)."""
    from torch._inductor import config
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as error:  # Inductor's InvalidCxxCompiler, or whatever its search raises
        tried = ", ".join(str(c) for c in config.cpp.cxx if c is not None)
        raise CapasError(
            f"train.compile needs a C++ compiler on a CPU and none was found (tried {tried}; set CXX "
            "to name another): install one (e.g. apt-get install g++) or set "
            "compile: false"
        ) from error


def _unfreeze(model: nn.Module, cfg: TrainConfig) -> None:
    """Fine-tuning's switch: the last `unfreeze` frozen backbone layers (or all) start training."""
    if cfg.finetune is None or getattr(model, "backbone", None) is None:
        raise CapasError("train.finetune needs a model with a backbone (add backbone: to the spec)")
    unfreeze = cfg.finetune.unfreeze
    model.set_frozen(0 if unfreeze == "all" else max(0, model.frozen - unfreeze))


def _optimizer_config(cfg: TrainConfig, tuning: bool) -> OptimizerConfig:
    """The optimizer settings; once fine-tuning has unfrozen backbone layers (`tuning`), the backbone
    at its rate (before, the layers the spec leaves trainable train at the optimizer's)."""
    if not tuning:
        return cfg.optimizer
    return cfg.optimizer.model_copy(update={"backbone_lr_scale": cfg.finetune.backbone_lr_scale})


def _over_budget(cfg: TrainConfig, result: FitResult, seen: int, started: float) -> bool:
    if cfg.max_samples is not None and result.images + seen >= cfg.max_samples:
        return True
    return (
        cfg.max_seconds is not None
        and result.train_seconds + time.perf_counter() - started >= cfg.max_seconds
    )


def _stop_reason(cfg: TrainConfig, result: FitResult, monitor: _Monitor) -> str | None:
    if monitor.exhausted:
        return "early stopping"
    if cfg.max_samples is not None and result.images >= cfg.max_samples:
        return "sample budget"
    if cfg.max_seconds is not None and result.train_seconds >= cfg.max_seconds:
        return "time budget"
    return None
