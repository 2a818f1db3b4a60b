"""What users write: model specs in Keras' vocabulary and typed training configs."""

from pathlib import Path

from capas.spec.backbone import BackboneConfig
from capas.spec.io import load_document
from capas.spec.model import LayerInfo, ModelSpec, parse_layer
from capas.spec.train import (
    Augment,
    DataConfig,
    EarlyStopping,
    EmaConfig,
    FinetuneConfig,
    OptimizerConfig,
    ProgressiveResizing,
    ScheduleConfig,
    TrainConfig,
)


def load_spec(path: str | Path, saved: bool = False) -> ModelSpec:
    """Load and validate a model spec from a YAML or JSON file (`saved`: a run directory's model.json)."""
    return ModelSpec.from_dict(load_document(path), source=str(path), saved=saved)


__all__ = [
    "Augment",
    "BackboneConfig",
    "DataConfig",
    "EarlyStopping",
    "EmaConfig",
    "FinetuneConfig",
    "LayerInfo",
    "ModelSpec",
    "OptimizerConfig",
    "ProgressiveResizing",
    "ScheduleConfig",
    "TrainConfig",
    "load_document",
    "load_spec",
    "parse_layer",
]
