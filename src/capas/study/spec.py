"""Study files: a base (spec, training, data), named variations, a design and seeds, resolved to variants.

    name: global-pooling
    base:
      name: GlobalAveragePooling2D      # the base variant's label in the report (default "base")
      spec: ../seed000-gap.yaml         # a path (relative to the study file) or an inline spec;
                                        # or run: RUN, a run directory (e.g. from capas import-keras):
                                        # its model.json, its recorded train and data as defaults
      train: {epochs: 3, batch_size: 128}
      data: {name: fashion-mnist, limit: 6000}
    seeds: 3                            # or a list, e.g. [0, 1, 2], or adaptive replication:
                                        # {min: 3, max: 10, target_halfwidth_pp: 1.0}
    design: one-at-a-time               # or grid: every combination
    variations:
      - name: head
        alternatives:
          - name: Flatten
            replace: {layer: global_average_pooling2d, with: Flatten}

An alternative is a mapping of change kinds (the KINDS registry) to their arguments; a list applies
each item in turn. Layers are referred to by their index or their name in the *base* spec, so
changes from different variations compose in a grid. A variant's changes apply kind by kind, whatever
their order in the file: replace, keywords (of the replaced layer too), insert (before or after a layer
that is removed too), remove (of a layer no other change replaces or changes). Every variant is
validated (spec shapes, training config) before anything trains, and errors name the variation and
alternative (and the variant, for a grid's combination).

Adaptive replication trains `min` seeds of every variant, then adds seeds to each variant whose 95%
confidence interval of the test-accuracy difference from the base is wider than ±target_halfwidth_pp,
until it is narrower or the variant has `max` seeds (the base trains each seed a variant needs for
pairing). Studies recalibrate BatchNormalization statistics before every evaluation unless the
training config sets `bn_recalibration` (STUDY_BN_RECALIBRATION batches).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import re
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capas.errors import CapasError, closest
from capas.spec import DataConfig, ModelSpec, TrainConfig, load_document, parse_layer
from capas.spec.io import parse_config
from capas.spec.train import MAX_SEED

DESIGNS = ("one-at-a-time", "grid")
DEFAULT_SEEDS = 3
RUN_THREADS = 1
"""PyTorch threads per run unless base.train.threads says otherwise: the same in every run whatever the
number of workers, since the weights depend on it (a layout-independent study must fix it)."""
MAX_SEEDS = 10_000
"""The most seeds a variant may train: far beyond any study's, far below what listing them takes in memory
(seeds.max 4,294,967,296 was a MemoryError as the study loaded)."""
STUDY_BN_RECALIBRATION = 20
"""Training batches that recalibrate BatchNormalization's statistics before each evaluation in a study
(2,560 images at batch 128: the statistics' standard error is ~2% of a channel's spread)."""
TARGET_REACHED, MAX_REACHED = "target reached", "max reached"


@dataclass
class Draft:
    """A variant being built: the base's documents, changed in place by each change kind.

    `layers` pairs each layer item with the index it had in the base spec (None: inserted), so that
    references keep meaning the base's layers however many changes came before.
    """

    spec: dict
    layers: list[tuple[int | None, Any]]
    train: dict
    data: dict
    base_names: list[str]
    extras: dict = field(default_factory=dict)
    inserted_after: dict[int, int] = field(default_factory=dict)  # base index -> layers inserted after it
    changed: dict[int, str] = field(default_factory=dict)  # base index -> the kind that changed it
    variation: str = ""  # the variation whose change is being applied
    claimed: dict[str, str] = field(default_factory=dict)  # setting ('train.optimizer.lr') -> its variation

    def claim(self, setting: str) -> None:
        """Refuse a setting that another variation of a grid's combination sets too (with its own
        value, or over a mapping that holds it): the file's order would pick one, unseen."""
        for other, variation in self.claimed.items():
            overlap = setting == other or setting.startswith(f"{other}.") or other.startswith(f"{setting}.")
            if overlap and variation != self.variation:
                within = "" if other == setting else f" (it sets {other})"
                raise CapasError(
                    f"{setting} is also set by variation {variation!r}{within}: in a grid each setting comes "
                    "from one variation, else the file's order would pick one"
                )
        self.claimed[setting] = self.variation

    def position(self, ref: Any, kind: str) -> int:
        """Where base layer `ref` (an index or a name) is now in `layers`."""
        count = len(self.base_names)
        if isinstance(ref, bool) or not isinstance(ref, int | str):
            raise CapasError(f"{kind}: a layer is referred to by its index or its name, got {ref!r}")
        if isinstance(ref, str):
            if ref not in self.base_names:
                raise CapasError(
                    f"{kind}: no layer named {ref!r} in the base spec{closest(ref, self.base_names)}; "
                    f"its layers are: {', '.join(self.base_names)}"
                )
            index = self.base_names.index(ref)
        else:
            if not -count <= ref < count:
                raise CapasError(
                    f"{kind}: layer index {ref} is out of range; the base spec has {count} layers (0..{count - 1})"
                )
            index = ref % count
        for position, (origin, _) in enumerate(self.layers):
            if origin == index:
                return position
        raise CapasError(f"{kind}: layer {self.base_names[index]!r} was already removed by another change")


