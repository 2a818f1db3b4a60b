"""The settings that decide whether a rerun gives the same weights: deterministic algorithms, CPU threads.

Both are training settings (train.deterministic, train.threads), recorded in every run's config.json.
Training also seeds torch's global random number generators (build_model, each epoch of `fit`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from capas.spec import TrainConfig

CUBLAS_WORKSPACE = ":4096:8"
"""cuBLAS' deterministic workspace setting: 8 buffers of 4096 KiB (NVIDIA's documented choice)."""


@contextlib.contextmanager
def reproducible(cfg: TrainConfig) -> Iterator[None]:
    """Apply `cfg.threads` and `cfg.deterministic` for the body; the previous settings come back after,
    and so do the states of torch's random number generators (CPU, and CUDA once initialised), which
    training seeds: a caller's next draws do not depend on whether it trained (a random search's
    draws after each training were the same, whatever the caller had seeded).

    Deterministic: cuDNN's deterministic kernels without autotuning, and torch's deterministic
    implementations of the other operations. An operation that has none warns rather than fails
    (warn_only), so that a layer without one still trains. On CUDA, cuBLAS is deterministic only with
    CUBLAS_WORKSPACE_CONFIG set before the process first calls it (PyTorch reads it once, when it
    sizes the workspace): this is entered before the model moves to the device, so a training process
    sets it in time. A value the user set is kept; an already initialised cuBLAS makes PyTorch warn.

    PyTorch's deterministic mode also fills every new tensor's memory before an operation writes it
    (torch.utils.deterministic.fill_uninitialized_memory), so that an operation that reads memory it
    never wrote would still give the same result. capas turns that off while training: operations
    write their outputs whole, the filling is one more pass over every activation (without it `fit`
    trained 1.08× as many images/s on a CPU, benchmarks/cpu_memory.py), and
    tests/test_reproducible.py checks that two trainings still give identical weights.
    """
    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)  # per process: every thread of this process sees it
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = cfg.deterministic
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        with torch.random.fork_rng(
            devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
        ):
            yield
    finally:
        threads, enabled, warn_only, cudnn_deterministic, benchmark, fill = saved
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.backends.cudnn.deterministic = cudnn_deterministic
        torch.backends.cudnn.benchmark = benchmark
        torch.utils.deterministic.fill_uninitialized_memory = fill
