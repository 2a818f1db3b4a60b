"""Defaults of `capas compress`, defined once: the library's functions and the CLI's help read them here
(torch-free, so that the CLI starts fast)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CompressSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    finetune_epochs: int = Field(default=2, ge=0, description="fine-tuning epochs after pruning")
    calibration_images: int = Field(
        default=512, ge=1, description="training images whose activation ranges set the int8 scales"
    )


COMPRESS = CompressSettings()
"""The defaults."""
