"""Post-training compression of a run directory into a new run directory, measured beside the original:
quantization (capas.deploy.quantize) or pruning (capas.deploy.prune), chosen here, with the
lineage and the side-by-side measurement every method shares.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import capas
from capas import atomic
from capas.deploy.export import export_onnx
from capas.deploy.measure import Candidate, Comparison, Repeats, measure
from capas.deploy.prune import check_prunable, prune_run
from capas.deploy.quantize import QUANTIZE, check_quantizable, quantize_run
from capas.deploy.settings import COMPRESS
from capas.errors import CapasError
from capas.predict import run_data, run_splits
from capas.runs import (
    OnnxModel,
    check_not_in_another_run,
    check_not_in_images,
    environment,
    load_run,
    reading,
    recover,
    staging,
)
from capas.spec import DataConfig


def compress_run(
    run_dir: str | Path,
    *,
    quantize: str | None = None,
    prune: float | None = None,
    structured: bool = True,
    finetune_epochs: int = COMPRESS.finetune_epochs,
    out: str | Path | None = None,
    calibration_images: int = COMPRESS.calibration_images,
    repeats: Repeats | None = None,
    data: DataConfig | None = None,
    data_dir: str | None = None,
) -> tuple[Path, Comparison]:
    """Compress a run directory into a new one (default: beside it) and measure both; the source is only read.

    Calibration, fine-tuning and the measurements use the run's recorded dataset (its files looked for
    in `data_dir` if given), or `data`."""
    repeats = repeats or Repeats()
    check_method(quantize, prune, finetune_epochs)
    # the source's lock, shared: a training into it meanwhile would mix the two runs (seen: lineage.json
    # naming the new weights, the model compressed from the old ones)
    with reading(run_dir):
        source = load_run(run_dir)
        source.float_model("compress")
        if quantize:
            method = f"quantize-{quantize}"
            check_quantizable(source.spec, quantize)
        else:
            method = f"prune-{'structured' if structured else 'unstructured'}"
            check_prunable(source.spec, structured)
        where = "choose another --out" if out is not None else "pass --out to write elsewhere"
        out = Path(out) if out is not None else default_out(source.path, quantize, prune, structured)
        recover(out)
        if out.exists():
            raise CapasError(f"{out}: already exists; {where} or remove it")
        data = run_data(source, data, data_dir)
        check_not_in_images(out, data.name)
        check_not_in_another_run(out)  # inside a run, its own source's too
        splits = run_splits(source, data)
        # the new run's config: the source's, with the dataset and splits it was calibrated or fine-tuned and tested on
        config = {
            **(source.read_json("config.json") or {}),
            "data": data.model_dump(mode="json"),
            "splits": splits.info,
        }
        lineage = {
            "source": str(source.path.resolve()),
            "source_model_sha256": _weights_sha256(source.path),
            "method": method,
            "capas": capas.__version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        parameters = sum(p.numel() for p in source.model.parameters())
        candidates = [
            Candidate(
                "original (PyTorch)",
                source.model,
                source.path / "model.safetensors",
                precision=source.precision,
                channels_last=source.channels_last,
            )
        ]
        with staging(out, replace=False) as tmp, tempfile.TemporaryDirectory() as scratch:
            if quantize:
                # The float graph in the same runtime separates what int8 does from what ONNX Runtime does.
                float_path = export_onnx(source.model, Path(scratch) / "float.onnx")
                candidates.append(
                    Candidate("float32 (ONNX Runtime)", OnnxModel(float_path), float_path, parameters)
                )
                settings, notes = quantize_run(
                    source, splits, config, float_path, tmp, quantize, calibration_images
                )
                name, weights = f"{quantize} (ONNX Runtime)", tmp / "model.onnx"
            else:
                settings, notes = prune_run(source, splits, config, tmp, prune, structured, finetune_epochs)
                name, weights = "pruned (PyTorch)", tmp / "model.safetensors"
            compressed = load_run(tmp)
            # its test accuracy was measured once, on the same test split, when its run directory was written
            accuracy = compressed.read_json("test.json")["test_accuracy"]
            candidates.append(Candidate(name, compressed.model, weights, parameters, accuracy))
            comparison = Comparison(
                method,
                measure(candidates, splits.test, source.preprocess, repeats, source.tta),
                settings,
                notes,
            )
            comparison.check_speed(int8=quantize is not None)
            atomic.write_json(tmp / "lineage.json", {**lineage, "settings": settings})
            atomic.write_json(tmp / "compress.json", {**comparison.to_dict(), "environment": environment()})
            atomic.write_text(tmp / "compress.md", comparison.markdown())
        return out, comparison


def check_method(
    quantize: str | None,
    prune: float | None,
    finetune_epochs: int = COMPRESS.finetune_epochs,
    field: Callable[[str], str] = lambda name: f"--{name.replace('_', '-')}",
) -> None:
    """Refuse a bad choice of method before any work is done (studies call this when they load, with
    `field` naming their keys instead of the command's options)."""
    if (quantize is None) == (prune is None):
        raise CapasError(f"choose one method: {field('quantize')} int8|dynamic or {field('prune')} AMOUNT")
    if quantize is not None and quantize not in QUANTIZE:
        raise CapasError(f"{field('quantize')} {quantize!r}: allowed {', '.join(QUANTIZE)}")
    if prune is not None and (
        isinstance(prune, bool) or not isinstance(prune, int | float) or not 0.0 < prune < 1.0
    ):
        raise CapasError(
            f"{field('prune')} {prune}: the fraction of weights or channels to remove must lie strictly "
            "between 0 and 1"
        )
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise CapasError(f"{field('finetune_epochs')} {finetune_epochs}: must be a whole number, 0 or more")


def default_out(run_dir: Path, quantize: str | None, prune: float | None, structured: bool) -> Path:
    """Where a compressed run goes unless told: beside its source, named by the method."""
    suffix = quantize or f"pruned{round(prune * 100)}{'s' if structured else 'u'}"
    if run_dir.name in ("", ".."):  # '.', '..', 'runs/..': the folder they stand for, links kept
        run_dir = Path(os.path.abspath(run_dir))
    return run_dir.with_name(f"{run_dir.name}-{suffix}")


def _weights_sha256(run_dir: Path) -> str:
    """The digest of a run's weights, which a compressed run's lineage.json records as its source's."""
    return hashlib.sha256((run_dir / "model.safetensors").read_bytes()).hexdigest()


def compress_for_study(run_dir: Path, args: dict) -> dict:
    """Compress a study's freshly trained run (beside it) and return the figures its report compares.

    A compressed run of these weights already complete beside it (the study was interrupted after
    compressing) is read back rather than made again; one made from other weights (the run was
    trained again since, with other settings), or with another amount or fine-tuning (the folder's
    name records the rest, the amount in whole percents), is replaced.
    """
    out = default_out(run_dir, args.get("quantize"), args.get("prune"), args.get("structured", True))
    recorded = None
    if (out / "compress.json").is_file():
        lineage = json.loads((out / "lineage.json").read_text())
        settings = lineage["settings"]  # pruning's amount and fine-tuning; quantizing records neither
        if (
            lineage["source_model_sha256"] == _weights_sha256(run_dir)
            and settings.get("finetune_epochs")
            in (None, args.get("finetune_epochs", COMPRESS.finetune_epochs))
            and settings.get("amount") in (None, args.get("prune"))  # 0.5 and 0.504 share -pruned50u
        ):
            recorded = json.loads((out / "compress.json").read_text())
        else:
            shutil.rmtree(out)
    if recorded is None:
        out, comparison = compress_run(run_dir, **args, out=out, repeats=Repeats(batch1=50, batch64=10))
        recorded = comparison.to_dict()
    original, compressed = recorded["measurements"][0], recorded["measurements"][-1]
    return {
        "run": str(out),
        "method": recorded["method"],
        "test_accuracy": compressed["accuracy"],
        "accuracy_change": compressed["accuracy"] - original["accuracy"],
        "bytes": compressed["bytes"],
        "size_ratio": original["bytes"] / compressed["bytes"],
        "batch1_ms": compressed["batch1_ms"][0],
        "speedup_batch1": original["batch1_ms"][0] / compressed["batch1_ms"][0],
        "speedup_batch64": original["batch64_ms"][0] / compressed["batch64_ms"][0],
    }