KindApply = Callable[[Draft, Any], None]
AfterTrain = Callable[[Path, Any], dict]


@dataclass(frozen=True)
class Kind:
    """A change kind: `apply` edits the draft before training; a kind that acts on the trained model
    (e.g. a future `compress`) also gives `after_train(run_dir, args) -> metrics`, which the worker
    calls after training for variants whose `extras` hold that kind's arguments."""

    apply: KindApply
    after_train: AfterTrain | None = None


KINDS: dict[str, Kind] = {}
"""Change kinds by the key users write in an alternative: adding one touches only this registry. A variant
applies its changes kind by kind in this order (replace, keywords, insert, remove, ...), several of one
kind in the file's order: the order of keys in a mapping means nothing in YAML."""


def kind(name: str, after_train: AfterTrain | None = None) -> Callable[[KindApply], KindApply]:
    """Register a change kind under the key users write."""

    def register(apply: KindApply) -> KindApply:
        KINDS[name] = Kind(apply, after_train)
        return apply

    return register


def _mapping(value: Any, kind_name: str, keys: str) -> dict:
    if not isinstance(value, dict):
        raise CapasError(f"{kind_name}: expected a mapping with {keys}, got {value!r}")
    return value


def _layer_item(index: int, item: Any, kind_name: str) -> Any:
    try:
        parse_layer(index, item)  # the layer alone must be valid; shapes are checked on the whole spec
    except CapasError as error:
        raise CapasError(f"{kind_name}: {error}") from None
    return item


@kind("replace")
def _replace(draft: Draft, args: Any) -> None:
    """replace: {layer: REF, with: LAYER}"""
    args = _mapping(args, "replace", "'layer' and 'with'")
    if set(args) != {"layer", "with"}:
        raise CapasError(
            f"replace: expected exactly the keys 'layer' and 'with', got {', '.join(map(str, args))}"
        )
    position = draft.position(args["layer"], "replace")
    origin = draft.layers[position][0]
    if draft.changed.get(origin) == "replace":  # two layers for one place: the file's order would pick one
        raise CapasError(f"replace: layer {draft.base_names[origin]!r} is already replaced by another change")
    draft.changed[origin] = "replace"
    # the new layer keeps the old one's place: the diff shows it as replaced, later references reach it
    draft.layers[position] = (origin, _layer_item(position, args["with"], "replace"))


@kind("keywords")
def _keywords(draft: Draft, args: Any) -> None:
    """keywords: {REF: {keyword: value}}; a null value goes back to Keras' default."""
    for ref, values in _mapping(args, "keywords", "layer references as keys").items():
        values = _mapping(values, f"keywords of {ref!r}", "keyword: value pairs")
        position = draft.position(ref, "keywords")
        origin, item = draft.layers[position]
        for keyword in values:
            draft.claim(f"keyword {keyword} of layer {draft.base_names[origin]!r}")
        draft.changed.setdefault(origin, "keywords")
        type_name, current = (item, {}) if isinstance(item, str) else next(iter(item.items()))
        merged = {**(current or {}), **values}
        merged = {k: v for k, v in merged.items() if v is not None}
        draft.layers[position] = (
            origin,
            _layer_item(position, {type_name: merged} if merged else type_name, "keywords"),
        )


