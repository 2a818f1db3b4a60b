"""Typed training and data configs: the single source of truth that every run directory records."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from capas.layers.base import Count, Real

MAX_SEED = 2**32 - 1  # the largest seed a run takes (numpy's and torch's seeds both hold it)
MAX_LR, MAX_FACTOR = 1e30, 1e3
"""Ceilings of learning rates (MAX_LR) and of what multiplies them (weight decay, batchnorm_lr_scale:
MAX_FACTOR): far above any that trains, low enough that every scalar an optimizer step forms
(Adam's lr·scale/(1−β₁ᵗ), lr·scale·weight decay) stays a float32 (`--lr 1e308` was PyTorch's
overflow traceback in the first step)."""


def _at_most_max_lr(value: float) -> float:
    if value > MAX_LR:  # pydantic's `le` would print the ceiling with all 31 digits
        raise ValueError(f"Input should be at most {MAX_LR:g}, where an optimizer step stays a float32")
    return value


Rate = Annotated[Real, AfterValidator(_at_most_max_lr)]


class _Config(BaseModel):
    # NaN or infinity in any float (`--lr inf`, YAML's `.nan`) trains to NaN weights
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


OPTIMIZER_DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3, "rmsprop": 1e-3, "adadelta": 1e-3}
"""Keras 3's default learning rates (Keras 2 trained the seed's MNIST model with Adadelta at 1.0)."""
OPTIMIZER_DEFAULT_WEIGHT_DECAY = {"sgd": 0.0, "adam": 0.0, "adamw": 0.004, "rmsprop": 0.0, "adadelta": 0.0}
"""Keras 3's default weight decay: 0.004 for AdamW, none for the others."""


class MuonConfig(_Config):
    """Muon (Keller Jordan, 2024; airbench94_muon) for the model's own Conv2D kernels: each step's
    Nesterov momentum of the gradient, flattened to (filters, inputs·kh·kw), is orthogonalized by a
    Newton–Schulz iteration (its singular values brought near 1) and the kernel moves by lr times
    that (times sqrt(filters / (inputs·kh·kw)) where there are more filters, as Keller Jordan's and
    PyTorch's Muon scale), after being rescaled to a norm of sqrt(filters) (`normalize`, airbench's,
    in place of weight decay). The other parameters (Dense, BatchNormalization, a backbone, depthwise kernels)
    train with the optimizer's own rule."""

    lr: Rate = Field(gt=0.0, description="the kernels' rate (the schedule scales it as it scales lr)")
    momentum: Real = Field(default=0.95, ge=0.0, lt=1.0)
    nesterov: bool = True
    ns_steps: Count = Field(default=5, ge=1, le=10, description="Newton–Schulz iterations (airbench: 3)")
    normalize: bool = Field(
        default=True, description="rescale each kernel to a norm of sqrt(filters) before its step"
    )


