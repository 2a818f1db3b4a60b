"""capas.cpu.kept_heap: a training step's large tensors come from a heap that keeps freed memory."""

from __future__ import annotations

import ctypes
import platform
import resource

import pytest
import torch

from capas.cpu import kept_heap
from capas.data import make_splits
from capas.models import build_model, preprocess_for
from capas.spec import ModelSpec, TrainConfig
from capas.train import Callback, fit

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

BIG = 64 * 2**20 // 4  # float32 elements in 64 MiB: above glibc's largest mmap threshold (32 MiB)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mapped_while_a_big_tensor_lives() -> bool:
    """Whether a big tensor got its own mapping: glibc's mapped bytes grew by at least its size
    (other threads' small mappings meanwhile do not make it so).

    The tensor is 64 MiB more than all the free memory in the heap, so that no free chunk can hold
    it: glibc serves a request from a free chunk before it considers mmap, and a kept heap leaves
    such chunks behind (this function's own earlier tensors among them) wherever later allocations
    keep them from the top that malloc_trim hands back."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    elements = max(BIG, (info.fordblks + 64 * 2**20) // 4)
    big = torch.empty(elements)
    during = libc.mallinfo2().hblkhd
    del big
    return during - info.hblkhd >= elements * 4


def test_big_tensors_come_from_the_heap_inside_and_from_mappings_outside():
    assert _mapped_while_a_big_tensor_lives()  # glibc's default: mmap, unmapped when freed
    with kept_heap():
        assert not _mapped_while_a_big_tensor_lives()
    assert _mapped_while_a_big_tensor_lives()  # the defaults are back


def test_after_the_kept_heap_freed_memory_is_reused_as_glibc_adapts_to():
    """The defaults set back were glibc's initial, fixed ones: in the process that trained, every later
    8 MiB tensor was page-faulted in anew (its memory trimmed at each free); glibc's own adaptation, which
    any mallopt turns off, reuses it after the first."""
    with kept_heap():
        pass
    faults = []
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(2 * 2**20)  # 8 MiB, written: its 2048 pages are faulted in unless the heap kept them
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    # glibc settles within the first ~10 (a fresh process too); then they were 2049 each, every time
    assert sum(faults[10:]) < 2048, faults


class _Mapped(Callback):
    def __init__(self):
        self.seen = []

    def on_batch_end(self, images, loss, correct):
        self.seen.append(_mapped_while_a_big_tensor_lives())


def test_fit_keeps_the_heap_while_it_trains_on_the_cpu():
    splits = make_splits("fashion-mnist", limit=200)
    spec = ModelSpec.from_dict(
        {
            "name": "tiny",
            "input_shape": [28, 28, 1],
            "layers": ["Flatten", {"Dense": {"units": 10, "activation": "softmax"}}],
        }
    )
    watch = _Mapped()
    fit(
        build_model(spec),
        splits.train,
        splits.val,
        preprocess_for(spec),
        TrainConfig(epochs=1),
        callbacks=[watch],
    )
    assert watch.seen and not any(watch.seen)
    assert _mapped_while_a_big_tensor_lives()
