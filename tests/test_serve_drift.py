"""Drift detection, both sides: in-distribution inputs raise no alarm; shifted inputs do."""

from __future__ import annotations

import asyncio
import base64
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from capas.data import ArrayDataset, load_dataset, make_splits, read_image
from capas.deploy.drift import DriftDetector
from capas.errors import CapasError
from capas.runs import REFERENCE, input_statistics, load_reference, load_run
from capas.runs.reference import Reference
from serve_support import live_server, micro_batcher, noised, png

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg" / "train"
WINDOW = 100


@pytest.fixture(scope="module")
def fashion_test():
    return make_splits(
        "fashion-mnist", limit=2000, test_limit=400
    ).test.images  # (400, 1, 28, 28), unseen in training


@pytest.fixture(scope="module")
def detector(tiny_run):
    return DriftDetector(load_reference(tiny_run / REFERENCE), alpha=0.01, permutations=500)


def features(run, images: list[torch.Tensor] | torch.Tensor):
    with torch.inference_mode():
        x = run.preprocess.each(list(images))
        return run.model.embed(x), input_statistics(x)


def cifar_images(count: int) -> list[torch.Tensor]:
    files = sorted(CIFAR.glob("*/*.jpg"))[::500][:count]
    return [read_image(f) for f in files]


SHIFTS = {
    "inverted": lambda images: 255 - images,
    "heavily noised": lambda images: noised(images, sigma=80),
    "digits (another dataset)": lambda images: load_dataset("digits")[0].images[: len(images)],
}


def test_in_distribution_raises_no_alarm(tiny_run, detector, fashion_test):
    run = load_run(tiny_run)
    for start in (0, WINDOW, 2 * WINDOW):  # three disjoint windows of unseen test images
        result = detector.test(*features(run, fashion_test[start : start + WINDOW]))
        assert not result.drift and result.p_value > 0.05, result
        assert result.window == WINDOW and result.reference == len(
            load_reference(tiny_run / REFERENCE).embeddings
        )


@pytest.mark.parametrize("shift", list(SHIFTS))
def test_shifted_inputs_raise_the_alarm(tiny_run, detector, fashion_test, shift):
    run = load_run(tiny_run)
    result = detector.test(*features(run, SHIFTS[shift](fashion_test[:WINDOW])))
    assert result.drift, result
    # the observed statistic counts as one permutation: the smallest possible p-value is 1 / (1 + P)
    assert result.p_value == pytest.approx(1 / (1 + detector.permutations))


@pytest.mark.skipif(not CIFAR.is_dir(), reason="the CIFAR-10 JPEG folder is not beside the repository")
def test_colour_photos_raise_the_alarm(tiny_run, detector):
    run = load_run(tiny_run)
    result = detector.test(*features(run, cifar_images(WINDOW)))
    assert result.drift, result


def test_p_value_counts_the_observed_statistic(tiny_run, fashion_test):
    run = load_run(tiny_run)
    detector = DriftDetector(load_reference(tiny_run / REFERENCE), permutations=99)
    result = detector.test(*features(run, fashion_test[:60]))
    assert 1 / 100 <= result.p_value <= 1
    assert result.p_value * 100 == pytest.approx(round(result.p_value * 100))  # (1 + count) / (1 + 99)
    again = detector.test(*features(run, fashion_test[:60]))
    assert again == result  # seeded permutations: the same window gives the same answer
    assert set(result.input_stats) == {"pixel_mean", "pixel_std"}


def test_without_drift_a_small_reference_flags_about_alpha_of_the_windows():
    """Standardised by the reference's own mean and spread, the reference rows looked tighter than the
    window's and the permutations were not exchangeable: ReLU-like (skewed) embeddings of 10 reference
    images flagged 98% of windows drawn from their own distribution at alpha 0.05."""
    generator = torch.Generator().manual_seed(1)
    trials, flagged = 200, 0
    for trial in range(trials):
        reference = Reference(
            torch.randn(10, 64, generator=generator).exp(), torch.rand(10, 2, generator=generator)
        )
        detector = DriftDetector(reference, alpha=0.05, permutations=200, seed=trial)
        window = torch.randn(30, 64, generator=generator).exp()
        flagged += detector.test(window, torch.rand(30, 2, generator=generator)).drift
    assert flagged / trials < 0.1  # about 0.05 expected; P(≥ 20 of 200 | 0.05) < 0.2%


def test_a_p_value_equal_to_alpha_is_not_drift(tiny_run):
    """The p-value was a float32 division: 1/100 became 0.0099999998, below alpha 0.01, and drift was
    flagged where the rule p < alpha does not."""
    run = load_run(tiny_run)
    detector = DriftDetector(load_reference(tiny_run / REFERENCE), alpha=0.01, permutations=99)
    result = detector.test(*features(run, cifar_images(WINDOW)))
    assert result.p_value == 0.01 and not result.drift  # no permutation reaches colour photos' statistic


def test_damaged_reference_is_a_clear_error(tmp_path):
    with pytest.raises(CapasError, match="no drift reference"):
        load_reference(tmp_path / "reference.safetensors")
    (tmp_path / "reference.safetensors").write_bytes(b"garbage")
    with pytest.raises(CapasError, match="unreadable drift reference"):
        load_reference(tmp_path / "reference.safetensors")


