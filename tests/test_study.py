"""Layer studies: study files and their validation, statistics, the SQLite store, the report, a real run."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from scipy import stats as scipy_stats

import capas
from capas.cpu import cpu_model
from capas.errors import CapasError
from capas.spec import ModelSpec
from capas.spec.summary import summarize
from capas.study import KINDS, load_study
from capas.study.executors import PoolExecutor
from capas.study.report import architecture_diff, collect
from capas.study.run import run_study
from capas.study.stats import mean_ci, paired_comparison
from capas.study.store import Store

EXAMPLES = Path(__file__).parent.parent / "examples" / "studies"

DROPOUT = {"Dropout": {"rate": 0.25}}
SGD = {
    "name": "optimizer",
    "alternatives": [{"name": "sgd", "train": {"optimizer.name": "sgd", "optimizer.lr": 0.05}}],
}


@pytest.fixture
def study_doc(tiny_study):
    """The tiny study with a Dropout layer before Flatten and an optimizer variation besides the head."""

    def make(**changes) -> dict:
        doc = tiny_study()
        doc["base"]["spec"]["layers"].insert(2, DROPOUT)
        doc["variations"].append(SGD)
        doc.update(changes)
        return doc

    return make


def test_one_at_a_time_and_grid_resolve_every_variant(study_doc, study_file):
    study = load_study(study_file(study_doc()))
    assert [v.name for v in study.variants] == ["Flatten", "GAP", "sgd"]
    assert study.seeds == (0, 1)
    gap = study.variants[1]
    assert gap.spec["layers"][3] == "GlobalAveragePooling2D" and gap.train == study.base.train
    sgd = study.variants[2]
    assert sgd.train["optimizer"]["name"] == "sgd" and sgd.train["optimizer"]["lr"] == 0.05
    assert sgd.spec == study.base.spec
    # the seed changes initialisation and shuffling only: the split seed is shared
    configs = [v.run_config(s) for v, s in study.runs()]
    assert {c["data"]["split_seed"] for c in configs} == {0}
    assert {c["train"]["seed"] for c in configs} == {0, 1}

    grid = load_study(study_file(study_doc(design="grid")))
    assert [v.name for v in grid.variants] == ["Flatten", "sgd", "GAP", "GAP+sgd"]
    both = grid.variants[3]
    assert both.spec["layers"][3] == "GlobalAveragePooling2D" and both.train["optimizer"]["name"] == "sgd"


def test_change_kinds_refer_to_base_layers_by_index_or_name(study_doc, study_file):
    alternative = {
        "name": "many",
        "insert": {"after": 0, "layer": "BatchNormalization"},
        "remove": "dropout",
        "keywords": {"max_pooling2d": {"pool_size": 3, "strides": 2}, -1: {"units": 10}},
        "spec": {"input_shape": [32, 32, 3]},
    }
    doc = study_doc(variations=[{"name": "mixed", "alternatives": [alternative]}])
    variant = load_study(study_file(doc)).variants[1]
    types = [next(iter(item)) if isinstance(item, dict) else item for item in variant.spec["layers"]]
    assert types == ["Conv2D", "BatchNormalization", "MaxPooling2D", "Flatten", "Dense"]
    assert variant.spec["layers"][2] == {"MaxPooling2D": {"pool_size": 3, "strides": 2}}
    assert variant.spec["input_shape"] == [32, 32, 3]
    assert variant.origins == (0, None, 1, 3, 4)


def test_inserts_after_one_layer_are_built_in_the_files_order(study_doc, study_file):
    # Conv2D, then BatchNormalization, then an Activation, written as two inserts after the Conv2D:
    # each used to go right after it, so the second came first (Conv2D, Activation, BatchNormalization)
    alternative = {
        "name": "bn-relu",
        "insert": [
            {"after": 0, "layer": "BatchNormalization"},
            {"after": 0, "layer": {"Activation": {"activation": "relu"}}},
            {"before": 1, "layer": {"Dropout": {"rate": 0.1}}},
        ],
    }
    doc = study_doc(variations=[{"name": "v", "alternatives": [alternative]}])
    variant = load_study(study_file(doc)).variants[1]
    types = [next(iter(item)) if isinstance(item, dict) else item for item in variant.spec["layers"]]
    assert types[:5] == ["Conv2D", "BatchNormalization", "Activation", "Dropout", "MaxPooling2D"]


def test_the_order_of_changes_in_the_file_does_not_matter(study_doc, study_file):
    """A mapping's key order means nothing in YAML: `remove: dropout` written before `insert: {before:
    dropout}` was refused ('already removed by another change'), written after it built the model; a
    keywords change then a remove of one layer was built silently (the keywords lost), the other way
    round refused."""
    insert = {"before": "dropout", "layer": "BatchNormalization"}
    built = []
    for alternative in ({"remove": "dropout", "insert": insert}, {"insert": insert, "remove": "dropout"}):
        doc = study_doc(variations=[{"name": "v", "alternatives": [{"name": "bn", **alternative}]}])
        built.append(load_study(study_file(doc)).variants[1].spec["layers"])
    assert built[0] == built[1] and built[0][2] == "BatchNormalization" and DROPOUT not in built[0]
    # in a grid, the conflict is the combination's: the error names the variant the report would show
    remove = {"name": "no-dropout", "alternatives": [{"name": "none", "remove": "dropout"}]}
    rate = {"name": "rate", "alternatives": [{"name": "low", "keywords": {"dropout": {"rate": 0.1}}}]}
    for variations, variant in (([remove, rate], "none+low"), ([rate, remove], "low+none")):
        with pytest.raises(
            CapasError,
            match=re.escape(
                f"variant '{variant}', variation 'no-dropout', alternative 'none': remove: layer "
            )
            + "'dropout' is also changed by keywords; a variant cannot both change and remove a layer",
        ):
            load_study(study_file(study_doc(design="grid", variations=variations)))


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        (
            {"keywords": {"dropout": {"rate": 0.2}}},
            {"keywords": {"dropout": {"rate": 0.4}}},
            r"keyword rate of layer 'dropout' is also set by variation 'a'",
        ),
        (
            {"train": {"optimizer.lr": 0.01}},
            {"train": {"optimizer.lr": 0.1}},
            r"train.optimizer.lr is also set",
        ),
        (  # a mapping that replaces the setting holding the other's key
            {"train": {"optimizer.lr": 0.01}},
            {"train": {"optimizer": {"name": "sgd"}}},
            r"train.optimizer is also set by variation 'a' \(it sets train.optimizer.lr\)",
        ),
    ],
)
def test_a_grids_variations_that_set_one_setting_are_refused(study_doc, study_file, first, second, message):
    """The combination took the later variation's value and dropped the other's, silently, while its
    name said it had both (a+b trained with b's filters and learning rate)."""
    variations = [
        {"name": name, "alternatives": [{"name": name, **change}]}
        for name, change in (("a", first), ("b", second))
    ]
    with pytest.raises(CapasError, match=r"variant 'a\+b', variation 'b', alternative 'b': " + message):
        load_study(study_file(study_doc(design="grid", variations=variations)))


@pytest.mark.parametrize(
    ("alternative", "message"),
    [
        (
            {"remove": "dense_7"},
            r"variation 'v', alternative 'a': remove: no layer named 'dense_7'.*its layers are",
        ),
        ({"remove": 9}, r"variation 'v', alternative 'a': remove: layer index 9 is out of range"),
        (
            {
                "replace": [
                    {"layer": 3, "with": "GlobalMaxPooling2D"},
                    {"layer": 3, "with": "GlobalAveragePooling2D"},
                ]
            },
            r"alternative 'a': replace: layer 'flatten' is already replaced by another change",
        ),
        # the study file's keys, not capas compress' options
        ({"compress": {"quantize": "int4"}}, r"alternative 'a': compress\.quantize 'int4': allowed int8"),
        (
            {"compress": {}},
            r"alternative 'a': .*choose one method: compress\.quantize int8\|dynamic or compress\.prune",
        ),
        (
            {"keywords": {"dense": {"rate": 0.5}}},
            r"variation 'v', alternative 'a': keywords: .*unknown keyword 'rate'",
        ),
        (
            {"keywords": {"max_pooling2d": {"pool_size": 40}}},
            r"variant 'a' \(v: a\): layer 1 \(MaxPooling2D\): the output would be 0×0",
        ),
        (
            {"replace": {"layer": "flatten", "with": "Flattn"}},
            r"variation 'v'.*unknown layer type 'Flattn'.*did you mean 'Flatten'",
        ),
        ({"train": {"optimizer.name": "lion"}}, r"variant 'a' \(v: a\): train: keyword 'optimizer.name'"),
        (
            {"train": {"epoch": 3}},
            r"variant 'a' \(v: a\): train: unknown key 'epoch' \(did you mean 'epochs'\?\)",
        ),
        ({"shuffle": True}, r"variation 'v', alternative 'a': unknown change 'shuffle'"),
        # each run's seed is the study's: a variant's own would be replaced, and it would train as the base
        (
            {"train": {"seed": 7}},
            r"variation 'v', alternative 'a': train: 'seed' cannot be varied: every variant trains the study's seeds",
        ),
        # the base's own value, once written out and once the default: nothing to compare
        ({"keywords": {"conv2d": {"filters": 4}}}, r"variant 'a' trains exactly as 'Flatten'"),
        ({"keywords": {"conv2d": {"padding": "valid"}}}, r"variant 'a' trains exactly as 'Flatten'"),
        # the optimizer's default rate and decay, written out (the base's are unset: Keras' defaults)
        ({"train": {"optimizer.lr": 0.001}}, r"variant 'a' trains exactly as 'Flatten'"),
        ({"train": {"optimizer.weight_decay": 0.0}}, r"variant 'a' trains exactly as 'Flatten'"),
        ({"remove": "flatten"}, r"variant 'a' \(v: a\): .*needs a flat vector"),
    ],
)
def test_bad_study_files_are_rejected_naming_the_variation(alternative, message, study_doc, study_file):
    doc = study_doc(variations=[{"name": "v", "alternatives": [{"name": "a", **alternative}]}])
    with pytest.raises(CapasError, match=message):
        load_study(study_file(doc))


def test_two_compressions_that_come_to_the_same_are_refused(study_doc, study_file):
    """`{prune: 0.5}` and `{prune: 0.5, structured: true}` (its default) trained and compressed twice."""
    alternatives = [
        {"name": "a", "compress": {"prune": 0.5}},
        {"name": "b", "compress": {"prune": 0.5, "structured": True, "finetune_epochs": 2}},
    ]
    with pytest.raises(CapasError, match=r"variant 'b' trains exactly as 'a'"):
        load_study(study_file(study_doc(variations=[{"name": "v", "alternatives": alternatives}])))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"base": "trian"}, r"unknown key 'base.trian' \(did you mean 'train'\?\)"),
        (
            {"variation": "alternative"},
            r"variation 'head': unknown key 'alternative' \(did you mean 'alternatives'\?\)",
        ),
        ({"seeds": [0, 2**32]}, r"'seeds' must be .* integers from 0 to 4,294,967,295"),
        ({"seeds": 10**20}, r"'seeds' must be"),  # was an OverflowError from SQLite, a study folder left
        ({"seeds": 2**32}, r"'seeds' must be a count \(e.g. 3, at most 10,000\)"),  # a MemoryError
    ],
)
def test_misspelt_keys_and_seeds_out_of_range_are_named(change, message, study_doc, study_file, tmp_path):
    doc = study_doc()
    if "base" in change:
        doc["base"][change["base"]] = {}
    if "variation" in change:
        doc["variations"][0][change["variation"]] = doc["variations"][0].pop("alternatives")
    if "seeds" in change:
        doc["seeds"] = change["seeds"]
    with pytest.raises(CapasError, match=message), open(os.devnull, "w") as quiet:
        run_study(study_file(doc), out=tmp_path / "out", workers=1, console=Console(file=quiet))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value", [("train", "epochs: 1"), ("data", ["digits"]), ("train", 0)])
def test_base_train_and_data_that_are_not_mappings_are_named(key, value, study_doc, study_file):
    """`base: {train: "epochs: 1"}` was a TypeError's traceback ('str' object is not a mapping)."""
    doc = study_doc()
    doc["base"][key] = value
    with pytest.raises(CapasError, match=rf"'base.{key}' must be a mapping, got {re.escape(repr(value))}"):
        load_study(study_file(doc))


@pytest.mark.parametrize("threads", [0, False, ""])
def test_base_train_threads_of_zero_is_refused_not_replaced(threads, study_doc, study_file):
    """`threads: 0` (or false, or '') silently became the study's 1 thread; `capas train` refuses it."""
    doc = study_doc()
    doc["base"]["train"]["threads"] = threads
    with pytest.raises(CapasError, match=r"keyword 'threads'"):
        load_study(study_file(doc))
    doc["base"]["train"]["threads"] = None  # unset, as a base run records it: the study's default
    assert load_study(study_file(doc)).base.train["threads"] == 1


def test_a_base_run_named_longer_than_a_file_name_is_not_a_run_directory(study_doc, study_file):
    """It was an OSError's traceback ("File name too long")."""
    doc = study_doc()
    doc["base"] = {"run": "r" * 300}
    with pytest.raises(CapasError, match=r"'base.run': .* is not a run directory \(no model.json\)"):
        load_study(study_file(doc))


def test_a_variant_whose_input_capas_cannot_feed_is_refused_before_training(tmp_path, tiny_study, study_file):
    """--input-shape 28,28,4 passed validation; every run then failed with the same error, and the
    study wrote a report of failures (README: every variant is validated before anything trains)."""
    with pytest.raises(CapasError, match=r"variant 'Flatten': input shape \(28, 28, 4\): .* 1 or 3 channels"):
        run_study(study_file(tiny_study()), out=tmp_path / "out", workers=1, input_shape=[28, 28, 4])
    assert not (tmp_path / "out").exists()


def test_a_study_refused_before_its_first_run_leaves_no_folder(tmp_path, tiny_study, study_file):
    """`--executor ray --address auto` with no cluster running was refused after the study opened its new
    database: the new folder stayed, holding an empty study.sqlite and the lock. A folder that was
    there already stays."""

    def no_cluster(runs: int):
        raise CapasError("cannot start or join the Ray cluster at auto")

    (tmp_path / "there").mkdir()
    for out in (tmp_path / "new", tmp_path / "there"):
        with pytest.raises(CapasError, match="cannot start or join"):
            run_study(study_file(tiny_study()), out=out, executor=no_cluster)
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".yaml"] == ["there"]
    assert [p.name for p in (tmp_path / "there").iterdir()] == [".capas.lock"]


@pytest.mark.parametrize(
    ("alternative", "message"),
    [
        ({"keywords": {-1: {"activation": "sigmoid"}}}, r"last layer \(Dense\) ends in a sigmoid"),
        ({"train": {"augment.cutout": 100}}, r"train.augment.cutout \(100\) is more than the images' side"),
        (  # the base's Flatten takes 28×28 images only
            {"train": {"progressive_resizing": {"initial_scale": 0.5}}},
            r"train.progressive_resizing: the network cannot take 12×12 images",
        ),
        ({"train": {"cache_frozen": True}}, r"train.cache_frozen: needs a model with a backbone"),
    ],
)
def test_a_variant_train_would_refuse_is_refused_before_training(
    tmp_path, tiny_study, study_file, alternative, message
):
    """Such a variant passed validation and failed each of its runs after the base had trained."""
    doc = tiny_study()
    doc["variations"][0]["alternatives"].append({"name": "bad", **alternative})
    with pytest.raises(CapasError, match=rf"variant 'bad': .*{message}"):
        run_study(study_file(doc), out=tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()


def test_names_longer_than_a_folder_name_are_refused(study_doc, study_file):
    """A study or variant name of 300 characters loaded, and every run failed: its folder could not be made."""
    with pytest.raises(CapasError, match=r"'name' is 300 characters as a folder name; at most 255"):
        load_study(study_file(study_doc(name="s" * 300)))
    alt = {"name": "v" * 300, "train": {"batch_size": 32}}
    with pytest.raises(
        CapasError, match=r"variant name 'vvv.*' is 300 characters as a folder name; at most 255"
    ):
        load_study(study_file(study_doc(variations=[{"name": "v", "alternatives": [alt]}])))


def test_a_variant_named_dot_or_dot_dot_keeps_its_runs_in_a_folder_of_its_own(study_doc, study_file):
    """'..' trained its runs beside runs/ (runs/../seed-0), '.' inside runs/ itself."""
    from capas.study.spec import directory_name

    assert [directory_name(name) for name in (".", "..", "a.b", " .. ")] == [
        "variant",
        "variant",
        "a.b",
        "variant",
    ]
    alternatives = [{"name": name, "train": {"batch_size": size}} for name, size in ((".", 16), ("..", 32))]
    with pytest.raises(
        CapasError, match=r"variant name '\.\.' is used twice \(or collides with '\.' as a folder name\)"
    ):
        load_study(study_file(study_doc(variations=[{"name": "v", "alternatives": alternatives}])))


def test_duplicate_variant_names_are_rejected(study_doc, study_file):
    alt = {"name": "Flatten", "train": {"batch_size": 32}}
    with pytest.raises(CapasError, match="variant name 'Flatten' is used twice"):
        load_study(study_file(study_doc(variations=[{"name": "v", "alternatives": [alt]}])))


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_studies_are_valid(path):
    study = load_study(path)
    assert len(study.variants) >= 3
    cifar = load_study(path, data="folder:/nonexistent", input_shape=[32, 32, 3])
    assert cifar.base.data["name"] == "folder:/nonexistent" and cifar.base.spec["input_shape"] == [32, 32, 3]


def test_mean_ci_and_paired_test_match_scipy():
    values = [0.81, 0.84, 0.80, 0.83]
    est = mean_ci(values)
    half = scipy_stats.t.ppf(0.975, 3) * np.std(values, ddof=1) / 2
    assert est.mean == pytest.approx(np.mean(values)) and est.half_width == pytest.approx(half)
    assert math.isnan(mean_ci([0.5]).half_width)
    base = {0: 0.80, 1: 0.82, 2: 0.79}
    variant = {0: 0.78, 1: 0.81, 2: 0.75, 7: 0.99}  # seed 7 has no partner and is left out
    comparison = paired_comparison(variant, base)
    assert comparison.difference.n == 3
    assert comparison.difference.mean == pytest.approx(np.mean([-0.02, -0.01, -0.04]))
    assert comparison.p_value == pytest.approx(
        scipy_stats.ttest_rel([0.78, 0.81, 0.75], [0.80, 0.82, 0.79]).pvalue
    )
    same = paired_comparison(base, base)  # no spread at all: no interval, no test (not p = 1)
    assert same.zero_variance and math.isnan(same.p_value) and math.isnan(same.difference.half_width)


def test_store_is_a_wal_sqlite_file_that_survives_reopening(tmp_path):
    path = tmp_path / "s.sqlite"
    with Store(path) as store:
        store.add_run("a/seed-0", "a", 0, {"x": 1}, "h")
        store.start("a/seed-0")
        store.add_epoch("a/seed-0", {"epoch": 1, "val_accuracy": 0.5})
        store.finish("a/seed-0", {"history": [{"epoch": 1, "val_accuracy": 0.6}], "wall_seconds": 2.0})
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with Store(path) as store:
        row = store.runs()["a/seed-0"]
        assert (row.status, row.attempts, row.seconds) == ("done", 1, 2.0)
        assert store.epochs("a/seed-0") == [{"epoch": 1, "val_accuracy": 0.6}]
    (tmp_path / "bad.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(CapasError, match="not a readable study database"):
        Store(tmp_path / "bad.sqlite")


def test_a_store_write_that_fails_halfway_leaves_nothing_of_itself(tmp_path):
    """finish() replaces a run's epochs and marks it done in one transaction: one that fails after its
    DELETE (here a history with an epoch twice) must leave the recorded epochs as they were."""
    with Store(tmp_path / "s.sqlite") as store:
        store.add_run("a/seed-0", "a", 0, {}, "h")
        store.add_epoch("a/seed-0", {"epoch": 1, "val_accuracy": 0.5})
        with pytest.raises(sqlite3.IntegrityError):
            store.finish("a/seed-0", {"history": [{"epoch": 1}, {"epoch": 1}]})
        assert store.epochs("a/seed-0") == [{"epoch": 1, "val_accuracy": 0.5}]
        assert store.runs()["a/seed-0"].status == "pending"


def test_a_store_damaged_inside_is_refused_when_opened_not_with_a_traceback_later(tmp_path):
    path = tmp_path / "study.sqlite"
    with Store(path) as store:
        for i in range(100):  # the runs table over a dozen pages
            store.add_run(f"a/seed-{i}", "a", i, {"spec": "x" * 500}, "h")
    data = bytearray(path.read_bytes())
    data[4096 * 10 : 4096 * 11] = b"\xff" * 4096  # a page of the runs table: opening does not read it
    path.write_bytes(bytes(data))
    with pytest.raises(CapasError, match=r"study.sqlite: not a readable study database .*delete it"):
        Store(path).runs()


def test_a_disk_that_refuses_writes_does_not_call_a_whole_store_damaged(tmp_path, files_up_to_4k):
    """A full disk at the study's reopening said "not a readable study database …; delete it"."""
    path = tmp_path / "study.sqlite"
    with Store(path) as store:
        for i in range(20):  # 40 KiB: past the 4 KiB writes are limited to
            store.add_run(f"a/seed-{i}", "a", i, {"spec": "x" * 500}, "h")
    with (
        files_up_to_4k(),
        pytest.raises(
            CapasError, match=r"study.sqlite: cannot open the study database \(disk I/O error\)"
        ) as error,
    ):
        Store(path)
    assert "delete" not in str(error.value)
    # and one that fills up while the study runs: sqlite3.OperationalError, a traceback
    with (
        pytest.raises(CapasError, match=r"study.sqlite: cannot write the study database \(disk I/O error\)"),
        Store(path) as store,
        files_up_to_4k(),
    ):
        store.add_run("b/seed-0", "b", 0, {"spec": "y" * 8000}, "h")
    assert set(Store(path).runs()) == {f"a/seed-{i}" for i in range(20)}


def test_parameter_formulas_give_keras_counts():
    spec = ModelSpec.from_dict(
        {
            "input_shape": [32, 32, 3],
            "layers": [
                {"Conv2D": {"filters": 128, "kernel_size": 3}},
                "BatchNormalization",
                "Flatten",
                {"Dense": {"units": 10}},
            ],
        }
    )
    rows = summarize(spec).rows
    texts = [r.layer.formula(r.input_shape) for r in rows]
    assert texts == [
        "3·3·3·128 + 128 = 3,584",
        "4·128 = 512 (256 not trainable)",
        "0",
        "115200·10 + 10 = 1,152,010",
    ]


def test_architecture_diff_names_changed_layers(study_doc, study_file):
    study = load_study(study_file(study_doc()))
    report = collect(study, {})
    diff = architecture_diff(report.variants[0], report.variants[1])
    assert [(r.change, r.before.name, r.after.name) for r in diff] == [
        ("replaced", "flatten", "global_average_pooling2d"),
        ("input changed", "dense", "dense"),
    ]
    assert (diff[1].before.trainable, diff[1].after.trainable) == (13 * 13 * 4 * 10 + 10, 4 * 10 + 10)
    assert architecture_diff(report.variants[0], report.variants[2]) == []


def test_a_compress_like_kind_plugs_in_with_one_registration(study_doc, study_file):
    from capas.study.spec import kind

    @kind("note", after_train=lambda run_dir, args: {"files": sorted(p.name for p in run_dir.iterdir())})
    def _note(draft, args):
        draft.extras["note"] = args

    try:
        doc = study_doc(variations=[{"name": "v", "alternatives": [{"name": "a", "note": "x"}]}])
        assert load_study(study_file(doc)).variants[1].extras == {"note": "x"}
    finally:
        del KINDS["note"]


def test_study_runs_writes_report_and_skips_finished_runs(tmp_path, study_doc, study_file):
    doc = study_doc()
    doc["variations"].append(
        {"name": "budget", "alternatives": [{"name": "budget", "train": {"max_samples": 100}}]}
    )
    path = study_file(doc)
    out = tmp_path / "out"
    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)  # noqa: SIM115
    outcome = run_study(path, out=out, workers=1, console=console)
    assert (outcome.trained, outcome.skipped, outcome.failed) == (8, 0, [])
    with Store(out / "study.sqlite") as store:
        rows = store.runs()
        assert sorted(rows) == [f"{v}/seed-{s}" for v in ("Flatten", "GAP", "budget", "sgd") for s in (0, 1)]
        assert {r.status for r in rows.values()} == {"done"}
        assert all(len(store.epochs(rid)) == 1 for rid in rows)
        result = rows["GAP/seed-1"].result
    run_dir = out / "runs" / "GAP" / "seed-1"
    assert json.loads((run_dir / "test.json").read_text())["test_accuracy"] == result["test_accuracy"]
    assert result["history"][0]["epoch"] == 1 and result["worker"]["threads"] >= 1
    # different seeds really train differently; the same splits: same test set size
    assert rows["GAP/seed-0"].result["test_loss"] != rows["GAP/seed-1"].result["test_loss"]
    md = (out / "report.md").read_text()
    assert "GAP instead of Flatten: 6,720 fewer parameters" in md and "paired t-test" in md
    assert "| replaced | flatten (Flatten)" in md and "train.optimizer.name: 'adam' → 'sgd'" in md
    # where the runs trained, as the workers recorded it (it was the rendering process' torch threads)
    threads = result["worker"]["threads"]
    assert f"Machine: {cpu_model()}, {threads} thread{'s' if threads != 1 else ''} per run, torch" in md
    assert rows["budget/seed-0"].result["stopped"] == "sample budget" and "| 2 sample budget |" in md
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4 and "<script" not in page
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "accuracy_vs_params.png",
        "accuracy_vs_time.png",
        "learning_curves.png",
        "per_class_accuracy.png",
    ]

    given = PoolExecutor(2)  # given, it is closed with nothing left to run (a Ray instance stayed up)
    again = run_study(path, out=out, executor=given, console=console)
    assert (again.trained, again.skipped) == (0, 8)
    assert (out / "report.md").read_text() == md  # the report comes from the store alone
    with pytest.raises(RuntimeError, match="after shutdown"):
        given.pool.submit(print)

    doc["base"]["train"]["epochs"] = 2
    with pytest.raises(
        CapasError, match=r"changed since these runs finished.*newer capas\): .*train.epochs: 1 -> 2"
    ):
        run_study(study_file(doc), out=out, workers=1, console=console)

    # The store deleted, the run directories left: they are read back only under their own settings
    # (they were taken as finished runs of the 2-epoch study, whose report then claimed 2 epochs).
    for file in out.glob("study.sqlite*"):
        file.unlink()
    with pytest.raises(
        CapasError, match=r"changed since these runs finished.*GAP/seed-1 \(train.epochs: 1 -> 2"
    ):
        run_study(study_file(doc), out=out, workers=1, console=console)
    if (out / "study.sqlite").exists():
        with Store(out / "study.sqlite") as store:
            assert not store.runs()  # refused before any row was written
    doc["base"]["train"]["epochs"] = 1
    # a run read back names the machine it trained on, from its config.json (it named the reader's)
    config = json.loads((run_dir / "config.json").read_text())
    config["environment"].update(processor="Elsewhere CPU", threads=7, torch="2.0.0")
    (run_dir / "config.json").write_text(json.dumps(config))
    rebuilt = run_study(study_file(doc), out=out, workers=1, console=console)
    assert rebuilt.failed == [] and (out / "runs" / "GAP" / "seed-1" / "test.json").is_file()
    with Store(out / "study.sqlite") as store:
        assert store.runs()["GAP/seed-1"].result["test_accuracy"] == result["test_accuracy"]  # read back
    machines = next(line for line in (out / "report.md").read_text().splitlines() if "Machines: " in line)
    assert machines.endswith(
        "(7 runs); Elsewhere CPU, 7 threads per run, torch 2.0.0, capas "
        f"{capas.__version__}, python {platform.python_version()} (1 run)"
    )


def test_a_study_refuses_to_add_runs_on_a_folder_that_changed(tmp_path, tiny_study, study_file):
    """A folder that gained images between two `capas study` calls gave the new seeds other splits
    than the finished ones, and the report paired them under "the same splits for every run"."""
    from PIL import Image

    def images(count: int) -> None:
        for label, name in enumerate("abc"):
            (tmp_path / "data" / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.full((8, 8), 40 * label + i, np.uint8)
                Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")

    images(10)
    data = {"name": f"folder:{tmp_path / 'data'}", "limit": None, "test_limit": None}
    doc = tiny_study(layers=["Flatten", {"Dense": {"units": 3, "activation": "softmax"}}], data=data, seeds=1)
    doc["base"]["spec"]["input_shape"] = [8, 8, 1]
    with open(os.devnull, "w") as quiet:
        console = Console(file=quiet)
        assert run_study(study_file(doc), out=tmp_path / "out", workers=1, console=console).failed == []
        images(12)
        doc["seeds"] = 2
        made = tmp_path / "out" / "runs" / "Flatten" / "seed-0" / "config.json"
        config = json.loads(made.read_text())
        del config["splits"]["sha256"]  # a run made before the digests were recorded: its sizes tell
        made.write_text(json.dumps(config))
        message = r"the dataset changed since these runs finished .*Flatten/seed-0 \(test: 6 -> 7.*GAP/seed-0 \(test"
        with pytest.raises(CapasError, match=message):
            run_study(study_file(doc), out=tmp_path / "out", workers=1, console=console)


def test_a_variant_renamed_to_a_name_with_the_same_folder_keeps_its_runs(tmp_path, tiny_study, study_file):
    import torch
    from safetensors.torch import save_file

    # 'GAP pool' and 'GAP-pool' share the folder runs/GAP-pool: plan found the finished runs by folder
    # and skipped them, the report looked them up by name and said "it finished no seed" (an adaptive
    # study asked for the same seeds again and again, for ever)
    doc = tiny_study(seeds=1)
    doc["variations"][0]["alternatives"][0]["name"] = "GAP pool"
    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)  # noqa: SIM115
    run_study(study_file(doc), out=tmp_path / "out", workers=1, console=console)
    doc["variations"][0]["alternatives"][0]["name"] = "GAP-pool"
    outcome = run_study(study_file(doc), out=tmp_path / "out", workers=1, console=console)
    assert (outcome.trained, outcome.skipped) == (0, 2)
    assert [sorted(v.finished) for v in outcome.report.variants] == [[0], [0]]

    # A run interrupted under an older capas: its checkpoint lacks settings this one records (splits,
    # before 2026-11-27), train refuses to resume it and says to add --restart, which `capas study`
    # has not: every rerun failed it again. It starts over instead.
    run = tmp_path / "out" / "runs" / "GAP-pool" / "seed-0"
    config = json.loads((run / "config.json").read_text())
    identity = {
        "spec": json.loads((run / "model.json").read_text()),
        "data": config["data"],
        "train": config["train"],
    }
    metadata = {"capas": json.dumps({"identity": identity})}
    save_file({"x": torch.zeros(1)}, str(run / "checkpoint.safetensors"), metadata=metadata)
    with Store(tmp_path / "out" / "study.sqlite") as store:
        store.reset("GAP-pool/seed-0")
    again = run_study(study_file(doc), out=tmp_path / "out", workers=1, console=console)
    assert (again.trained, again.skipped, again.failed) == (1, 1, [])
    log = (tmp_path / "log.txt").read_text()
    assert (
        "GAP-pool/seed-0: its checkpoint was written by an older capas, which did not record splits; starting"
        in log
    )
    loss = [{seed: r["test_loss"] for seed, r in v.finished.items()} for v in outcome.report.variants]
    assert [{seed: r["test_loss"] for seed, r in v.finished.items()} for v in again.report.variants] == loss


@pytest.mark.parametrize("holds", [["model.json", "model.safetensors"], ["notes.txt"]])
def test_a_study_out_that_is_a_run_or_another_folder_is_refused(holds, tiny_study, study_file, tmp_path):
    """`capas study --out RUN` mixed study.sqlite, runs/ and the report into the run's folder, and
    a folder of other files was taken too (train refuses both)."""
    out = tmp_path / "out"
    out.mkdir()
    for name in holds:
        (out / name).write_text("{}")
    with pytest.raises(CapasError, match=rf"{out}: not a study directory \(it holds {holds[0]}"):
        run_study(study_file(tiny_study()), out=out, workers=1)
    assert sorted(p.name for p in out.iterdir()) == sorted(holds)
