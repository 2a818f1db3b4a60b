"""The pages in a real browser (Debian's Chromium driven by Playwright): upload, see the prediction; the charts."""

from __future__ import annotations

import pytest

from capas.data import make_splits
from capas.deploy.serve.routes.pages import STATIC
from capas.predict import predict_files
from capas.runs import load_run
from serve_support import browser_page, live_server, needs_chromium, png

TOKEN = "browser-token"
pytestmark = needs_chromium


def test_upload_on_the_index_page_shows_the_prediction(tiny_run, tmp_path):
    image = tmp_path / "coat.png"
    image.write_bytes(png(make_splits("fashion-mnist", limit=2000, test_limit=400).test.images[7]))
    run = load_run(tiny_run)
    expected = predict_files(run, [image])[0]
    with (
        live_server(run_dir=tiny_run, token=TOKEN, threads=1) as (url, _),
        browser_page() as (page, problems),
    ):
        page.goto(f"{url}/?token={TOKEN}")
        page.wait_for_function("document.getElementById('model').textContent.startsWith('tiny')")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#top-label")
        assert page.inner_text("#top-label") == expected.label
        rows = page.locator("#results .row")
        assert rows.count() == 5
        top_label, top_p = expected.top(run.classes, 1)[0]
        assert rows.first.get_attribute("data-label") == top_label
        assert rows.first.locator(".p").inner_text() == f"{top_p * 100:.1f}%"
        assert page.locator("#preview").evaluate("img => img.complete && img.naturalWidth") == 28

        page.click("#send")  # feedback with the preselected (predicted) class
        page.wait_for_function("document.getElementById('feedback-status').textContent.includes('accuracy')")
        # 1 right of 1: its 95% Wilson interval says how little that shows
        assert "100.0% over 1 feedbacks (95% CI 20.7–100.0%)" in page.inner_text("#feedback-status")

        page.goto(f"{url}/monitor")
        page.wait_for_function("document.getElementById('t-predictions').textContent === '1'")
        assert page.inner_text("#t-accuracy") == "100.0% (95% CI 20.7%–100.0%)"
        assert page.inner_text("#drift-status").startswith("collecting")
        assert problems == []


def test_the_index_page_states_the_servers_image_limits(tiny_run):
    """It said "any size": an image over max_pixels or max_request_pixels (a 48 MP photo under the
    default 16 M) or a file over max_body_mb is refused."""
    with (
        live_server(
            run_dir=tiny_run, threads=1, max_pixels=4_000_000, max_request_pixels=2_500_000, max_body_mb=0.5
        ) as (url, _),
        browser_page() as (page, problems),
    ):
        with page.expect_response(lambda response: "/info" in response.url) as info:
            page.goto(url)
        # it shows no test figures: a 1,000-class run's confusion matrix made each load fetch 2 MB
        assert "confusion_matrix" not in info.value.json()["test"]
        page.wait_for_function("document.getElementById('expects').textContent !== ''")
        assert page.inner_text("#expects") == (
            "up to 2.5 megapixels and 0.5 MB; resized to 28×28, grey, as in training"
        )
        assert problems == []


def test_an_answer_without_json_is_shown_not_left_predicting(tiny_run, tmp_path):
    """uvicorn answers 503 in plain text when every connection is taken: the page said "predicting…"
    forever (its script failed parsing the answer as JSON)."""
    image = tmp_path / "x.png"
    image.write_bytes(png(make_splits("fashion-mnist", limit=2000, test_limit=400).test.images[0]))
    with live_server(run_dir=tiny_run, threads=1) as (url, _), browser_page() as (page, _problems):
        page.route(
            "**/predict",
            lambda route: route.fulfill(status=503, body="Service Unavailable", content_type="text/plain"),
        )
        page.goto(url)
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#results .error", timeout=5000)
        assert page.inner_text("#results .error") == "error 503: Service Unavailable"
        assert page.locator("#feedback").is_hidden()


def test_the_monitor_page_says_when_its_figures_stop_being_current(tiny_run):
    """When the server stops answering, the page kept showing its last figures as if live."""
    with browser_page() as (page, _problems):
        with live_server(run_dir=tiny_run, threads=1) as (url, _):
            page.goto(f"{url}/monitor")
            page.wait_for_function("document.getElementById('window-note').textContent !== ''")
            assert page.locator("#stale").is_hidden()
        page.wait_for_selector("#stale", state="visible", timeout=10000)
        assert page.inner_text("#stale").startswith("Not updated since ")


def test_volume_bars_read_true_on_their_labelled_axis():
    """A bar of 4 predictions must reach the gridline labelled 4 (the labels were rounded from
    gridlines at 4.4, 3.3, …, so it read as 3.6)."""
    with browser_page() as (page, problems):
        page.set_content('<canvas id="c" style="width:400px;height:200px"></canvas>')
        page.add_script_tag(path=str(STATIC / "charts.js"))
        drawn = page.evaluate(
            """() => {
              const texts = [], rects = [];
              const proto = CanvasRenderingContext2D.prototype;
              const fillText = proto.fillText, fillRect = proto.fillRect;
              proto.fillText = function (text, x, y) { texts.push([text, y]); return fillText.apply(this, arguments); };
              proto.fillRect = function (x, y, w, h) { rects.push([y, h]); return fillRect.apply(this, arguments); };
              stackedBars(document.getElementById("c"), [0, 10, 20], [[4], [1], [7]], ["#000"]);
              return { texts, rects };
            }"""
        )
        assert problems == []
    gridlines = [(float(text), y) for text, y in drawn["texts"] if text.replace(".", "").isdigit()]
    (top_value, top_y), (bottom_value, bottom_y) = gridlines[0], gridlines[-1]
    per_pixel = (top_value - bottom_value) / (bottom_y - top_y)
    bars = [bottom_value + (bottom_y - 4 - y) * per_pixel for y, _ in drawn["rects"]]  # labels sit 4 px low
    assert bars == pytest.approx([4, 1, 7])
