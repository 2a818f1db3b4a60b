"""What the CPU offers the training step: the instruction sets that make bfloat16 fast, and a heap
that keeps the step's memory."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")


@cache
def cpu_flags(path: Path = CPUINFO) -> frozenset[str]:
    """The first processor's flags from /proc/cpuinfo (empty where there is no such file)."""
    try:
        text = path.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86 says flags, ARM says Features
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@cache
def cpu_model(path: Path = CPUINFO) -> str:
    """The processor's name from /proc/cpuinfo ("AMD EPYC"), else what the platform says ("x86_64")."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        lines = []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    return name or platform.processor() or platform.machine()


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, as a container or taskset limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows
        return os.cpu_count() or 1


def cpu_features(flags: frozenset[str] | None = None) -> dict:
    """The CPU's vector extensions that matter for training, and whether bfloat16 is native.

    oneDNN runs bfloat16 matrix products on AVX512-BF16 (VDPBF16PS) or AMX tiles; without either,
    bfloat16 is emulated in float32 and usually slower than plain float32.
    """
    flags = cpu_flags() if flags is None else flags
    features = {
        "capability": torch.backends.cpu.get_cpu_capability(),  # the kernels PyTorch dispatches to
        "avx2": "avx2" in flags,
        "avx512": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags and "amx_tile" in flags,
        "arm_bf16": "bf16" in flags,  # Armv8.6 BFloat16 instructions
    }
    features["native_bfloat16"] = features["avx512_bf16"] or features["amx_bf16"] or features["arm_bf16"]
    return features


def bfloat16_warning(
    device: torch.device | str, precision: str, flags: frozenset[str] | None = None
) -> str | None:
    """A sentence for a user who asks for bfloat16 on a CPU or CUDA GPU that would emulate it, else None."""
    device = torch.device(device)
    if precision != "bfloat16" or device.type not in ("cpu", "cuda"):
        return None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return None
        return (
            f"--precision bfloat16 on {torch.cuda.get_device_name(device)}, which has no bfloat16 units (before "
            "Ampere): bfloat16 is emulated and usually slower than float32 there"
        )
    features = cpu_features(flags)
    if features["native_bfloat16"]:
        return None
    return (
        f"--precision bfloat16 on a CPU without native bfloat16 (no AVX512-BF16, AMX or Arm BF16; "
        f"PyTorch dispatches {features['capability']}): bfloat16 is emulated and usually slower than "
        "float32 here"
    )


def describe(features: dict) -> str:
    """One line for people: the fast paths this CPU has."""
    have = [name for name in ("avx512", "avx512_bf16", "amx_bf16", "arm_bf16") if features[name]]
    bf16 = "native bfloat16" if features["native_bfloat16"] else "no native bfloat16 (use float32)"
    return f"CPU: {', '.join(have) or 'no AVX-512'}; PyTorch kernels {features['capability']}; {bf16}"


# glibc's mallopt parameters (malloc/malloc.c)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
DEFAULT_MMAP_MAX = 65536
# Where glibc's adaptive thresholds end up once the process has freed a mapped block of
# DEFAULT_MMAP_THRESHOLD_MAX (32 MiB on 64 bits) or more; the trim threshold follows at twice it. Any
# mallopt turns that adaptation off for good, so these are set explicitly afterwards: glibc's initial
# 128 KiB, fixed, page-faulted every later allocation above it in anew (a NumPy loop of 8 MB arrays
# after a training: 180,000 page faults per 200 arrays instead of 0).
ADAPTED_MMAP_THRESHOLD = 4 * 2**20 * ctypes.sizeof(ctypes.c_long)
ADAPTED_TRIM_THRESHOLD = 2 * ADAPTED_MMAP_THRESHOLD
KEPT_TOP = 2**31 - 1  # bytes of free memory the heap may keep at its top: mallopt takes an int


@cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(None)


@contextlib.contextmanager
def kept_heap() -> Iterator[None]:
    """Keep freed memory in the process' heap for the body instead of handing it back to the system.

    glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mapping and
    unmaps it when freed, so a training step's activations, each up to tens of MB, are page-faulted
    in anew on every step. With mmap off and a high trim threshold, the heap grows to the step's peak
    once and stays there: `fit` trained 1.06× (fashion-mnist-wide, bfloat16) and 1.15× (seed-000,
    float32) as many images/s with it (benchmarks/cpu_memory.py, README Performance). The
    body's results are unchanged; only where memory comes from. Afterwards mappings come back, with the
    thresholds glibc's own adaptation reaches in a process that trained (ADAPTED_*, fixed: glibc adapts
    no more once mallopt was called), and the free memory is handed back (malloc_trim). Elsewhere than
    glibc on Linux, nothing changes.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, KEPT_TOP)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_MMAP_THRESHOLD, ADAPTED_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, ADAPTED_TRIM_THRESHOLD)
        libc.malloc_trim(0)