class OptimizerConfig(_Config):
    name: Literal["sgd", "adam", "adamw", "rmsprop", "adadelta"] = "adam"
    lr: Rate | None = Field(default=None, gt=0.0, description="None: Keras' default for the optimizer")
    momentum: Real = Field(default=0.0, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: Real | None = Field(
        default=None,
        ge=0.0,
        le=MAX_FACTOR,
        description="decoupled, as Keras 3 applies it in every optimizer: w -= lr·weight_decay·w before "
        "each step. None: Keras' default (0.004 for adamw, 0 for the others)",
    )
    rho: Real = Field(
        default=0.95, gt=0.0, lt=1.0, description="Adadelta's decay (RMSprop uses 0.9 as Keras)"
    )
    epsilon: Real = Field(default=1e-7, gt=0.0, description="Keras' default, not PyTorch's 1e-8")
    backbone_lr_scale: Real = Field(
        default=1.0, gt=0.0, le=1.0, description="learning rate of pretrained backbone layers relative to lr"
    )
    batchnorm_lr_scale: Real = Field(
        default=1.0,
        gt=0.0,
        le=MAX_FACTOR,
        description="learning rate of the model's own BatchNormalization parameters relative to lr; their "
        "weight decay per step stays lr·weight_decay (airbench's bias_scaler: 64)",
    )
    muon: MuonConfig | None = Field(
        default=None,
        description="train the model's own Conv2D kernels by Muon (orthogonalized momentum), the rest by "
        "sgd; no weight decay on those kernels",
    )

    @model_validator(mode="after")
    def _settings_where_they_apply(self) -> OptimizerConfig:
        # Keras' Adam, AdamW and Adadelta take no momentum; nesterov is SGD's look-ahead along it
        if self.momentum and self.name not in ("sgd", "rmsprop"):
            raise ValueError(
                f"momentum ({self.momentum}) is for sgd and rmsprop; {self.name} has no momentum setting"
            )
        if self.nesterov and not (self.name == "sgd" and self.momentum):
            raise ValueError(
                f"nesterov needs name: sgd and a momentum above 0 (got {self.name}, momentum {self.momentum})"
            )
        # a value another optimizer does not read would be recorded in config.json as if it had trained
        if self.rho != type(self).model_fields["rho"].default and self.name != "adadelta":
            kept = "keeps Keras' rho 0.9" if self.name == "rmsprop" else "does not take it"
            raise ValueError(f"rho ({self.rho}) is Adadelta's decay; {self.name} {kept}")
        if self.muon is not None and self.name != "sgd":
            raise ValueError(
                f"muon trains beside sgd, which takes the other parameters; got name: {self.name}"
            )
        if self.epsilon != type(self).model_fields["epsilon"].default and self.name == "sgd":
            raise ValueError(
                f"epsilon ({self.epsilon}) is for adam, adamw, rmsprop and adadelta; sgd has none"
            )
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else OPTIMIZER_DEFAULT_LR[self.name]

    @property
    def decay(self) -> float:
        """The weight decay in effect: the configured one, else Keras' default for the optimizer."""
        return (
            self.weight_decay if self.weight_decay is not None else OPTIMIZER_DEFAULT_WEIGHT_DECAY[self.name]
        )


SCHEDULE_READS = {  # each schedule setting: the schedules that read it
    "step_epochs": ("step",),
    "gamma": ("step",),
    "warmup_fraction": ("onecycle", "linear"),
    "initial_factor": ("linear",),
    "final_factor": ("linear",),
    "factor": ("plateau",),
    "patience": ("plateau",),
    "min_lr": ("plateau",),
    "min_delta": ("plateau",),
}


class ScheduleConfig(_Config):
    """The learning rate over training. 'plateau' is Keras' ReduceLROnPlateau on val_loss: after
    `patience` epochs without a val_loss below the best by more than `min_delta`, the rate is
    multiplied by `factor`, down to `min_lr`; it follows the run however long it lasts, so it
    suits early stopping (a cosine or one-cycle schedule ends at the `epochs` maximum instead)."""

    name: Literal["constant", "step", "cosine", "onecycle", "linear", "plateau"] = "constant"
    step_epochs: Count = Field(default=10, ge=1, description="'step': epochs between decays")
    gamma: Real = Field(default=0.1, gt=0.0, le=1.0, description="'step': factor per decay")
    warmup_fraction: Real = Field(
        default=0.25,
        ge=0.0,
        lt=1.0,
        description="'onecycle', 'linear': share of steps rising (at least one step: 0 is step 0 at the starting rate)",
    )
    initial_factor: Real = Field(
        default=0.04, ge=0.0, le=1.0, description="'linear': the rate at step 0, relative to lr"
    )
    final_factor: Real = Field(
        default=0.0, ge=0.0, le=1.0, description="'linear': the rate at the last step, relative to lr"
    )
    factor: Real = Field(default=0.1, gt=0.0, lt=1.0, description="'plateau': factor per reduction")
    patience: Count = Field(default=10, ge=1, description="'plateau': epochs without improvement")
    min_lr: Rate = Field(default=0.0, ge=0.0, description="'plateau': the lowest learning rate")
    min_delta: Real = Field(default=1e-4, ge=0.0, description="'plateau': the smallest improvement")

    @model_validator(mode="after")
    def _settings_of_the_schedule(self) -> ScheduleConfig:
        # a value the schedule does not read would be recorded in config.json as if it had trained
        # (`{name: cosine, warmup_fraction: 0.1}` ran without a warm-up)
        for key, field in type(self).model_fields.items():
            if key != "name" and getattr(self, key) != field.default and self.name not in SCHEDULE_READS[key]:
                users = " and ".join(SCHEDULE_READS[key])
                raise ValueError(
                    f"{key} ({getattr(self, key)}) is read by the {users} schedule; {self.name} does not take it"
                )
        return self


class EmaConfig(_Config):
    """An exponential moving average of the weights (Keras' optimizer `use_ema`): after every step
    ema = decay · ema + (1 − decay) · weights, over every float tensor of the model's state (the
    BatchNorm statistics included). The EMA is what validation, the test and the run's weights
    use. With `overwrite_every: k` the weights are replaced by the EMA every k steps (Keras'
    `ema_overwrite_frequency`; Lookahead-like). airbench's lookahead averages every 5 steps with a
    decay that grows as the cube of training's progress and puts the average back each time:
    `{decay: 0.7738, every: 5, overwrite_every: 5, ramp: 3}`."""

    decay: Real = Field(default=0.99, ge=0.0, lt=1.0, description="Keras' ema_momentum")
    overwrite_every: Count | None = Field(default=None, ge=1, description="Keras' ema_overwrite_frequency")
    every: Count = Field(default=1, ge=1, description="optimizer steps between updates of the average")
    ramp: Real = Field(
        default=0.0,
        ge=0.0,
        description="the decay at step t of T is decay·(t/T)^ramp: the average follows the weights "
        "closely early on and smooths more as training ends (airbench: 3); 0: constant",
    )

    @model_validator(mode="after")
    def _overwrite_on_updates(self) -> EmaConfig:
        if self.overwrite_every is not None and self.overwrite_every % self.every:
            raise ValueError(
                f"ema.overwrite_every ({self.overwrite_every}) must be a multiple of ema.every ({self.every}): "
                "the weights are replaced by the average on steps where it was just updated"
            )
        return self


class EarlyStopping(_Config):
    monitor: Literal["val_loss", "val_accuracy"] = "val_loss"
    patience: Count = Field(default=3, ge=1)
    min_delta: Real = Field(default=0.0, ge=0.0)


def best_epoch(history: list[dict], monitor: str) -> int:
    """1-based epoch of a run's history (metrics.jsonl) with the best finite value of `monitor` (lower
    loss, higher accuracy); 0 if none."""
    sign = 1.0 if monitor.endswith("loss") else -1.0
    scored = [
        (sign * m[monitor], i + 1) for i, m in enumerate(history) if math.isfinite(m.get(monitor, math.nan))
    ]
    return min(scored)[1] if scored else 0


class FinetuneConfig(_Config):
    """Train the top with the backbone as frozen as the spec says for `after_epochs` epochs, then
    unfreeze the last `unfreeze` frozen backbone layers (or all) and go on at a smaller backbone rate.
    The optimizer is rebuilt at the switch, so frozen parameters never hold optimizer state."""

    after_epochs: Count = Field(ge=1)
    unfreeze: Literal["all"] | Annotated[Count, Field(ge=1)] = "all"
    backbone_lr_scale: Real = Field(default=0.1, gt=0.0, le=1.0, description="backbone rate relative to lr")


class Augment(_Config):
    """Random training-time changes on whole batches, drawn per image (applied by
    capas.data.augment_batch).

    `hflip: true` mirrors a random half of the images left-right at every epoch; `hflip:
    alternate` is airbench's scheme: each image gets a random first choice, then is mirrored on
    every other epoch, so that over two epochs the network sees every image both ways.
    `crop_padding: p` translates by up to p pixels: a random crop of the image padded by p pixels,
    with zeros (`crop_fill: zeros`) or with the mirrored border (`reflect`, airbench's).
    `cutout: s` blanks an s × s square of each image to zero, centred anywhere in it and clipped at
    its borders (DeVries & Taylor, 2017), after the translation and flips.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # random crop of the image padded by this many pixels; 0 = off
    crop_padding: Count = Field(default=0, ge=0)
    crop_fill: Literal["zeros", "reflect"] = "zeros"
    hflip: bool | Literal["alternate"] = False
    cutout: Count = Field(default=0, ge=0)  # side of the blanked square in pixels; 0 = off

    @property
    def off(self) -> bool:
        """No augmentation at all: every epoch sees the same images."""
        return not (self.crop_padding or self.hflip or self.cutout)


class ProgressiveResizing(_Config):
    """Train on smaller images first (fast.ai's progressive resizing, in MosaicML Composer's schedule):
    the training batches are resized to `initial_scale` of the input for the first `delay_fraction`
    of the steps, grow linearly to full size until the last `finetune_fraction`, which trains at
    full size. Sides are rounded down to multiples of `size_increment` pixels (bilinear, antialiased
    resizing of whole batches), so with `finetune_fraction: 0` the last steps train one increment
    below full size. Evaluation, BatchNorm recalibration and prediction see full-size
    images. The network must take any input size: global pooling before its Dense layers, no
    Flatten. With `compile: true` each size compiles anew, and Dynamo compiles at most 8 shapes of
    one step before it runs the others uncompiled: a coarse `size_increment` keeps them few.
    """

    initial_scale: Real = Field(default=0.5, gt=0.0, le=1.0, description="the first images' side, relative")
    delay_fraction: Real = Field(default=0.5, ge=0.0, lt=1.0, description="share of steps at initial_scale")
    finetune_fraction: Real = Field(default=0.2, ge=0.0, lt=1.0, description="share of steps at full size")
    size_increment: Count = Field(default=4, ge=1, description="sides are multiples of this many pixels")

    @model_validator(mode="after")
    def _fractions(self) -> ProgressiveResizing:
        if self.delay_fraction + self.finetune_fraction > 1.0:
            raise ValueError(
                f"delay_fraction + finetune_fraction must be at most 1 (they are {self.delay_fraction} "
                f"+ {self.finetune_fraction}): the steps before growing and after it"
            )
        return self


class TrainConfig(_Config):
    epochs: Count = Field(default=10, ge=1)
    batch_size: Count = Field(default=128, ge=1)
    drop_last: bool = Field(
        default=False,
        description="leave out each epoch's last batch when it is short (every batch then holds "
        "batch_size images; a new shuffle each epoch, so no image is always left out), as the "
        "training loaders of fastai, timm and airbench do; off: every image every epoch, as Keras' "
        "fit. With BatchNormalization's momentum at airbench's 0.6, a short last batch weighs 40% in "
        "the running statistics that validation and the test use (training warns when that is noisy)",
    )
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    label_smoothing: Real = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="in the training loss only: val_loss and test_loss are plain cross-entropy (Keras "
        "validates with the smoothed loss)",
    )
    early_stopping: EarlyStopping | None = None
    augment: Augment = Augment()
    # per-epoch seeds are derived as seed × 100,003 + epoch and must fit torch's 64-bit seeds
    seed: Count = Field(default=0, ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    channels_last: bool = True
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        default="float32",
        description="bfloat16: mixed precision, forward passes autocast to bfloat16 (weights, gradients "
        "and optimizer state stay float32), in training, evaluation, the feature cache and prediction; "
        "auto: bfloat16 where the device computes it natively (a CPU with AVX512-BF16, AMX or Arm BF16, "
        "a CUDA GPU with bfloat16 units), else float32 — the run records the one it chose",
    )
    deterministic: bool = Field(
        default=True,
        description="deterministic algorithms (cuDNN, cuBLAS and torch's own), so that a rerun of the "
        "same command gives the same weights on a GPU too; off: PyTorch's fastest choices",
    )
    threads: Count | None = Field(
        default=None,
        ge=1,
        # each thread is an OS thread: 100,000 of them left none to start ("can't start new
        # thread"). Fixed rather than the cores of this machine, so that a config recorded on a
        # larger one still loads here; 1024 is more than the hardware threads of any CPU server
        le=1024,
        description="PyTorch CPU threads for this run (the result depends on it: reductions split "
        "differently); None: PyTorch's default. Studies set 1 unless their file says otherwise",
    )
    compile: bool | Literal["frozen"] = Field(
        default=False,
        description="torch.compile (Inductor, which needs a C++ compiler on a CPU). true: the training step "
        "(forward and backward), and a frozen backbone's rows as an inference graph with Inductor's "
        "freezing (BatchNorm and activations folded into the convolutions); 'frozen': only the latter, "
        "the faster of the two for a backbone (benchmarks/transfer_step.py), and on a CPU with AVX-512 "
        "the weight gradients of depthwise convolutions with kernels over 3×3 on small maps, by one "
        "Inductor kernel per shape where measured to pay (capas.train.depthwise.shift_pays). "
        "The first steps of each batch shape take seconds to compile; evaluation, checkpoints and the "
        "saved model are the uncompiled model's",
    )
    winograd: bool | Literal["auto"] = Field(
        default="auto",
        description="compute the wide 3×3, stride-1 convolutions (at least 128 channels in and out, "
        "outputs at least 4×4 that fill its 4×4 tiles well enough to pay: capas.train.winograd.pays) "
        "of float32 training on a CPU by Winograd's F(4×4, 3×3): 4× fewer "
        "multiply-adds, results equal to float32 rounding; the run records which layers. Not in "
        "bfloat16 or on a GPU, where it changes nothing; evaluation and serving are unchanged. "
        "'auto', the default: on where it was measured to pay, float32 training on an x86 CPU with AVX2 and "
        "without AVX-512 (capas.train.winograd.auto), and not with compile: true",
    )
    cache_frozen: bool = Field(
        default=False,
        description="keep in memory the output of the backbone rows that stay frozen for the whole "
        "training (after fine-tuning's unfreezing too), computed once per image (and once more for "
        "its mirror image with flips) before the first epoch; each step then runs only the rows after "
        "them. The same batches, flips and losses as without it. Needs a frozen backbone in "
        "inference mode, flips as the only augmentation, no progressive resizing, one process",
    )
    max_seconds: Real | None = Field(
        default=None,
        gt=0.0,
        description="budget of seconds in training steps (validation not counted); training stops at the "
        "step that reaches it, within its epoch, which is then validated",
    )
    max_samples: Count | None = Field(default=None, ge=1, description="budget of training images seen")
    finetune: FinetuneConfig | None = None
    progressive_resizing: ProgressiveResizing | None = None
    ema: EmaConfig | None = None
    tta: Literal["none", "flip", "flip_shift"] = Field(
        default="none",
        description="test-time augmentation in evaluation, prediction and serving: 'flip' averages the "
        "logits of the image and its mirror; 'flip_shift' also those of both views shifted one pixel "
        "up-left and down-right (6 forward passes, weighted as airbench: ½ unshifted, ¼ each shift)",
    )
    bn_recalibration: Count = Field(
        default=0,
        ge=0,
        description="before every evaluation, recompute BatchNormalization's running statistics as the "
        "average over this many training batches (no augmentation); 0: off, Keras' moving averages",
    )

    @model_validator(mode="after")
    def _winograd_uncompiled(self) -> TrainConfig:
        if self.winograd is True and self.compile is True:
            raise ValueError(
                "winograd: true and compile: true cannot be combined: winograd replaces convolutions "
                "in the eager step; set one of them"
            )
        if self.finetune is not None and self.finetune.after_epochs >= self.epochs:
            raise ValueError(
                f"finetune.after_epochs ({self.finetune.after_epochs}) must be less than epochs "
                f"({self.epochs}): fine-tuning starts after that many epochs, so it would never start"
            )
        return self


class DataConfig(_Config):
    name: str = "fashion-mnist"
    data_dir: str | None = None
    val_fraction: Real = Field(default=0.1, gt=0.0, lt=1.0)
    test_fraction: Real = Field(
        default=0.2, gt=0.0, lt=1.0, description="held out when the data has no test split"
    )
    limit: Count | None = Field(
        default=None,
        ge=10,
        description="train on a stratified subset of this many images (and validate on limit·val_fraction)",
    )
    test_limit: Count | None = Field(
        default=None,
        ge=10,
        description="test on a stratified subset of this many images; None: the whole test split",
    )
    split_seed: Count = Field(default=0, ge=0, le=MAX_SEED)
