"""A study that lists compression as a variation: compressed and float variants in one report."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from rich.console import Console

from capas.study.run import run_study
from capas.study.store import Store


def test_an_int8_variant_is_reported_beside_its_float_model_and_survives_a_rerun(
    tmp_path, tiny_study, study_file
):
    # a strided convolution and no pooling: a Dense layer large enough for int8 weights to show
    layers = [
        {"Conv2D": {"filters": 8, "kernel_size": 3, "strides": 2, "activation": "relu"}},
        "Flatten",
        {"Dense": {"units": 10, "activation": "softmax"}},
    ]
    compression = {
        "name": "compression",
        "alternatives": [{"name": "int8", "compress": {"quantize": "int8"}}],
    }
    doc = tiny_study(name="compress", layers=layers, variations=[compression])
    doc["base"]["name"] = "float"
    path = study_file(doc)
    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)  # noqa: SIM115
    out = tmp_path / "out"
    outcome = run_study(path, out=out, workers=1, console=console)
    assert outcome.failed == []
    with Store(out / "study.sqlite") as store:
        result = store.runs()["int8/seed-1"].result
    compressed = out / "runs" / "int8" / "seed-1-int8"
    assert result["compress"]["run"] == str(compressed)
    assert (
        result["compress"]["test_accuracy"]
        == json.loads((compressed / "test.json").read_text())["test_accuracy"]
    )
    assert result["compress"]["size_ratio"] > 2  # int8 weights; graph overhead weighs on a tiny model
    markdown = outcome.markdown.read_text()
    assert "## Compression" in markdown and "| int8 | quantize-int8 |" in markdown
    assert "int8, compressed against its own float model:" in markdown
    assert "<h2>Compression</h2>" in outcome.html.read_text()

    # A rerun after the study was interrupted between training and recording re-reads the compressed run.
    with Store(out / "study.sqlite") as store:
        store.db.execute("UPDATE runs SET status = 'running' WHERE id = 'int8/seed-1'")
        store.db.commit()
    again = run_study(path, out=out, workers=1, console=console)
    assert again.failed == [] and again.trained == 1
    assert again.markdown.read_text() == markdown


def test_a_compressed_run_of_earlier_weights_is_made_again_not_read_back(tmp_path, tiny_study, study_file):
    # The study file changed (2 epochs instead of 1) and the run folders were deleted to retrain them, as
    # capas' refusal says; the int8 folder beside the run, made from the 1-epoch weights, was left.
    # It was read back: the report compared the 2-epoch float model with the 1-epoch model's int8 figures.
    compression = {
        "name": "compression",
        "alternatives": [{"name": "int8", "compress": {"quantize": "int8"}}],
    }
    doc = tiny_study(name="compress", variations=[compression], seeds=1)
    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)  # noqa: SIM115
    out = tmp_path / "out"
    assert run_study(study_file(doc), out=out, workers=1, console=console).failed == []
    doc["base"]["train"]["epochs"] = 2
    for path in [
        *out.glob("study.sqlite*"),
        out / "runs" / "Flatten" / "seed-0",
        out / "runs" / "int8" / "seed-0",
    ]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert run_study(study_file(doc), out=out, workers=1, console=console).failed == []
    compressed = out / "runs" / "int8" / "seed-0-int8"
    lineage = json.loads((compressed / "lineage.json").read_text())
    weights = (out / "runs" / "int8" / "seed-0" / "model.safetensors").read_bytes()
    assert lineage["source_model_sha256"] == hashlib.sha256(weights).hexdigest()
    with Store(out / "study.sqlite") as store:
        result = store.runs()["int8/seed-0"].result
    assert (
        result["compress"]["test_accuracy"]
        == json.loads((compressed / "test.json").read_text())["test_accuracy"]
    )


@pytest.mark.parametrize(("setting", "value"), [("finetune_epochs", 1), ("prune", 0.504)])
def test_a_compressed_run_made_with_other_settings_is_made_again_not_read_back(
    tmp_path, tiny_study, study_file, setting, value
):
    # Only the compression changed (fine-tuning epochs; an amount that rounds to the same folder name,
    # -pruned50s), and the run folders were deleted to retrain them, as capas' refusal says: training
    # gave the same weights again, so the pruned folder beside the run matched them and was read back,
    # its figures those of the other settings.
    def prune(**change) -> dict:
        compress = {"prune": 0.5, "finetune_epochs": 0, **change}
        return {"name": "compression", "alternatives": [{"name": "pruned", "compress": compress}]}

    doc = tiny_study(name="compress", variations=[prune()], seeds=1)
    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)  # noqa: SIM115
    out = tmp_path / "out"
    assert run_study(study_file(doc), out=out, workers=1, console=console).failed == []
    doc["variations"] = [prune(**{setting: value})]
    for path in [*out.glob("study.sqlite*"), out / "runs" / "pruned" / "seed-0"]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert run_study(study_file(doc), out=out, workers=1, console=console).failed == []
    lineage = json.loads((out / "runs" / "pruned" / "seed-0-pruned50s" / "lineage.json").read_text())
    assert lineage["settings"]["finetune_epochs" if setting == "finetune_epochs" else "amount"] == value
