"""The index page in a real browser (Debian's Chromium driven by Playwright): upload, see the prediction."""

from __future__ import annotations

from pathlib import Path

import pytest

from capas.data import make_splits
from capas.predict import predict_files
from capas.runs import load_run
from serve_support import live_server, png

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "browser-token"
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium (scripts/setup.sh installs it)"
)


def test_upload_on_the_index_page_shows_the_prediction(tiny_run, tmp_path):
    from playwright.sync_api import sync_playwright

    image = tmp_path / "coat.png"
    image.write_bytes(png(make_splits("fashion-mnist", limit=2000, test_limit=400).test.images[7]))
    run = load_run(tiny_run)
    expected = predict_files(run, [image])[0]
    with live_server(run_dir=tiny_run, token=TOKEN, threads=1) as (url, _), sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page()
            problems: list[str] = []
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("console", lambda message: message.type == "error" and problems.append(message.text))
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
            page.wait_for_function(
                "document.getElementById('feedback-status').textContent.includes('accuracy')"
            )
            assert "100.0%" in page.inner_text("#feedback-status")

            page.goto(f"{url}/monitor")
            page.wait_for_function("document.getElementById('t-predictions').textContent === '1'")
            assert page.inner_text("#t-accuracy") == "100.0%"
            assert page.inner_text("#drift-status").startswith("collecting")
            assert problems == []
        finally:
            browser.close()