@kind("insert")
def _insert(draft: Draft, args: Any) -> None:
    """insert: {before: REF | after: REF, layer: LAYER}"""
    args = _mapping(args, "insert", "'before' or 'after', and 'layer'")
    where = [k for k in ("before", "after") if k in args]
    if len(where) != 1 or "layer" not in args or len(args) != 2:
        raise CapasError(
            f"insert: expected 'layer' and one of 'before' or 'after', got {', '.join(map(str, args))}"
        )
    position = draft.position(args[where[0]], "insert")
    if where[0] == "after":  # behind the layers inserted after it before: the file's order
        index = draft.layers[position][0]
        position += 1 + draft.inserted_after.get(index, 0)
        draft.inserted_after[index] = draft.inserted_after.get(index, 0) + 1
    draft.layers.insert(position, (None, _layer_item(position, args["layer"], "insert")))


@kind("remove")
def _remove(draft: Draft, args: Any) -> None:
    """remove: REF"""
    position = draft.position(args, "remove")
    origin = draft.layers[position][0]
    if origin in draft.changed:  # applied after replace and keywords: their change would vanish unseen
        raise CapasError(
            f"remove: layer {draft.base_names[origin]!r} is also changed by {draft.changed[origin]}; "
            "a variant cannot both change and remove a layer"
        )
    del draft.layers[position]


def _set_dotted(target: dict, path: str, value: Any, kind_name: str) -> None:
    keys = str(path).split(".")
    for key in keys[:-1]:
        node = target.get(key)
        if node is None:
            node = target[key] = {}
        if not isinstance(node, dict):
            raise CapasError(f"{kind_name}: {path!r}: {key!r} is {node!r}, not a mapping")
        target = node
    target[keys[-1]] = copy.deepcopy(value)


@kind("train")
def _train(draft: Draft, args: Any) -> None:
    """train: {dotted.key: value}, e.g. {optimizer.name: sgd, optimizer.lr: 0.01, batch_size: 64}"""
    for path, value in _mapping(args, "train", "dotted training keys").items():
        if path == "seed":  # run_config sets each run's seed: a variant's own would be dropped unseen
            raise CapasError(
                "train: 'seed' cannot be varied: every variant trains the study's seeds (set them with 'seeds')"
            )
        draft.claim(f"train.{path}")
        _set_dotted(draft.train, path, value, "train")


@kind("spec")
def _spec(draft: Draft, args: Any) -> None:
    """spec: {dotted.key: value} for the spec's own keys, e.g. {backbone.frozen: 2, input_shape: [32, 32, 3]}"""
    for path, value in _mapping(args, "spec", "dotted spec keys").items():
        if str(path).split(".")[0] in ("layers", "name"):
            raise CapasError(
                f"spec: {path!r} cannot be set this way; change layers with replace, insert, remove or keywords"
            )
        draft.claim(f"spec.{path}")
        _set_dotted(draft.spec, path, value, "spec")


def _compress_after_train(run_dir: Path, args: dict) -> dict:
    from capas.deploy.compress import compress_for_study

    return compress_for_study(run_dir, args)


@kind("compress", after_train=_compress_after_train)
def _compress(draft: Draft, args: Any) -> None:
    """compress: {quantize: int8|dynamic} or {prune: AMOUNT, structured: true, finetune_epochs: N}; applied after training"""
    from capas.deploy.compress import check_method

    args = _mapping(args, "compress", "'quantize', or 'prune' with 'structured' and 'finetune_epochs'")
    unknown = set(args) - {"quantize", "prune", "structured", "finetune_epochs"}
    if unknown:
        raise CapasError(
            f"compress: unknown key(s) {', '.join(map(str, unknown))}; allowed: quantize, prune, structured, finetune_epochs"
        )
    check_method(
        args.get("quantize"),
        args.get("prune"),
        args.get("finetune_epochs", 0),
        lambda name: f"compress.{name}",
    )
    if args.get("quantize") is not None and {"structured", "finetune_epochs"} & set(args):
        raise CapasError(
            "compress: structured and finetune_epochs are prune's options; quantize takes neither"
        )
    if not isinstance(args.get("structured", True), bool):
        raise CapasError(f"compress: structured must be true or false, got {args['structured']!r}")
    draft.claim("compress")
    draft.extras["compress"] = dict(args)