def test_a_validation_split_of_one_image_gives_no_reference(tiny_run, fashion_test, tmp_path):
    """A drift test compares two samples: one image cannot be a reference. It was written anyway, and
    serve refused the run at start-up with "drift reference has shapes (1, …)", which reads as damage;
    now there is none, and serve runs with drift off, as for a run without one."""
    from capas.runs.reference import save_reference

    run = load_run(tiny_run)
    one = ArrayDataset(fashion_test[:1], torch.zeros(1, dtype=torch.int64), run.classes)
    save_reference(tmp_path / REFERENCE, run.model, one, run.preprocess)
    assert not (tmp_path / REFERENCE).exists()


def test_drift_samples_the_whole_batch(tiny_run):
    """Only the first drift_per_batch images of a forward pass fed drift: a request of 8 usual
    images followed by 24 inverted ones looked in-distribution. Each request gets back its own
    sampled images' features."""
    run = load_run(tiny_run)
    first, rest = torch.zeros(8, 1, 28, 28), torch.ones(24, 1, 28, 28)  # input means 0 and 1
    other = torch.full((32, 1, 28, 28), 0.5)

    async def scenario():
        batcher = micro_batcher(run, 64)
        await batcher.start()
        try:
            with batcher.receiving():  # one more request is on its way: both share one forward pass
                tasks = [asyncio.create_task(batcher.predict(x)) for x in (torch.cat([first, rest]), other)]
                await asyncio.sleep(0.05)
            return await asyncio.gather(*tasks)
        finally:
            await batcher.stop()

    ours, theirs = asyncio.run(scenario())
    assert len(ours.input_stats) + len(theirs.input_stats) == 8
    assert 1.0 in set(ours.input_stats[:, 0].tolist()) <= {0.0, 1.0}  # not only its first images
    assert set(theirs.input_stats[:, 0].tolist()) <= {0.5}
    with torch.inference_mode():
        for stats, embedding in zip(ours.input_stats, ours.embeddings, strict=True):
            image = first[:1] if stats[0] == 0 else rest[:1]
            assert torch.allclose(embedding, run.model.embed(image)[0], atol=1e-5)


def _send(client: httpx.Client, images: torch.Tensor) -> None:
    for start in range(0, len(images), 20):
        chunk = [base64.b64encode(png(image)).decode() for image in images[start : start + 20]]
        assert client.post("/predict", json={"images": chunk}).status_code == 200


def test_server_flags_drift_only_after_shifted_traffic(tiny_run, fashion_test):
    settings = {
        "run_dir": tiny_run,
        "drift_window": WINDOW,
        "drift_min": WINDOW,
        "drift_per_batch": 64,
        "drift_every_s": 3600,
        "threads": 1,
    }
    with live_server(**settings) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/drift").json()["status"].startswith("collecting (0/")
        _send(client, fashion_test[200 : 200 + WINDOW])
        status = client.get("/drift").json()
        assert status["status"] == "ok" and status["window"] == WINDOW, status
        assert status["result"]["p_value"] > 0.05
        _send(client, 255 - fashion_test[:WINDOW])  # the window now holds only inverted images
        status = client.get("/drift").json()
        assert status["status"] == "drift" and status["result"]["p_value"] < 0.01, status
        metrics = client.get("/metrics").text
        assert "capas_drift_detected 1.0" in metrics
        assert f"capas_drift_p_value {status['result']['p_value']}" in metrics
        windows = client.get("/monitor/data").json()["windows"]
        tested = [w["drift_p_value"] for w in windows if w["drift_p_value"] is not None]
        assert tested[-1] == status["result"]["p_value"]  # the last window may be a new, quiet one


def test_requests_waiting_for_a_drift_test_do_not_hold_up_other_routes(tiny_run):
    """Every route resolved its state dependency on the thread pool (40 threads) that /drift's tests run
    on: 45 /drift calls waiting for a test in progress took every thread, and /health waited for them
    (2.9 s behind a 1.6 s test in a real server); the pages, whose files Starlette reads on that pool, still
    did. The test in progress is held here by its lock."""
    with (
        live_server(run_dir=tiny_run, threads=1) as (url, app),
        httpx.Client(base_url=url, timeout=10, limits=httpx.Limits(max_connections=50)) as client,
        ThreadPoolExecutor(45) as waiting,
    ):
        testing = app.state.server.monitor._drift_lock  # a drift test in progress
        testing.acquire()
        try:
            calls = [waiting.submit(client.get, "/drift") for _ in range(45)]
            time.sleep(0.3)  # every thread of the pool waits for the test
            assert client.get("/health", timeout=1).status_code == 200
            # the pages too: Starlette reads a file (/, /monitor, /static, /docs-assets) on that pool
            for page in ("/", "/monitor", "/static/monitor.js", "/docs-assets/swagger-ui.css"):
                assert client.get(page, timeout=1).status_code == 200, page
        finally:
            testing.release()
        assert all(call.result().status_code == 200 for call in calls)
