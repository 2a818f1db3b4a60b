"""The monitor's figures against what was sent, on a clock the test moves."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import torch

from capas.deploy.serve.monitor import Metrics, Monitor
from serve_support import live_server

CLASSES = ("a", "b")


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def monitor(clock: Clock, history: int = 360, classes: tuple[str, ...] = CLASSES) -> Monitor:
    return Monitor(
        classes,
        None,
        Metrics(classes, drift=False),
        max_predictions=100,
        drift_window=200,
        drift_min=50,
        bucket_s=10.0,
        history=history,
        clock=clock,
    )


def snapshot(m: Monitor) -> dict:
    return json.loads(m.snapshot())


def predict(m: Monitor, ids: list[str], index: int = 0) -> None:
    m.record_predictions(ids, [index] * len(ids), torch.empty(0, 0), torch.empty(0, 2))


def test_quiet_windows_are_charted_as_empty_up_to_now():
    """The page draws one point per window: a window without traffic must be there with 0 predictions,
    not skipped (an outage drew as steady traffic), and the windows run up to now."""
    clock = Clock()
    m = monitor(clock)
    predict(m, ["x", "y"])
    clock.now += 30  # three windows later
    predict(m, ["z"])
    clock.now += 25
    windows = snapshot(m)["windows"]
    assert [w["t"] for w in windows] == [1000.0 + 10 * i for i in range(6)]
    assert [w["predictions"] for w in windows] == [2, 0, 0, 1, 0, 0]
    assert windows[1]["accuracy"] is None and windows[1]["latency_ms"]["p50"] is None


def test_a_long_silence_keeps_history_windows_ending_now():
    clock = Clock()
    m = monitor(clock, history=4)
    predict(m, ["x"])
    clock.now += 1000
    predict(m, ["y"])
    windows = snapshot(m)["windows"]
    assert [w["t"] for w in windows] == [1970.0, 1980.0, 1990.0, 2000.0]
    assert [w["predictions"] for w in windows] == [0, 0, 0, 1]


def test_a_clock_set_back_keeps_the_windows_in_order():
    """The wall clock can step back (NTP, a VM resumed): the charts' time axis must not run backwards;
    what happens until the clock catches up counts in the latest window."""
    clock = Clock()
    m = monitor(clock)
    predict(m, ["x"])
    clock.now += 20
    predict(m, ["y"])
    clock.now -= 35  # behind both windows
    predict(m, ["z"])
    windows = snapshot(m)["windows"]
    assert [w["t"] for w in windows] == [1000.0, 1010.0, 1020.0]
    assert [w["predictions"] for w in windows] == [1, 0, 2]


def test_live_accuracy_comes_with_its_uncertainty():
    """2 right answers out of 2 are no evidence of a 100% accurate model: the accuracy carries its 95%
    Wilson interval (scipy's), which is wide for few feedbacks and narrows as they accumulate."""
    from scipy.stats import binomtest

    m = monitor(Clock())
    assert snapshot(m)["totals"]["accuracy_ci"] is None  # no feedback, no interval
    predict(m, ["p1", "p2", "p3"], index=0)
    m.feedback("p1", 0)
    m.feedback("p2", 0)
    totals = snapshot(m)["totals"]
    wilson = binomtest(2, 2).proportion_ci(0.95, method="wilson")
    assert totals["accuracy"] == 1.0
    assert totals["accuracy_ci"] == pytest.approx([wilson.low, wilson.high])
    assert totals["accuracy_ci"][0] < 0.35  # the page shows 100.0% (95% CI 34.2%–100.0%)
    m.feedback("p3", 1)
    totals = snapshot(m)["totals"]
    wilson = binomtest(2, 3).proportion_ci(0.95, method="wilson")
    assert totals["accuracy_ci"] == totals["rolling_accuracy_ci"] == pytest.approx([wilson.low, wilson.high])


def test_polling_the_monitor_page_does_not_stall_the_server(tiny_run):
    """A busy hour fills the 360 windows of the charts with latencies; every poll of /monitor/data (the
    page polls every 2 s) took all their percentiles again and FastAPI's encoder walked them, on the
    event loop: 0.1-0.3 s in which no other client was answered. An ended window is summed up once, and
    encoded once: with 1,000 classes, encoding the 360 windows' class counts took another ~0.1 s a poll."""
    classes = tuple(f"class {i}" for i in range(1000))
    with live_server(run_dir=tiny_run, threads=1) as (url, app):
        m = app.state.server.monitor = monitor(clock := Clock(), classes=classes)  # a 1,000-class model's
        for window in range(360):
            predict(m, [f"p{window}"], index=window)
            for _ in range(50):
                m.record_latency(0.01)
            clock.now += m.bucket_s
        clock.now -= m.bucket_s  # still in the last window
        with httpx.Client(base_url=url, timeout=30) as client:

            def poll() -> float:
                started = time.perf_counter()
                response = client.get("/monitor/data")
                took = time.perf_counter() - started  # the server's time, not this test's parsing
                assert response.status_code == 200 and len(response.json()["windows"]) == 360
                return took

            first = poll()  # sums up the 359 ended windows
            later = min(poll() for _ in range(3))
    print(f"/monitor/data: first {first * 1000:.0f} ms, later {later * 1000:.0f} ms")
    assert later < first / 4