@dataclass(frozen=True)
class Variant:
    """One fully resolved variant: the documents every seed of it trains with."""

    name: str
    changes: tuple[str, ...]  # "variation: alternative" for each non-base choice
    spec: dict
    train: dict
    data: dict
    origins: tuple[int | None, ...]  # base index of each layer (None: inserted)
    extras: dict = field(default_factory=dict)

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.spec, source=f"variant {self.name!r}")

    def run_config(self, seed: int) -> dict:
        """The JSON-able config of one run (seed changes initialisation and shuffling, not the splits)."""
        return {
            "spec": self.spec,
            "train": {**self.train, "seed": seed},
            "data": self.data,
            "extras": self.extras,
        }


@dataclass(frozen=True)
class Alternative:
    name: str
    changes: dict


@dataclass(frozen=True)
class Variation:
    name: str
    alternatives: tuple[Alternative, ...]


@dataclass(frozen=True)
class Replication:
    """Adaptive replication: seeds per variant between `min` and `max`, until the 95% CI of the
    test-accuracy difference from the base is at most ±target_halfwidth_pp."""

    min: int
    max: int
    target_halfwidth_pp: float

    def decide(self, variant: dict[int, float], base: dict[int, float], tried: int) -> str | None:
        """Why a variant needs no more seeds (TARGET_REACHED, MAX_REACHED), or None for one more.

        `variant` and `base` map seeds to test accuracy (0..1) of finished runs; `tried` counts the
        variant's seeds run so far, failed ones included (they count towards `max`)."""
        from capas.study.stats import paired_comparison  # scipy: only once runs have finished

        shared = set(variant) & set(base)
        if len(shared) >= max(self.min, 2):
            half_width = 100 * paired_comparison(variant, base).difference.half_width
            if half_width <= self.target_halfwidth_pp:
                return TARGET_REACHED
        return MAX_REACHED if tried >= self.max else None


@dataclass(frozen=True)
class Study:
    name: str
    source: str
    design: str
    seeds: tuple[int, ...]  # every seed a run may have (with replication: 0 .. max − 1)
    variants: tuple[Variant, ...]  # the base first
    replication: Replication | None = None

    @property
    def base(self) -> Variant:
        return self.variants[0]

    @property
    def initial_seeds(self) -> tuple[int, ...]:
        """The seeds every variant trains first (with replication, the first `min`)."""
        return self.seeds[: self.replication.min] if self.replication else self.seeds

    def runs(self) -> list[tuple[Variant, int]]:
        return [(variant, seed) for variant in self.variants for seed in self.initial_seeds]


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


NAME_MAX = 255  # characters in a file name (bytes on Linux and macOS; directory_name's are ASCII)


def directory_name(name: str) -> str:
    """A variant name as a folder name: letters, digits, '.', '_', '-' and '+'; never '.' or '..' (the
    runs folder itself, or the study's: a variant named '..' trained beside runs/)."""
    folder = re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-")
    return folder if folder.strip(".") else "variant"


def _replication(value: dict, source: str) -> Replication:
    keys = {"min", "max", "target_halfwidth_pp"}
    if set(value) != keys:
        raise CapasError(
            f"{source}: adaptive 'seeds' needs exactly the keys min, max and target_halfwidth_pp "
            f"(e.g. {{min: 3, max: 10, target_halfwidth_pp: 1.0}}), got {', '.join(map(str, value))}"
        )
    low, high, target = value["min"], value["max"], value["target_halfwidth_pp"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)) or not 2 <= low <= high:
        raise CapasError(
            f"{source}: seeds.min and seeds.max must be integers with 2 <= min <= max, got {low!r} and {high!r}"
        )
    if high > MAX_SEEDS:  # the seeds are 0 .. max − 1
        raise CapasError(f"{source}: seeds.max must be at most {MAX_SEEDS:,} seeds, got {high!r}")
    if isinstance(target, bool) or not isinstance(target, int | float) or not 0 < target < math.inf:
        raise CapasError(
            f"{source}: seeds.target_halfwidth_pp must be a positive, finite number of percentage points, got {target!r}"
        )
    return Replication(low, high, float(target))


def _seeds(value: Any, source: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SEEDS:
        return tuple(range(value))
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SEED for v in value)
        and len(set(value)) == len(value)
    ):
        return tuple(value)
    raise CapasError(
        f"{source}: 'seeds' must be a count (e.g. 3, at most {MAX_SEEDS:,}) or a list of distinct integers "
        f"from 0 to {MAX_SEED:,}, got {reprlib.repr(value)}"
    )


