"""Run directories: everything needed to evaluate, predict with or serve a trained model, and nothing pickled.

RUN/
  model.json          the spec, in Keras' vocabulary (the architecture)
  model.safetensors   the weights
  preprocess.json     classes and the preprocessing inference must apply
  config.json         the resolved data and training configs, splits, environment
  metrics.jsonl       one line of metrics per epoch
  summary.txt         the Keras-style summary
  test.json           final test loss, accuracy, per-class accuracy, confusion matrix
  reference.safetensors  a sample of validation images' penultimate features and input
                      statistics: the reference that drift monitoring compares live traffic to

A run made by `capas compress --quantize` holds an ONNX graph instead of model.safetensors, declared in
runtime.json ({"runtime": "onnxruntime", "model": "model.onnx"}); its model.json then describes the
float architecture the graph was quantized from.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import capas
from capas import atomic
from capas.data import ArrayDataset, Preprocess
from capas.deploy.runtime import RUNTIME, OnnxModel, read_runtime
from capas.errors import CapasError
from capas.models import CapasNet, build_model
from capas.models.weights import load_checked
from capas.spec import ModelSpec
from capas.spec.summary import summarize

REQUIRED = ("model.json", "model.safetensors", "preprocess.json")
REFERENCE = "reference.safetensors"
REFERENCE_SIZE = 1000  # validation images kept as the drift reference


def environment() -> dict:
    """The machine and library versions, recorded beside every figure."""
    return {
        "capas": capas.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def save_weights(path: Path, model: torch.nn.Module) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic.write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load safetensors weights, naming missing, unexpected and mis-shaped tensors if they do not fit."""
    try:
        with safe_open(str(path), framework="pt") as file:
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as error:
        raise CapasError(f"{path}: unreadable weights file ({error})") from None
    load_checked(model, tensors, f"{path}: the weights do not fit the architecture in model.json")


@dataclass
class Run:
    """A run directory loaded back: the model (in eval mode), its preprocessing and class names."""

    path: Path
    spec: ModelSpec
    model: CapasNet | OnnxModel
    preprocess: Preprocess
    classes: tuple[str, ...]
    precision: str = "float32"  # the training's precision (config.json), kept for prediction

    def read_json(self, name: str) -> dict | None:
        file = self.path / name
        return json.loads(file.read_text()) if file.exists() else None


def model_device(model: CapasNet | OnnxModel) -> torch.device:
    """The device a model's inputs must be on (ONNX Runtime models take CPU tensors)."""
    return model.device if isinstance(model, OnnxModel) else next(model.parameters()).device


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """Load a run directory; an incomplete or tampered directory is a CapasError that names the problem.

    A run declaring an ONNX model in runtime.json loads as an `OnnxModel`, on the CPU whatever `device`.
    """
    path = Path(path)
    if not path.is_dir():
        raise CapasError(f"{path}: not a run directory (no such folder)")
    runtime = read_runtime(path / RUNTIME)
    required = REQUIRED if runtime is None else ("model.json", "preprocess.json", runtime["model"])
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise CapasError(f"{path}: incomplete run directory, missing {', '.join(missing)}")
    try:
        spec_data = json.loads((path / "model.json").read_text())
        meta = json.loads((path / "preprocess.json").read_text())
        preprocess = Preprocess.model_validate(meta["preprocess"])
        classes = tuple(meta["classes"])
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        precision = (config.get("train") or {}).get("precision", "float32")  # imported runs have no train
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"train.precision {precision!r} is not float32 or bfloat16")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CapasError(f"{path}: damaged model.json, preprocess.json or config.json ({error})") from None
    spec = ModelSpec.from_dict(spec_data, source=str(path / "model.json"))
    if runtime is not None:
        model = OnnxModel(path / runtime["model"], expect=(spec.input_shape, len(classes)))
        return Run(path, spec, model, preprocess, classes)
    model = build_model(spec, pretrained=False)  # the run's weights replace any pretrained ones
    load_weights(path / "model.safetensors", model)
    return Run(path, spec, model.to(device).eval(), preprocess, classes, precision)


def write_run(
    path: Path,
    *,
    spec: ModelSpec,
    model: torch.nn.Module,
    preprocess: Preprocess,
    classes: tuple[str, ...],
    config: dict,
    history: list[dict],
    test: dict | None,
) -> None:
    """Write every file of a run directory, each atomically; the weights go last but one, test.json last."""
    path.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path / "model.json", spec.to_dict())
    atomic.write_json(
        path / "preprocess.json", {"classes": list(classes), "preprocess": preprocess.model_dump(mode="json")}
    )
    atomic.write_json(path / "config.json", {**config, "environment": environment()})
    atomic.write_text(path / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history))
    atomic.write_text(path / "summary.txt", summarize(spec).text())
    save_weights(path / "model.safetensors", model)
    if test is not None:
        atomic.write_json(path / "test.json", test)


def input_statistics(x: torch.Tensor) -> torch.Tensor:
    """Per-image statistics of preprocessed inputs (B, C, H, W) -> (B, 2): mean and standard deviation."""
    flat = x.flatten(1)
    return torch.stack([flat.mean(1), flat.std(1)], dim=1)


@torch.no_grad()
def save_reference(
    path: Path,
    model: CapasNet | OnnxModel,
    data: ArrayDataset,
    preprocess: Preprocess,
    precision: str = "float32",
) -> None:
    """Keep what drift monitoring needs: features and input statistics of a stratified-enough sample,
    computed in batches and in the precision the server will run the model in."""
    from capas.train.loop import autocast, eval_batch_size  # capas.train imports this module

    model.eval()
    device = model_device(model)
    generator = torch.Generator().manual_seed(0)
    index = torch.randperm(len(data), generator=generator)[:REFERENCE_SIZE]
    embeddings, stats = [], []
    for part in index.split(eval_batch_size(preprocess, device)):
        x = preprocess(data.images[part]).to(device)
        with autocast(device, precision):
            embeddings.append(model.embed(x).float().cpu())  # (B, F)
        stats.append(input_statistics(x).cpu())  # (B, 2)
    tensors = {
        "embeddings": torch.cat(embeddings).contiguous(),
        "input_stats": torch.cat(stats).contiguous(),
        "labels": data.labels[index].contiguous(),
    }
    atomic.write_with(path, lambda tmp: save_file(tensors, str(tmp)))
