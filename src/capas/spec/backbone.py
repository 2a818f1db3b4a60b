"""`backbone:` in a model spec: which pretrained network the spec's layers continue from."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

from capas.layers.base import Count

RUN = "run"  # the backbone name that takes an earlier capas run's layers


class BackboneConfig(BaseModel):
    """`backbone: {name, weights, frozen, bn_frozen}`.

    weights: `imagenet`, `none` (random initialisation), a weights file (.pth or .safetensors), or,
    with `name: run`, an earlier capas run directory whose layers before its classifier become the backbone.
    frozen: `all`, `none`, or N, the first N backbone layers in the summary's order.
    bn_frozen: frozen layers run in inference mode during training too (their BatchNorm layers use
    and keep their running statistics, as Keras does since 2.1.3); false lets BatchNorm statistics
    of frozen layers follow the new data.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    weights: str = "imagenet"
    frozen: Literal["all", "none"] | Count = "all"
    bn_frozen: bool = True

    @model_validator(mode="before")
    @classmethod
    def _run_by_its_whole_path(cls, data: object) -> object:
        # a run's model.json keeps the path: a relative one (weights: src) left the run built on it
        # loadable from the folder it was trained in only
        if isinstance(data, dict) and data.get("name") == RUN and isinstance(data.get("weights"), str):
            return {**data, "weights": os.path.abspath(data["weights"])}
        return data

    @field_validator("frozen")
    @classmethod
    def _count(cls, value: str | int) -> str | int:
        if isinstance(value, int) and value < 0:
            raise ValueError("must be 'all', 'none' or a number of layers, 0 or more")
        return value

    @model_validator(mode="after")
    def _weights(self, info: ValidationInfo) -> BackboneConfig:
        if (info.context or {}).get("saved") and self.name != RUN:
            return self  # a run directory's model.json: its own weights replace the file it started from
        # os.path's, not Path's: they answer False for a name too long to be a file's, where Path's raise
        if self.name == RUN:
            if not os.path.isdir(self.weights):
                raise ValueError(
                    f"with name: run, weights must be a capas run directory; {self.weights!r} is not a folder"
                )
        elif self.weights not in ("imagenet", "none"):
            if os.path.isdir(self.weights):
                raise ValueError(f"{self.weights!r} is a folder: to start from a capas run write name: run")
            if not os.path.isfile(self.weights):
                raise ValueError(
                    f"weights must be imagenet, none or a weights file; no such file {self.weights!r}"
                )
        return self
