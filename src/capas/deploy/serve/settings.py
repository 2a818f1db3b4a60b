"""The server's settings: one pydantic-settings object, made by a function (never at import time)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from capas.deploy.serve.options import ServeOptions
from capas.errors import CapasError


class ServeSettings(BaseSettings, ServeOptions):
    """Everything `capas serve` can be told; each field also reads the environment variable CAPAS_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="CAPAS_", extra="forbid", frozen=True)

    run_dir: Path


BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _allowed(field: str) -> str:
    """' (allowed: low to high)' for a field with both bounds inclusive (pydantic's message names one)."""
    bounds = ServeSettings.model_fields[field].metadata
    low = next((b.ge for b in bounds if hasattr(b, "ge")), None)
    high = next((b.le for b in bounds if hasattr(b, "le")), None)
    return f" (allowed: {low:g} to {high:g})" if low is not None and high is not None else ""


def make_settings(flags: Mapping[str, str] | None = None, **values: object) -> ServeSettings:
    """Settings from keyword values over CAPAS_* environment variables over defaults; CapasError if invalid.

    An error names where the bad value came from: its keyword (or, for the CLI, its option: `flags`
    maps field names to option names), else its environment variable.
    """
    try:
        settings = ServeSettings(**values)
    except ValidationError as error:

        def source(field: str) -> str:
            if field in values:
                return (flags or {}).get(field, field)
            return f"CAPAS_{field.upper()}"

        problems = "; ".join(
            f"{source(str(e['loc'][0])) if e['loc'] else 'settings'}: {e['msg'].removeprefix('Value error, ')}"
            + (_allowed(str(e["loc"][0])) if e["type"] in BOUND_ERRORS else "")
            for e in error.errors()
        )
        raise CapasError(f"serve settings: {problems}") from None
    if settings.drift_min > settings.drift_window:
        raise CapasError(
            f"drift_min ({settings.drift_min}) cannot exceed drift_window ({settings.drift_window}); lower "
            "CAPAS_DRIFT_MIN or raise CAPAS_DRIFT_WINDOW"
        )
    if 1 / (1 + settings.drift_permutations) >= settings.drift_alpha:  # drift_alpha < 1: the bound is finite
        least = math.floor(1 / settings.drift_alpha)  # 1/(1 + P) < alpha from P = floor(1/alpha) on
        raise CapasError(
            f"drift_permutations ({settings.drift_permutations}) can never flag drift at drift_alpha "
            f"{settings.drift_alpha:g}: a permutation test's p-value is at least 1/(1 + permutations) = "
            f"{1 / (1 + settings.drift_permutations):.3g}; raise CAPAS_DRIFT_PERMUTATIONS to at least {least} "
            f"or CAPAS_DRIFT_ALPHA above {1 / (1 + settings.drift_permutations):.3g}"
        )
    if settings.max_images > settings.max_queue:  # such a request could never be queued: 503 forever
        raise CapasError(
            f"max_images ({settings.max_images}) cannot exceed max_queue ({settings.max_queue}): a request "
            "of more images than the queue holds could never be answered; lower CAPAS_MAX_IMAGES or raise "
            "CAPAS_MAX_QUEUE"
        )
    return settings