def _variations(raw: Any, source: str) -> tuple[Variation, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise CapasError(
            f"{source}: 'variations' must be a list of variations, each with a name and alternatives"
        )
    out = []
    for i, item in enumerate(raw):
        where = f"{source}: variation {i}"
        if not isinstance(item, dict):
            raise CapasError(f"{where}: expected a mapping with 'name' and 'alternatives', got {item!r}")
        name = item.get("name", f"variation-{i}")
        if not isinstance(name, str) or not name:
            raise CapasError(f"{where}: 'name' must be a non-empty string, got {name!r}")
        where = f"{source}: variation {name!r}"
        if unknown := sorted(set(item) - {"name", "alternatives"}):
            raise CapasError(
                f"{where}: unknown key {unknown[0]!r}{closest(str(unknown[0]), ['name', 'alternatives'])}; "
                "allowed: name, alternatives"
            )
        if "alternatives" not in item:
            raise CapasError(
                f"{where}: 'alternatives' is missing (a list of alternatives, each a mapping of changes)"
            )
        alternatives = item["alternatives"]
        if not isinstance(alternatives, list) or not alternatives:
            raise CapasError(f"{where}: 'alternatives' must be a non-empty list")
        parsed = []
        for j, alt in enumerate(alternatives):
            if not isinstance(alt, dict):
                raise CapasError(f"{where}, alternative {j}: expected a mapping of changes, got {alt!r}")
            alt_name = alt.get("name", f"{name}-{j + 1}")
            if not isinstance(alt_name, str) or not alt_name:
                raise CapasError(
                    f"{where}, alternative {j}: 'name' must be a non-empty string, got {alt_name!r}"
                )
            changes = {k: v for k, v in alt.items() if k != "name"}
            for key in changes:
                if key not in KINDS:
                    raise CapasError(
                        f"{where}, alternative {alt_name!r}: unknown change {key!r}{closest(str(key), KINDS)}; "
                        f"allowed: {', '.join(KINDS)}"
                    )
            if not changes:
                raise CapasError(
                    f"{where}, alternative {alt_name!r}: no change given; allowed: {', '.join(KINDS)}"
                )
            parsed.append(Alternative(alt_name, changes))
        out.append(Variation(name, tuple(parsed)))
    return tuple(out)


def _base_spec(raw: Any, folder: Path, source: str) -> dict:
    if isinstance(raw, str):
        path = Path(raw) if Path(raw).is_absolute() else folder / raw
        document = load_document(path)
        ModelSpec.from_dict(document, source=str(path))
        return document
    if isinstance(raw, dict):
        ModelSpec.from_dict(raw, source=f"{source}: base.spec")
        return copy.deepcopy(raw)
    raise CapasError(
        f"{source}: 'base.spec' must be a path to a spec file or an inline spec mapping, got {raw!r}"
    )


def _base_run(raw: Any, folder: Path, source: str) -> tuple[dict, dict]:
    """A run directory as a base: its model.json, and its config.json's train and data configs."""
    if not isinstance(raw, str):
        raise CapasError(f"{source}: 'base.run' must be the path of a run directory, got {raw!r}")
    run = Path(raw) if Path(raw).is_absolute() else folder / raw
    if not os.path.isfile(run / "model.json"):  # False for a name too long to be a file's
        raise CapasError(f"{source}: 'base.run': {run} is not a run directory (no model.json)")
    document = load_document(run / "model.json")
    ModelSpec.from_dict(document, source=str(run / "model.json"))
    config = load_document(run / "config.json") if (run / "config.json").is_file() else {}
    if not isinstance(config, dict):
        raise CapasError(f"{source}: 'base.run': {run / 'config.json'} is not a mapping")
    recorded = {key: config[key] for key in ("train", "data") if isinstance(config.get(key), dict)}
    return document, recorded


def _resolve(base: Draft, choices: list[tuple[Variation, Alternative]], name: str, source: str) -> Variant:
    draft = copy.deepcopy(base)
    changes = [
        (variation, alternative, key, item)
        for variation, alternative in choices
        for key, args in alternative.changes.items()
        for item in (args if isinstance(args, list) and key in ("replace", "insert", "remove") else [args])
    ]
    order = list(KINDS)
    for variation, alternative, key, item in sorted(changes, key=lambda change: order.index(change[2])):
        where = f"variation {variation.name!r}, alternative {alternative.name!r}"
        if len(choices) > 1:  # a grid's combination: name the variant the report would show
            where = f"variant {name!r}, {where}"
        draft.variation = variation.name
        try:
            KINDS[key].apply(draft, item)
        except CapasError as error:
            raise CapasError(f"{source}: {where}: {error}") from None
    where = (
        f"{source}: variant {name!r} ({'; '.join(f'{v.name}: {a.name}' for v, a in choices) or 'the base'})"
    )
    spec = {**draft.spec, "layers": [item for _, item in draft.layers]}
    try:
        ModelSpec.from_dict(spec, source="spec")
        train = parse_config(TrainConfig, draft.train, "train").model_dump(mode="json")
        data = parse_config(DataConfig, draft.data, "data").model_dump(mode="json")
    except CapasError as error:
        raise CapasError(f"{where}: {error}") from None
    return Variant(
        name=name,
        changes=tuple(f"{v.name}: {a.name}" for v, a in choices),
        spec=spec,
        train=train,
        data=data,
        origins=tuple(origin for origin, _ in draft.layers),
        extras=draft.extras,
    )


def _compress_defaults(extras: dict) -> dict:
    """extras with compress' defaults written out: {prune: 0.5} prunes as {prune: 0.5, structured: true}."""
    from capas.deploy.settings import COMPRESS

    args = extras.get("compress")
    if args is None or args.get("prune") is None:
        return extras
    defaults = {"structured": True, "finetune_epochs": COMPRESS.finetune_epochs}
    return {**extras, "compress": {**defaults, **args}}


def _refuse_identical(variants: list[Variant], source: str) -> None:
    """Two variants that train the same runs would spend their compute twice and report a difference
    of exactly nothing: an alternative that sets what the base already has, or two alternatives
    (or grid combinations) that come to the same settings."""
    trained: dict[str, str] = {}
    for variant in variants:
        train = TrainConfig.model_validate(variant.train)
        # an unset rate or decay is the optimizer's default: compare what they come to
        optimizer = train.optimizer.model_dump(mode="json")
        optimizer |= {"lr": train.optimizer.learning_rate, "weight_decay": train.optimizer.decay}
        resolved = {
            "spec": variant.model_spec.to_dict(),
            "train": train.model_dump(mode="json") | {"optimizer": optimizer},
            "data": DataConfig.model_validate(variant.data).model_dump(mode="json"),
            "extras": _compress_defaults(variant.extras),
        }
        digest = config_hash(resolved)
        if digest in trained:
            raise CapasError(
                f"{source}: variant {variant.name!r} trains exactly as {trained[digest]!r} (the same model, "
                "training and data): change something, or leave it out"
            )
        trained[digest] = variant.name


def load_study(
    path: str | Path,
    *,
    data: str | None = None,
    seeds: int | None = None,
    input_shape: list[int] | None = None,
) -> Study:
    """Load a study file and resolve and validate every variant; `data`, `seeds` and `input_shape` override it."""
    path = Path(path)
    source = str(path)
    document = load_document(path)
    allowed = {"name", "base", "seeds", "design", "variations"}
    if not isinstance(document, dict):
        raise CapasError(f"{source}: expected a mapping with {', '.join(sorted(allowed))}")
    for key in document:
        if key not in allowed:
            raise CapasError(
                f"{source}: unknown key {key!r}{closest(str(key), allowed)}; allowed: {', '.join(sorted(allowed))}"
            )
    name = document.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise CapasError(f"{source}: 'name' must be a non-empty string, got {name!r}")
    if len(directory_name(name)) > NAME_MAX:  # studies/<name> could not be created
        raise CapasError(
            f"{source}: 'name' is {len(directory_name(name))} characters as a folder name; at most {NAME_MAX}"
        )
    base = document.get("base")
    base_keys = {"name", "spec", "run", "train", "data"}
    if isinstance(base, dict) and (unknown := sorted(set(base) - base_keys)):
        raise CapasError(
            f"{source}: unknown key 'base.{unknown[0]}'{closest(str(unknown[0]), base_keys)}; "
            f"allowed: {', '.join(sorted(base_keys))}"
        )
    if not isinstance(base, dict) or ("spec" in base) == ("run" in base):
        raise CapasError(
            f"{source}: 'base' must be a mapping with 'spec' (a spec) or 'run' (a run directory, e.g. one "
            "made by capas import-keras), and optionally name, train and data"
        )
    base_name = base.get("name", "base")
    if not isinstance(base_name, str) or not base_name:
        raise CapasError(f"{source}: 'base.name' must be a non-empty string, got {base_name!r}")
    design = document.get("design", "one-at-a-time")
    if design not in DESIGNS:
        raise CapasError(
            f"{source}: unknown design {design!r}{closest(str(design), DESIGNS)}; allowed: {', '.join(DESIGNS)}"
        )
    seeds_raw = document.get("seeds", DEFAULT_SEEDS)
    replication = None
    if isinstance(seeds_raw, dict):
        replication = _replication(seeds_raw, source)
        seed_list = tuple(range(replication.max))
    else:
        seed_list = _seeds(seeds_raw, source)
    if seeds is not None:  # a fixed count from the command line replaces the file's seeds
        seed_list, replication = _seeds(seeds, "--seeds"), None

    recorded: dict = {}
    if "run" in base:
        spec, recorded = _base_run(base["run"], path.parent, source)
    else:
        spec = _base_spec(base["spec"], path.parent, source)
    if input_shape is not None:
        spec = {**spec, "input_shape": list(input_shape)}
    for key in ("train", "data"):
        if base.get(key) is not None and not isinstance(base[key], dict):
            raise CapasError(f"{source}: 'base.{key}' must be a mapping, got {base[key]!r}")
    # A base run's recorded train and data configs are the defaults that base.train and base.data override.
    train = {**(recorded.get("train") or {}), **(base.get("train") or {})}
    if "bn_recalibration" not in (base.get("train") or {}):  # the study's default, also over a base run's
        train["bn_recalibration"] = STUDY_BN_RECALIBRATION
    data_raw = {**(recorded.get("data") or {}), **(base.get("data") or {})}
    if data is not None:
        data_raw["name"] = data
    if train.get("threads") is None:  # unset, or None recorded by a base run
        train = {**train, "threads": RUN_THREADS}
    base_model = ModelSpec.from_dict(spec, source=f"{source}: base.spec")
    draft = Draft(
        spec=copy.deepcopy(spec),
        layers=list(enumerate(copy.deepcopy(spec["layers"]))),
        train=copy.deepcopy(train),
        data=data_raw,
        base_names=[info.name for info in base_model.own_layer_infos()],
    )

    variations = _variations(document.get("variations"), source)
    names = [v.name for v in variations]
    if len(set(names)) != len(names):
        raise CapasError(
            f"{source}: variation names must be unique; repeated: {', '.join(sorted({n for n in names if names.count(n) > 1}))}"
        )
    if design == "one-at-a-time":
        combos = [[(variation, alt)] for variation in variations for alt in variation.alternatives]
    else:  # grid: each variation contributes its base option (None) or one of its alternatives
        options = [[None, *v.alternatives] for v in variations]
        combos = [
            [(v, a) for v, a in zip(variations, choice, strict=True) if a is not None]
            for choice in itertools.product(*options)
        ][1:]  # the first combination is the base itself

    variants = [_resolve(draft, [], base_name, source)]
    for choices in combos:
        variants.append(_resolve(draft, choices, "+".join(a.name for _, a in choices), source))
    seen: dict[str, str] = {}
    for variant in variants:
        folder = directory_name(variant.name)
        if folder in seen:
            raise CapasError(
                f"{source}: variant name {variant.name!r} is used twice (or collides with {seen[folder]!r} as a folder name); "
                "give each alternative and the base a unique name"
            )
        seen[folder] = variant.name
        if len(folder) > NAME_MAX:  # its runs' folders could not be created: each run would fail
            raise CapasError(
                f"{source}: variant name {reprlib.repr(variant.name)} is {len(folder)} characters as a "
                f"folder name; at most {NAME_MAX}: shorten the names of base.name or of its alternatives"
            )
    _refuse_identical(variants, source)
    return Study(
        name=name,
        source=source,
        design=design,
        seeds=seed_list,
        variants=tuple(variants),
        replication=replication,
    )
