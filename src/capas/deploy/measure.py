"""What compression did, measured side by side: file size, parameters, latency on this CPU, test accuracy."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from capas.data import ArrayDataset, Preprocess
from capas.inference import evaluate
from capas.runs import OnnxModel

SLOWER = (
    1.05  # a compressed model this much slower than the original, or more, gets a warning (5%: timing noise)
)


@dataclass(frozen=True)
class Repeats:
    """Timed forward passes per batch size, after `warmup` untimed ones."""

    batch1: int = 200
    batch64: int = 30
    warmup: int = 5


@dataclass
class Measurement:
    name: str
    bytes: int
    parameters: int | None  # None: not countable from an ONNX Runtime graph without its spec
    nonzero: int | None
    batch1_ms: tuple[float, float]  # (median, p99)
    batch64_ms: tuple[float, float]
    accuracy: float


def vnni() -> list[str]:
    """The VNNI flags (int8 dot products in one instruction) this CPU lists in /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return sorted(f for f in flags if "vnni" in f)


def latencies(models: list, x: torch.Tensor, repeats: int, warmup: int) -> list[tuple[float, float]]:
    """Median and 99th percentile of one forward pass per model, in milliseconds.

    The models take turns, one pass each per round, so that load from other processes on a shared
    machine falls on all of them alike instead of on whichever happened to run during it.
    """
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for model, kept in zip(models, times, strict=True):
                started = time.perf_counter()
                model(x)
                if i >= warmup:
                    kept.append((time.perf_counter() - started) * 1000)
    return [(statistics.median(t), sorted(t)[min(len(t) - 1, round(0.99 * (len(t) - 1)))]) for t in times]


@dataclass
class Candidate:
    """A model to measure (a CapasNet or an OnnxModel), the file its weights live in, and its parameter count."""

    name: str
    model: object
    weights: Path
    parameters: int | None = None
    accuracy: float | None = None  # test accuracy already measured on the same test split; None: measure it
    # how a PyTorch model is evaluated: in the precision and memory format it was trained in
    precision: str = "float32"
    channels_last: bool = False


def measure(
    candidates: list[Candidate],
    test: ArrayDataset,
    preprocess: Preprocess,
    repeats: Repeats,
    tta: str = "none",
) -> list[Measurement]:
    """Size, parameters, latency at batch 1 and 64 on real test images, and test accuracy of each model
    with the run's test-time augmentation `tta` (as `capas evaluate`, `predict` and `serve` apply it)."""
    x = preprocess(test.images[torch.arange(64) % len(test)])  # (64, C, H, W), a small test split repeated
    models = [c.model if isinstance(c.model, OnnxModel) else c.model.cpu().eval() for c in candidates]
    batch1 = latencies(models, x[:1], repeats.batch1, repeats.warmup)
    batch64 = latencies(models, x, repeats.batch64, repeats.warmup)
    measurements = []
    for candidate, model, one, many in zip(candidates, models, batch1, batch64, strict=True):
        parameters, nonzero = candidate.parameters, None
        if not isinstance(model, OnnxModel):
            parameters = sum(p.numel() for p in model.parameters())
            # of the same tensors: BatchNormalization's running statistics are not weights
            nonzero = sum(int(p.count_nonzero()) for p in model.parameters())
        accuracy = candidate.accuracy
        if accuracy is None:
            # after every latency: evaluating may convert the model to channels-last
            accuracy = evaluate(
                model, test, preprocess, "cpu", candidate.channels_last, candidate.precision, tta
            ).accuracy
        measurements.append(
            Measurement(
                candidate.name, candidate.weights.stat().st_size, parameters, nonzero, one, many, accuracy
            )
        )
    return measurements


@dataclass
class Comparison:
    """The original beside the compressed model (and, for ONNX results, the float ONNX graph too)."""

    method: str
    measurements: list[Measurement]  # original first, compressed last
    settings: dict
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, ...]]:
        """(metric, value per model…, compressed/original) rows, formatted."""
        first, last = self.measurements[0], self.measurements[-1]

        def count(v: int | None) -> str:
            return "—" if v is None else f"{v:,}"

        def ratio(a: float | None, b: float | None, fmt: str = "{:.2f}×") -> str:
            return fmt.format(b / a) if a and b is not None else "—"

        rows = [
            (
                "file size (MB)",
                *(f"{m.bytes / 1e6:.3f}" for m in self.measurements),
                ratio(first.bytes, last.bytes),
            ),
            (
                "parameters",
                *(count(m.parameters) for m in self.measurements),
                ratio(first.parameters, last.parameters),
            ),
            (
                "nonzero weights",
                *(count(m.nonzero) for m in self.measurements),
                ratio(first.nonzero, last.nonzero),
            ),
        ]
        for label, key in (("batch 1", "batch1_ms"), ("batch 64", "batch64_ms")):
            for index, stat in enumerate(("median", "p99")):
                values = [getattr(m, key)[index] for m in self.measurements]
                rows.append(
                    (
                        f"{label} latency {stat} (ms)",
                        *(f"{v:.3f}" for v in values),
                        ratio(values[0], values[-1]),
                    )
                )
        rows.append(
            (
                "test accuracy",
                *(f"{m.accuracy:.4f}" for m in self.measurements),
                f"{(last.accuracy - first.accuracy) * 100:+.2f} pp",
            )
        )
        return rows

    def header(self) -> tuple[str, ...]:
        return ("", *(m.name for m in self.measurements), "compressed / original")

    def markdown(self) -> str:
        lines = [f"# capas compress: {self.method}", ""]
        lines += ["| " + " | ".join(self.header()) + " |", "|" + "---|" * len(self.header())]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows()]
        plain = {k: v for k, v in self.settings.items() if not isinstance(v, dict)}  # the rest: lineage.json
        lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in plain.items()), ""]
        lines += [f"- {note}" for note in self.notes] + [f"- **warning:** {w}" for w in self.warnings]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "settings": self.settings,
            "measurements": [asdict(m) for m in self.measurements],
            "notes": self.notes,
            "warnings": self.warnings,
            "vnni": vnni(),
        }

    def check_speed(self, int8: bool) -> None:
        """Warn when the compressed model is slower than the original (by over SLOWER) at either batch size."""
        first, last = self.measurements[0], self.measurements[-1]
        flags = vnni()
        cpu = ""
        if int8:
            cpu = (
                f"; this CPU has VNNI ({', '.join(flags)}), so a lack of int8 instructions is not the cause"
                if flags
                else "; this CPU has no VNNI instructions (no *vnni flag in /proc/cpuinfo), where int8 is often slower"
            )
        for label, key in (("batch 1", "batch1_ms"), ("batch 64", "batch64_ms")):
            if getattr(last, key)[0] > SLOWER * getattr(first, key)[0]:
                self.warnings.append(
                    f"the compressed model is slower than the original at {label} "
                    f"({getattr(last, key)[0]:.3f} ms vs {getattr(first, key)[0]:.3f} ms median){cpu}"
                )
