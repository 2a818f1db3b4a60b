"""Live monitoring of a served model: accuracy from feedback, volumes, class shares, latency, drift.

Everything is bounded in memory: predictions awaiting feedback are an LRU of at most
`max_predictions` ids, the charts keep `history` time windows of `bucket_s` seconds, each window
keeps at most `LATENCY_SAMPLES` latencies (a uniform reservoir sample), and drift looks at the last
`drift_window` inputs. The same figures are exported to Prometheus.
"""

from __future__ import annotations

import functools
import json
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from capas.deploy.drift import DriftDetector, DriftResult

# JSON as Starlette's JSONResponse writes it
_json = functools.partial(json.dumps, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
LATENCY_SAMPLES = 2000  # latencies kept per time window for its percentiles
ACCURACY_WINDOW = 500  # the rolling accuracy is over the last this many feedbacks
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)  # seconds
Z95 = 1.959963984540054  # the standard normal's 97.5th percentile: two-sided 95% intervals
NO_REFERENCE = (
    "the run has no drift reference (reference.safetensors); import with --data, or train with capas "
    "and a validation split of 2 images or more, to get one"
)


def wilson_interval(correct: int, n: int) -> list[float] | None:
    """The 95% Wilson score interval of an accuracy of `correct` out of `n` (None before any feedback).

    A live accuracy from a few feedbacks says little: 2 right out of 2 is 100%, but its interval is
    34%..100%. Wilson's interval, unlike the plain ±z·SE one, stays inside 0..1 and is not 0 wide at
    0% or 100%."""
    if n == 0:
        return None
    p, z2 = correct / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 / (1 + z2 / n) * (p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5
    return [max(0.0, centre - half), min(1.0, centre + half)]


class Metrics:
    """The Prometheus metrics of one server, in its own registry (two apps in a process never collide).

    Without drift monitoring the drift gauges are not registered at all (absent, as Prometheus does
    for a feature that is off, so no alert on them can fire), and `capas_drift_enabled` is 0.
    """

    def __init__(self, classes: tuple[str, ...], *, drift: bool = True):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "capas_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "capas_request_latency_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.predictions = Counter(
            "capas_predictions", "predictions by predicted class", ["label"], registry=r
        )
        self.batch_size = Histogram(
            "capas_batch_size",
            "images per forward pass",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.feedback = Counter(
            "capas_feedback",
            "feedback received, by whether the prediction was right",
            ["correct"],
            registry=r,
        )
        self.accuracy = Gauge(
            "capas_live_accuracy", "accuracy over all feedback so far (NaN before any)", registry=r
        )
        self.rolling_accuracy = Gauge(
            "capas_live_accuracy_rolling",
            f"accuracy over the last {ACCURACY_WINDOW} feedbacks (NaN before any)",
            registry=r,
        )
        Gauge(
            "capas_drift_enabled",
            "1 when drift is monitored, 0 when the run has no drift reference",
            registry=r,
        ).set(int(drift))
        for gauge in (self.accuracy, self.rolling_accuracy):
            gauge.set(float("nan"))
        if drift:
            self.drift_statistic = Gauge(
                "capas_drift_statistic", "MMD² of recent embeddings vs the reference", registry=r
            )
            self.drift_p_value = Gauge(
                "capas_drift_p_value", "permutation p-value of the drift test", registry=r
            )
            self.drift = Gauge(
                "capas_drift_detected", "1 when the last drift test flagged drift, else 0", registry=r
            )
            self.drift_statistic.set(float("nan"))
            self.drift_p_value.set(float("nan"))
        for label in classes:  # every class appears in /metrics from the start, at 0
            self.predictions.labels(label)


@dataclass
class _Window:
    """What happened during one time window of the charts."""

    start: float
    classes: int
    predictions: int = 0
    class_counts: list[int] = field(default_factory=list)
    latency_seen: int = 0
    latencies: list[float] = field(default_factory=list)
    feedback: int = 0
    correct: int = 0
    drift_statistic: float | None = None
    drift_p_value: float | None = None

    def __post_init__(self) -> None:
        self.class_counts = [0] * self.classes

    @functools.cached_property
    def ended(self) -> str:
        """to_dict() of a window that has ended, so no longer changes, as JSON: worked out and encoded
        once, not at every poll of the monitor page (the percentiles of an hour's 360 windows took
        0.1-0.3 s on the event loop, every client waiting; encoding their class counts, 0.1 s more for
        1,000 classes)."""
        return _json(self.to_dict())

    def to_dict(self) -> dict:
        if self.latencies:
            p50, p90, p99 = (float(v) * 1000 for v in np.percentile(self.latencies, [50, 90, 99]))
        else:
            p50 = p90 = p99 = None
        return {
            "t": self.start,
            "predictions": self.predictions,
            "class_counts": self.class_counts,
            "latency_ms": {"p50": p50, "p90": p90, "p99": p99, "requests": self.latency_seen},
            "feedback": self.feedback,
            "accuracy": self.correct / self.feedback if self.feedback else None,
            "drift_statistic": self.drift_statistic,
            "drift_p_value": self.drift_p_value,
        }


class UnknownPrediction(KeyError):
    """Feedback for a prediction id the server does not hold (never made, or already evicted)."""


class Monitor:
    """The live state behind /feedback, /monitor, /drift and the Prometheus gauges.

    Recording happens on the event loop; the drift test runs on a worker thread, so the window of
    recent embeddings and the time windows are guarded by one lock. With no `detector` (the run has
    no drift reference) drift is off: nothing is tested and /drift says why.
    """

    def __init__(
        self,
        classes: tuple[str, ...],
        detector: DriftDetector | None,
        metrics: Metrics,
        *,
        max_predictions: int,
        drift_window: int,
        drift_min: int,
        bucket_s: float,
        history: int,
        clock: Callable[[], float] = time.time,
    ):
        self.classes = classes
        self.detector = detector
        self.metrics = metrics
        self.max_predictions = max_predictions
        self.drift_min = drift_min
        self.bucket_s = bucket_s
        self.clock = clock
        self._lock = threading.Lock()
        self._drift_lock = threading.Lock()  # one drift test at a time
        self._pending: OrderedDict[str, int] = OrderedDict()  # prediction id -> predicted class index
        self._windows: deque[_Window] = deque(maxlen=history)
        self._embeddings: deque[torch.Tensor] = deque(maxlen=drift_window)  # (F,) each
        self._input_stats: deque[torch.Tensor] = deque(maxlen=drift_window)  # (2,) each
        self._seen = 0  # inputs added to the drift window, ever
        self._tested_at = -1  # value of _seen at the last drift test
        self._recent_feedback: deque[bool] = deque(maxlen=ACCURACY_WINDOW)
        self.predictions = 0
        self.feedback_total = 0
        self.feedback_correct = 0
        self.class_totals = [0] * len(classes)
        self.last_drift: DriftResult | None = None
        self._random = random.Random(0)

    def _window(self) -> _Window:
        """The current time window, after empty ones for every window that passed without activity:
        the charts draw one point per window, so a quiet spell must show as zeros, not vanish. A clock
        set back counts in the latest window until it catches up: the charts' time never runs back."""
        now = self.clock()
        start = now - now % self.bucket_s
        if self._windows and self._windows[-1].start >= start:  # >: the wall clock was set back
            return self._windows[-1]
        if self._windows:  # the quiet windows in between, as many as the history keeps
            skipped = round((start - self._windows[-1].start) / self.bucket_s) - 1
            quiet = range(min(skipped, self._windows.maxlen - 1), 0, -1)
            self._windows.extend(_Window(start - k * self.bucket_s, len(self.classes)) for k in quiet)
        self._windows.append(_Window(start, len(self.classes)))
        return self._windows[-1]

    def record_predictions(
        self, ids: list[str], indices: list[int], embeddings: torch.Tensor, input_stats: torch.Tensor
    ) -> None:
        """Remember predictions for feedback, count them, and add sampled inputs to the drift window."""
        with self._lock:
            window = self._window()
            for prediction_id, index in zip(ids, indices, strict=True):
                self._pending[prediction_id] = index
                window.predictions += 1
                window.class_counts[index] += 1
                self.class_totals[index] += 1
                self.metrics.predictions.labels(self.classes[index]).inc()
            self.predictions += len(ids)
            while len(self._pending) > self.max_predictions:
                self._pending.popitem(last=False)  # the oldest prediction can no longer get feedback
            self._embeddings.extend(embeddings.unbind(0))
            self._input_stats.extend(input_stats.unbind(0))
            self._seen += len(embeddings)

    def record_latency(self, seconds: float) -> None:
        with self._lock:
            window = self._window()
            window.latency_seen += 1
            if len(window.latencies) < LATENCY_SAMPLES:
                window.latencies.append(seconds)
            else:  # reservoir sampling: every request of the window is kept with equal probability
                slot = self._random.randrange(window.latency_seen)
                if slot < LATENCY_SAMPLES:
                    window.latencies[slot] = seconds

    def feedback(self, prediction_id: str, label: int) -> bool:
        """Record the true class of a prediction; returns whether the prediction was right.

        Raises UnknownPrediction for an id never issued, already given feedback, or evicted.
        """
        with self._lock:
            predicted = self._pending.pop(prediction_id, None)
            if predicted is None:
                raise UnknownPrediction(prediction_id)
            correct = predicted == label
            window = self._window()
            window.feedback += 1
            window.correct += correct
            self.feedback_total += 1
            self.feedback_correct += correct
            self._recent_feedback.append(correct)
            self.metrics.feedback.labels(str(correct).lower()).inc()
            self.metrics.accuracy.set(self.feedback_correct / self.feedback_total)
            self.metrics.rolling_accuracy.set(sum(self._recent_feedback) / len(self._recent_feedback))
        return correct

    def check_drift(self) -> DriftResult | None:
        """Test the drift window if it changed since the last test and is big enough; the latest result.

        Blocking (a permutation test): call it from a worker thread.
        """
        if self.detector is None:
            return None
        with self._drift_lock:
            with self._lock:
                if len(self._embeddings) < self.drift_min or self._seen == self._tested_at:
                    return self.last_drift
                seen = self._seen
                embeddings, stats = torch.stack(list(self._embeddings)), torch.stack(list(self._input_stats))
            result = self.detector.test(embeddings, stats)
            with self._lock:
                self._tested_at, self.last_drift = seen, result
                window = self._window()
                window.drift_statistic, window.drift_p_value = result.statistic, result.p_value
                self.metrics.drift_statistic.set(result.statistic)
                self.metrics.drift_p_value.set(result.p_value)
                self.metrics.drift.set(int(result.drift))
            return result

    def drift_status(self) -> dict:
        """What /drift answers: whether drift is monitored, the test's state and its last result."""
        if self.detector is None:
            return {"enabled": False, "status": "off", "reason": NO_REFERENCE}
        with self._lock:
            collected = len(self._embeddings)
            result = self.last_drift
        if result is None:
            status = (
                f"collecting ({collected}/{self.drift_min} inputs)"
                if collected < self.drift_min
                else "pending"
            )
        else:
            status = "drift" if result.drift else "ok"
        return {
            "enabled": True,
            "status": status,
            "window": collected,
            "min_window": self.drift_min,
            "result": result.to_dict() if result else None,
        }

    def snapshot(self) -> bytes:
        """All the monitor page draws, encoded as JSON (UTF-8)."""
        with self._lock:
            current = self._window()  # the windows up to now, the quiet ones since the last activity included
            windows = [w.ended for w in self._windows if w is not current] + [_json(current.to_dict())]
            total = self.predictions
            shares = [count / total if total else 0.0 for count in self.class_totals]
            recent = list(self._recent_feedback)
            totals = {
                "predictions": total,
                "feedback": self.feedback_total,
                "accuracy": self.feedback_correct / self.feedback_total if self.feedback_total else None,
                "accuracy_ci": wilson_interval(self.feedback_correct, self.feedback_total),
                "rolling_accuracy": sum(recent) / len(recent) if recent else None,
                "rolling_accuracy_ci": wilson_interval(sum(recent), len(recent)),
                "class_shares": dict(zip(self.classes, shares, strict=True)),
                "awaiting_feedback": len(self._pending),
            }
        rest = _json(
            {
                "classes": list(self.classes),
                "bucket_s": self.bucket_s,
                "now": self.clock(),
                "totals": totals,
                "drift": self.drift_status(),
            }
        )
        return f'{{"windows":[{",".join(windows)}],{rest[1:]}'.encode()
