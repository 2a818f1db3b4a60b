"""Serving an int8 run directory: the ONNX Runtime backend, chosen by the run directory itself."""

from __future__ import annotations

import httpx
import torch

from capas.data import make_splits
from capas.deploy.compress import compress_run
from capas.deploy.measure import Repeats
from capas.predict import predict
from capas.runs import load_run
from serve_support import live_server, png


def test_an_int8_run_serves_the_same_predictions_as_capas_predict(tiny_run, tmp_path):
    out, _ = compress_run(
        tiny_run, quantize="int8", out=tmp_path / "int8", repeats=Repeats(batch1=5, batch64=2)
    )
    run = load_run(out)
    images = list(make_splits("fashion-mnist", limit=2000, test_limit=400).test.images[:4])
    expected = predict(run, images)
    with live_server(run_dir=out, threads=1) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        info = client.get("/info").json()
        assert info["backend"] == "OnnxModel"
        response = client.post(
            "/predict", files=[("file", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images)]
        )
        assert response.status_code == 200, response.text
        got = response.json()["predictions"]
        for want, answer in zip(expected, got, strict=True):
            assert answer["label"] == want.label
            torch.testing.assert_close(
                torch.tensor(answer["probabilities"]), torch.tensor(want.probabilities), atol=1e-6, rtol=0
            )
        assert client.get("/drift").status_code == 200
