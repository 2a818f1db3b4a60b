"""The server's options, their defaults and descriptions: the one definition ServeSettings and the CLI read."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

MAX_THREADS = 1024
# seconds between drift tests and per chart window: 1e-7 between tests kept a core busy on an idle server
# (the drift loop woke without pause), a window of 1e308 s dated every chart point 1970
MIN_PERIOD_S, MAX_PERIOD_S = 0.1, 86_400


def default_threads() -> int:
    """cores - 1: PyTorch threads for the forward pass, every core but one, which stays free for the event loop."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


class ServeOptions(BaseModel):
    """Everything `capas serve` can be told but the run directory, with the defaults and descriptions
    the CLI's help shows (pydantic only: the CLI reads them without loading the server)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # 'inf' MB is no limit

    host: str = Field(default="127.0.0.1", description="address to bind (127.0.0.1: this machine only)")
    port: int = Field(default=8000, ge=0, le=65535, description="port")
    token: SecretStr | None = Field(
        default=None, description="bearer token required on every route but /health"
    )
    max_batch: int = Field(default=32, ge=1, le=1024, description="images per forward pass at most")
    max_wait_ms: float = Field(
        default=2.0, ge=0.0, le=1000.0, description="how long a batch waits to fill up, in ms"
    )
    # at most 1 GB: a body is held in memory whole while it is parsed (multipart, or JSON and base64)
    max_body_mb: float = Field(
        default=10.0, gt=0.0, le=1000.0, description="largest request body accepted, in MB (larger: 413)"
    )
    max_images: int = Field(default=64, ge=1, description="images per /predict request at most")
    max_pixels: int = Field(
        default=16_000_000, ge=1, description="pixels per image at most (decompression bombs)"
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        default="auto", description="where the model runs: auto picks cuda, then mps, then cpu"
    )
    max_request_pixels: int = Field(
        default=48_000_000,
        ge=1,
        description="pixels per /predict request at most, summed over its images (checked before decoding)",
    )
    max_queue: int = Field(
        default=512, ge=1, description="images waiting for the model at most; beyond it /predict answers 503"
    )
    max_connections: int = Field(
        default=128, ge=1, description="open connections and requests at most; beyond it uvicorn answers 503"
    )
    read_timeout_s: float = Field(
        default=30.0, gt=0.0, description="a request body must arrive within this (else 408)"
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0.0,
        description="a request's headers must arrive within this (else 408); a new connection that sends "
        "nothing closes after it",
    )
    max_header_kb: int = Field(
        default=64, ge=1, le=1024, description="a request's line and headers at most, in KiB (else 431)"
    )
    send_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        description="a client that takes none of its answer's bytes for this long is cut off",
    )
    keep_alive_s: float = Field(
        default=5.0, gt=0.0, description="idle keep-alive connections close after this"
    )
    # thread counts: at most MAX_THREADS, more than the cores of any machine capas serves on (1e20 was
    # PyTorch's overflow traceback at start-up)
    decode_threads: int = Field(
        default=2, ge=1, le=MAX_THREADS, description="threads decoding and preprocessing images"
    )
    threads: int = Field(
        default_factory=default_threads, ge=1, le=MAX_THREADS, description="PyTorch threads for inference"
    )
    top_k: int = Field(
        default=5, ge=1, description="classes listed per prediction unless ?top_k= says otherwise"
    )
    max_predictions: int = Field(
        default=50_000, ge=1, description="predictions kept awaiting feedback (oldest go)"
    )
    # each drift test's permutations are one (permutations + 1, N) @ (N, N) product over the N = window +
    # reference (<= 1,000) inputs: 10,000 of each take seconds on a CPU, and run every drift_every_s
    drift_window: int = Field(
        default=200, ge=2, le=10_000, description="recent inputs the drift test looks at"
    )
    drift_min: int = Field(default=50, ge=2, description="recent inputs needed before the first drift test")
    drift_per_batch: int = Field(
        default=8, ge=1, description="images per forward batch whose embeddings feed drift"
    )
    drift_alpha: float = Field(
        default=0.01, gt=0.0, lt=1.0, description="p-value below which drift is flagged"
    )
    drift_permutations: int = Field(default=500, ge=1, le=10_000)
    drift_every_s: float = Field(
        default=5.0, ge=MIN_PERIOD_S, le=MAX_PERIOD_S, description="seconds between background drift tests"
    )
    bucket_s: float = Field(
        default=10.0,
        ge=MIN_PERIOD_S,
        le=MAX_PERIOD_S,
        description="width of one time window of the monitor's charts, in s",
    )
    history: int = Field(  # at most 100,000: every window goes to the monitor page at each refresh
        default=360, ge=1, le=100_000, description="time windows kept for the charts (360 × 10 s: an hour)"
    )

    @field_validator("token")
    @classmethod
    def _token_is_a_secret(cls, token: SecretStr | None) -> SecretStr | None:
        # an empty token would let anyone in: its cookie is an HMAC under the empty key, and a token
        # turns the Host check off; `CAPAS_TOKEN=` (set but empty) is the usual way to get one
        if token is not None and not token.get_secret_value():
            raise ValueError("an empty token would let anyone in; give a token, or unset CAPAS_TOKEN")
        return token

    @field_validator("host")
    @classmethod
    def _host_is_named(cls, host: str) -> str:
        # '' binds every interface (asyncio's create_server), as 0.0.0.0 does, but looks like no address
        if not host.strip():
            raise ValueError(
                "an empty address would bind every interface; give one, e.g. 0.0.0.0 for every interface"
            )
        return host
