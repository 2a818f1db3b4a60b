"""The frozen-layers study of seed 003 through `capas study`: a backbone spec, variants over `backbone.frozen`."""

from __future__ import annotations

from pathlib import Path

import yaml
from rich.console import Console

from capas.study.report import architecture_diff
from capas.study.run import run_study

EXAMPLE = Path(__file__).parent.parent / "examples" / "studies" / "frozen-layers.yaml"


def test_frozen_layers_study_runs_and_reports_what_was_unfrozen(tmp_path):
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["base"]["spec"]["input_shape"] = [32, 32, 3]  # the smallest input EfficientNet-Lite0 takes: fast
    doc["base"]["train"]["epochs"] = 1
    doc["base"]["data"]["limit"] = 200
    doc["base"]["data"]["test_limit"] = 40
    doc["seeds"] = 1
    doc["variations"][0]["alternatives"] = doc["variations"][0]["alternatives"][:2]  # top, block 7
    path = tmp_path / "frozen.yaml"
    path.write_text(yaml.safe_dump(doc))
    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)  # noqa: SIM115
    outcome = run_study(path, out=tmp_path / "out", workers=1, console=console)
    assert outcome.failed == [] and outcome.trained == 3
    base, top, block7 = outcome.report.variants
    assert base.summary.trainable == 12_810  # only the new Dense(10) on 1,280 pooled features
    assert top.summary.trainable > base.summary.trainable == base.summary.total - base.summary.non_trainable
    assert [(row.change, row.after.name) for row in architecture_diff(base, block7)] == [
        ("unfrozen", "block7a"),
        ("unfrozen", "top"),
    ]
    markdown = outcome.markdown.read_text()
    assert (
        "top-unfrozen instead of all-frozen: the same number of parameters (3,425,834); 424,970 trainable"
        in markdown
    )
    assert "spec.backbone.frozen: 'all' → 16" in markdown
