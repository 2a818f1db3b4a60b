"""`capas serve` of a run directory without a drift reference (e.g. `capas import-keras` without --data):
a real uvicorn server on a loopback port serves everything; drift is off and says so everywhere."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from capas.data import make_splits
from capas.deploy.serve.monitor import NO_REFERENCE
from capas.runs import REFERENCE
from serve_support import browser_page, live_server, needs_chromium, png


@pytest.fixture(scope="module")
def bare_run(tiny_run, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("bare") / "run"
    shutil.copytree(tiny_run, run)
    (run / REFERENCE).unlink()
    return run


def test_a_run_without_reference_serves_everything_and_drift_says_it_is_off(bare_run, caplog):
    test = make_splits("fashion-mnist", limit=2000).test
    with caplog.at_level(logging.INFO, logger="capas.serve"):
        server = live_server(run_dir=bare_run, threads=1, drift_min=2, drift_every_s=0.1)
        with server as (url, _), httpx.Client(base_url=url, timeout=30) as client:
            statuses = []
            correct = 0
            for i in range(12):  # past drift_min: a drift test would have run were drift on
                response = client.post(
                    "/predict", files={"file": ("x.png", png(test.images[i]), "image/png")}
                )
                statuses.append(response.status_code)
                prediction = response.json()["predictions"][0]
                feedback = client.post(
                    "/feedback", json={"id": prediction["id"], "label": int(test.labels[i])}
                )
                statuses.append(feedback.status_code)
                correct += feedback.json()["correct"]

            drift = client.get("/drift")
            assert drift.status_code == 200
            assert drift.json() == {"enabled": False, "status": "off", "reason": NO_REFERENCE}

            info = client.get("/info")
            assert info.status_code == 200
            assert info.json()["drift"] == {"enabled": False, "reason": NO_REFERENCE}

            data = client.get("/monitor/data")
            assert data.status_code == 200
            totals = data.json()["totals"]
            assert totals["predictions"] == 12 and totals["feedback"] == 12
            assert totals["accuracy"] == pytest.approx(correct / 12)
            assert data.json()["drift"]["enabled"] is False
            assert all(w["drift_statistic"] is None for w in data.json()["windows"])

            metrics = client.get("/metrics")
            assert metrics.status_code == 200
            names = {s.name for f in text_string_to_metric_families(metrics.text) for s in f.samples}
            samples = {
                s.name: s.value for f in text_string_to_metric_families(metrics.text) for s in f.samples
            }
            assert samples["capas_drift_enabled"] == 0
            assert not names & {"capas_drift_statistic", "capas_drift_p_value", "capas_drift_detected"}
            assert samples["capas_live_accuracy"] == pytest.approx(correct / 12)
            for page in ("/", "/monitor", "/static/monitor.js"):
                statuses.append(client.get(page).status_code)
            assert statuses == [200] * len(statuses)
    said = [r.getMessage() for r in caplog.records if "drift monitoring is off" in r.getMessage()]
    assert said == [f"drift monitoring is off: {NO_REFERENCE}"]


def test_a_run_with_reference_reports_drift_enabled(tiny_run):
    with (
        live_server(run_dir=tiny_run, threads=1) as (url, _),
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        assert client.get("/drift").json()["enabled"] is True
        assert client.get("/info").json()["drift"]["enabled"] is True
        metrics = client.get("/metrics").text
        assert "capas_drift_enabled 1.0" in metrics and "capas_drift_statistic" in metrics


@needs_chromium
def test_the_monitor_page_shows_why_drift_is_off_instead_of_a_chart(bare_run):
    with live_server(run_dir=bare_run, threads=1) as (url, _), browser_page() as (page, problems):
        page.goto(f"{url}/monitor")
        page.wait_for_function("document.getElementById('drift-status').textContent === 'off'")
        assert page.inner_text("#drift-off") == f"Drift monitoring is off: {NO_REFERENCE}."
        assert not page.is_visible("#c-drift") and page.is_visible("#c-accuracy")
        assert problems == []
