"""`capas serve` against a real uvicorn server on a loopback port: API, bad input, token, metrics, load."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from scipy.stats import binomtest
from typer.testing import CliRunner

from capas.cli import app as cli
from capas.data import make_splits
from capas.inference import resolve_device
from capas.predict import predict_files
from capas.runs import load_run
from capas.spec.summary import summarize
from hostile import bomb_png
from serve_support import live_server, png

TOKEN = "s3cret token; with=odd,chars"  # none of which a cookie value may hold
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT_MB = 1.0


@pytest.fixture(scope="module")
def test_images():
    """400 real Fashion-MNIST test images and labels."""
    test = make_splits("fashion-mnist", limit=2000, test_limit=400).test
    return test.images, test.labels


@pytest.fixture(scope="module")
def server(tiny_run):
    with live_server(run_dir=tiny_run, token=TOKEN, max_body_mb=LIMIT_MB, max_images=8, threads=1) as (
        url,
        _,
    ):
        yield url


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, headers=AUTH, timeout=30) as c:
        yield c


def post_files(client: httpx.Client, *images: bytes) -> httpx.Response:
    return client.post(
        "/predict", files=[("file", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]
    )


def metric_samples(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def test_prediction_equals_capas_predict(client, tiny_run, test_images, tmp_path):
    images, _ = test_images
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png(images[i]))
    # 4× the model's input on each side, as a folder of larger images trains: the server shrank it
    # while decoding (a box average before the resize), so it reached the model as other pixels
    paths[2].write_bytes(
        png(images[2].repeat_interleave(4, 1).repeat_interleave(4, 2) // 2 + images[3].repeat(1, 4, 4) // 2)
    )
    # on the device the server picks ("auto"): a GPU's kernels round differently from the CPU's
    expected = predict_files(load_run(tiny_run, device=resolve_device("auto")), paths)
    # multipart, several files in one request
    got = post_files(client, *(p.read_bytes() for p in paths)).json()["predictions"]
    # JSON with base64, one of them as a data URL, one wrapped in lines as `base64 x.png` writes it
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    encoded[0] = "DATA:image/PNG;BASE64," + encoded[0]  # any case, as RFC 2397 allows
    encoded[1] = base64.encodebytes(paths[1].read_bytes()).decode()
    got_json = client.post("/predict", json={"images": encoded}).json()["predictions"]
    for want, a, b in zip(expected, got, got_json, strict=True):
        assert a["label"] == b["label"] == want.label
        torch.testing.assert_close(
            torch.tensor(a["probabilities"]), torch.tensor(want.probabilities), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            torch.tensor(b["probabilities"]), torch.tensor(want.probabilities), atol=1e-6, rtol=0
        )
        assert [t["label"] for t in a["top"]] == [
            label for label, _ in want.top(load_run(tiny_run).classes, 5)
        ]
    assert len({p["id"] for p in got + got_json}) == 6


def test_top_k_and_probabilities(client, test_images):
    response = client.post("/predict?top_k=3", files={"file": ("a.png", png(test_images[0][5]), "image/png")})
    prediction = response.json()["predictions"][0]
    assert [t["probability"] for t in prediction["top"]] == sorted(prediction["probabilities"], reverse=True)[
        :3
    ]
    assert abs(sum(prediction["probabilities"]) - 1) < 1e-5


def _good(client: httpx.Client, images) -> None:
    response = post_files(client, png(images[0]))
    assert response.status_code == 200, response.text


def _predict_id(client: httpx.Client, images) -> str:
    return post_files(client, png(images[1])).json()["predictions"][0]["id"]


MULTIPART = "multipart/form-data; boundary=xyz"


def _part(name: str, filename: str | None = None) -> bytes:
    file = f'; filename="{filename}"\r\nContent-Type: image/png' if filename else ""
    return f'--xyz\r\nContent-Disposition: form-data; name="{name}"{file}\r\n\r\n'.encode()


def _chunks(total: int):
    """A multipart body streamed without Content-Length (chunked): one file part of `total` bytes."""
    yield _part("file", "big.png")
    for _ in range(total // 65536 + 1):
        yield b"\x00" * 65536
    yield b"\r\n--xyz--\r\n"


BAD_REQUESTS = {
    # name: (request maker, expected status, words the message must contain)
    "non-image bytes": (
        lambda c, im: c.post("/predict", files={"file": ("notes.png", b"hello, not an image", "image/png")}),
        422,
        ["notes.png", "not a readable image"],
    ),
    "truncated image": (
        lambda c, im: c.post("/predict", files={"file": ("cut.png", png(im[0])[:120], "image/png")}),
        422,
        ["cut.png"],
    ),
    "decompression bomb": (
        lambda c, im: c.post("/predict", files={"file": ("bomb.png", bomb_png(), "image/png")}),
        422,
        ["bomb.png", "pixels"],
    ),
    "empty file part": (
        lambda c, im: c.post("/predict", files={"file": ("empty.png", b"", "image/png")}),
        422,
        ["empty.png", "empty"],
    ),
    "wrong content type": (
        lambda c, im: c.post("/predict", content=b"abc", headers={"content-type": "text/plain"}),
        415,
        ["text/plain", "multipart/form-data"],
    ),
    "no content type": (lambda c, im: c.post("/predict", content=b"abc"), 415, ["content type"]),
    "empty body": (
        lambda c, im: c.post("/predict", content=b"", headers={"content-type": MULTIPART}),
        400,
        ["empty"],
    ),
    "empty JSON body": (
        lambda c, im: c.post("/predict", content=b"", headers={"content-type": "application/json"}),
        400,
        ["empty"],
    ),
    "multipart without a file": (
        lambda c, im: c.post(
            "/predict", content=_part("x") + b"1\r\n--xyz--\r\n", headers={"content-type": MULTIPART}
        ),
        422,
        ["field 'x'", "not a file", "curl -F file=@x.png"],
    ),
    # a text part beside the files was dropped: the predictions' order shifted, top_k went unread
    "multipart text field beside a file": (
        lambda c, im: c.post(
            "/predict", files={"file": ("a.png", png(im[0]), "image/png")}, data={"top_k": "2"}
        ),
        422,
        ["field 'top_k'", "not a file", "/predict?top_k=3"],
    ),
    "multipart without a boundary": (
        lambda c, im: c.post("/predict", content=b"abc", headers={"content-type": "multipart/form-data"}),
        400,
        ["multipart body", "boundary", "curl -F file=@x.png"],
    ),
    "multipart not matching its boundary": (
        lambda c, im: c.post("/predict", content=b"--abc\r\nxx", headers={"content-type": MULTIPART}),
        400,
        ["multipart body", "curl -F file=@x.png"],
    ),
    "multipart part without a name": (
        lambda c, im: c.post(
            "/predict",
            content=b"--xyz\r\nX: y\r\n\r\nabc\r\n--xyz--\r\n",
            headers={"content-type": MULTIPART},
        ),
        400,
        ["multipart body", "name", "curl -F file=@x.png"],
    ),
    "body over the limit": (lambda c, im: post_files(c, os.urandom(int(LIMIT_MB * 1e6) + 1000)), 413, ["MB"]),
    "chunked body over the limit": (
        lambda c, im: c.post(
            "/predict", content=_chunks(int(LIMIT_MB * 1e6) + 1000), headers={"content-type": MULTIPART}
        ),
        413,
        ["MB"],
    ),
    "too many images": (
        lambda c, im: c.post("/predict", json={"images": [base64.b64encode(png(im[0])).decode()] * 9}),
        413,
        ["at most 8"],
    ),
    "malformed JSON": (
        lambda c, im: c.post(
            "/predict", content=b'{"images": [', headers={"content-type": "application/json"}
        ),
        400,
        ["malformed JSON"],
    ),
    "JSON of the wrong shape": (lambda c, im: c.post("/predict", json={"image": "abc"}), 422, ["images"]),
    "JSON with top_k in the body, not the query": (
        lambda c, im: c.post(
            "/predict", json={"images": [base64.b64encode(png(im[0])).decode()], "top_k": 1}
        ),
        422,
        ["unknown field 'top_k'", "/predict?top_k="],
    ),
    "malformed base64": (
        lambda c, im: c.post("/predict", json={"images": ["iVBOR!!not base64"]}),
        400,
        ["images[0]", "base64"],
    ),
    "base64 of non-image bytes": (
        lambda c, im: c.post("/predict", json={"images": [base64.b64encode(b"zzz").decode()]}),
        422,
        ["images[0]"],
    ),
    "top_k of 0": (
        lambda c, im: c.post("/predict?top_k=0", files={"file": ("a.png", png(im[0]), "image/png")}),
        422,
        ["top_k"],
    ),
    "unknown prediction id": (
        lambda c, im: c.post("/feedback", json={"id": "no-such-id", "label": 0}),
        404,
        ["no-such-id"],
    ),
    "label index outside the classes": (
        lambda c, im: c.post("/feedback", json={"id": _predict_id(c, im), "label": 10}),
        422,
        ["label", "0..9"],
    ),
    "label name outside the classes": (
        lambda c, im: c.post("/feedback", json={"id": _predict_id(c, im), "label": "Shirtt"}),
        422,
        ["Shirtt", "did you mean 'Shirt'"],
    ),
    "feedback malformed JSON": (
        lambda c, im: c.post("/feedback", content=b"{id", headers={"content-type": "application/json"}),
        400,
        ["body: malformed JSON", '"label"'],
    ),
    "feedback not UTF-8": (
        lambda c, im: c.post(
            "/feedback", content=b'{"id": "\xff"}', headers={"content-type": "application/json"}
        ),
        400,
        ["body: malformed JSON"],
    ),
    "feedback form-encoded (curl -d without a content type)": (
        lambda c, im: c.post(
            "/feedback",
            content=b'{"id": "x", "label": 1}',
            headers={"content-type": "application/x-www-form-urlencoded"},
        ),
        415,
        ["application/x-www-form-urlencoded", "application/json"],
    ),
    "feedback label true": (
        lambda c, im: c.post("/feedback", json={"id": _predict_id(c, im), "label": True}),
        422,
        ["label"],
    ),
    "feedback misspelt field": (
        lambda c, im: c.post("/feedback", json={"id": _predict_id(c, im), "label": 1, "lable": 8}),
        422,
        ["lable"],
    ),
    "feedback body over 4 KB": (
        lambda c, im: c.post("/feedback", json={"id": "x", "label": 1, "pad": [{}] * 10_000}),
        413,
        ["4,096 bytes"],
    ),
    "predict 9 files, at most 8": (
        lambda c, im: post_files(c, *[png(im[0])] * 9),
        413,
        ["at most 8 per request"],
    ),
    "predict 9 base64 images, at most 8": (
        lambda c, im: c.post("/predict", json={"images": [""] * 9}),
        413,
        ["9 images, at most 8 per request"],
    ),
    "unknown route": (lambda c, im: c.get("/nope"), 404, ["Not Found"]),
    # an unknown query parameter was ignored: /predict?topk=2 listed the default 5 classes
    "misspelt query parameter": (
        lambda c, im: c.post("/predict?topk=2", files={"file": ("a.png", png(im[0]), "image/png")}),
        422,
        ["'topk'", "/predict", "it takes top_k"],
    ),
    "query parameter of a route that takes none": (
        lambda c, im: c.get("/metrics?format=json"),
        422,
        ["'format'", "/metrics", "it takes none"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_json_error_then_the_server_still_serves(client, test_images, case):
    make, status, words = BAD_REQUESTS[case]
    response = make(client, test_images[0])
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = str(response.json()["detail"])
    for word in words:
        assert word.lower() in detail.lower(), detail
    _good(client, test_images[0])


def test_bad_label_does_not_use_up_the_prediction(client, test_images):
    prediction_id = _predict_id(client, test_images[0])
    assert client.post("/feedback", json={"id": prediction_id, "label": 99}).status_code == 422
    response = client.post("/feedback", json={"id": prediction_id, "label": "Trouser"})
    assert response.status_code == 200, response.text
    assert (
        client.post("/feedback", json={"id": prediction_id, "label": 1}).status_code == 404
    )  # answered once


def test_token_guards_every_route_but_health(server):
    with httpx.Client(base_url=server, timeout=30) as anonymous:
        assert anonymous.get("/health").json() == {"status": "ok", "model_loaded": True, "model": "tiny"}
        for path in (
            "/",
            "/info",
            "/monitor",
            "/monitor/data",
            "/metrics",
            "/docs",
            "/openapi.json",
            "/drift",
            "/static/index.js",
            "/docs-assets/swagger-ui.css",
        ):
            response = anonymous.get(path)
            assert response.status_code == 401, path
            assert "token" in response.json()["detail"]
        assert anonymous.post("/predict", files={"file": ("a.png", b"x", "image/png")}).status_code == 401
        assert anonymous.get("/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        # a page opened with ?token= sets a cookie that authorises the page's own requests
        page = anonymous.get("/", params={"token": TOKEN})
        assert page.status_code == 200 and "<html" in page.text
        assert TOKEN not in page.headers["set-cookie"]  # a digest of it
        assert anonymous.get("/static/index.js").status_code == 200
        assert anonymous.get("/info").status_code == 200
    # another site's cookie with a name Python's SimpleCookie refuses was a 500 on every route
    odd = {**AUTH, "Cookie": "a(b=1; capas_token=nonsense"}
    assert httpx.get(f"{server}/info", headers=odd, timeout=30).status_code == 200
    assert httpx.get(f"{server}/info", headers={"Cookie": "a(b=1"}, timeout=30).status_code == 401
    # answered by the middleware before routing, still counted under their routes
    with httpx.Client(base_url=server, headers=AUTH, timeout=30) as client:
        samples = metric_samples(client)
    assert samples[("capas_requests_total", (("method", "GET"), ("route", "/info"), ("status", "401")))] >= 3
    assert (
        samples[("capas_requests_total", (("method", "POST"), ("route", "/predict"), ("status", "401")))] >= 1
    )


def test_a_base64_token_opens_the_page_as_typed(tiny_run):
    """`openssl rand -base64 24` makes tokens with '+': /?token=T typed into a browser's address bar
    was a 401, its '+' read as a space (form encoding)."""
    token = "q+Vx/7k+Lw=="
    with live_server(run_dir=tiny_run, token=token, threads=1) as (url, _):
        assert httpx.get(f"{url}/info?token={token}", timeout=30).status_code == 200  # as typed
        assert httpx.get(f"{url}/info", params={"token": token}, timeout=30).status_code == 200  # encoded
        assert httpx.get(f"{url}/info?token=q Vx/7k Lw==", timeout=30).status_code == 401


def test_a_non_ascii_token_is_accepted_in_the_authorization_header(tiny_run):
    """The header was read as Latin-1 and compared as UTF-8: a token with 'ä' was a 401 however sent
    (curl -H 'Authorization: Bearer pässwört' sends its UTF-8 bytes)."""
    token = "pässwört"
    with live_server(run_dir=tiny_run, token=token, threads=1) as (url, _):
        header = {"Authorization": f"Bearer {token}".encode()}
        assert httpx.get(f"{url}/info", headers=header, timeout=30).status_code == 200
        assert (
            httpx.get(f"{url}/info", headers={"Authorization": b"Bearer p\xe4ssw\xf6rt"}).status_code == 401
        )


def test_info(client, tiny_run):
    info = client.get("/info").json()
    run = load_run(tiny_run)
    assert info["model"] == "tiny" and info["classes"] == list(run.classes)
    assert info["parameters"] == summarize(run.spec).total
    assert info["test"]["test_accuracy"] == run.read_json("test.json")["test_accuracy"]
    assert len(info["training"]["history"]) == 2 and info["training"]["train"]["epochs"] == 2
    assert info["spec"] == run.spec.to_dict()
    assert info["capas_version"] and info["backend"] == "torch"
    assert "token" not in str(info["serving"])
    # without the confusion matrix (classes² counts: 2 MB of /info's 2 MB for 1,000 classes), the rest alike
    assert len(info["test"]["confusion_matrix"]) == len(run.classes)
    brief = client.get("/info", params={"confusion_matrix": "false"}).json()
    assert "confusion_matrix" not in brief["test"]
    assert brief == {**info, "test": {k: v for k, v in info["test"].items() if k != "confusion_matrix"}}


def test_pages_and_docs(client):
    assert 'id="drop"' in client.get("/").text
    assert "canvas" in client.get("/monitor").text
    docs = client.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/feedback", "/info", "/health", "/metrics", "/drift"} <= set(schema["paths"])
    assert set(schema["paths"]["/predict"]["post"]["requestBody"]["content"]) == {
        "multipart/form-data",
        "application/json",
    }
    feedback = schema["paths"]["/feedback"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(feedback["properties"]) == {"id", "label"}
    for path in ("/", "/monitor", "/docs", "/info", "/health", "/metrics", "/monitor/data", "/drift"):
        head = client.head(path)  # as uptime checks probe: GET's status and headers, no body
        assert head.status_code == 200 and head.content == b"", path


def test_feedback_gives_live_accuracy_and_metrics(client, test_images):
    images, labels = test_images
    before = client.get("/monitor/data").json()["totals"]
    samples_before = metric_samples(client)
    batch = list(range(100, 120))
    encoded = (
        [base64.b64encode(png(images[i])).decode() for i in batch[:8]],
        [base64.b64encode(png(images[i])).decode() for i in batch[8:16]],
        [base64.b64encode(png(images[i])).decode() for i in batch[16:]],
    )
    predictions = [
        p for chunk in encoded for p in client.post("/predict", json={"images": chunk}).json()["predictions"]
    ]
    correct = 0
    for prediction, i in zip(predictions, batch, strict=True):
        response = client.post("/feedback", json={"id": prediction["id"], "label": int(labels[i])})
        assert response.status_code == 200
        assert response.json()["correct"] == (prediction["index"] == int(labels[i]))
        correct += prediction["index"] == int(labels[i])
    n, accuracy_ci = response.json()["feedback"], response.json()["accuracy_ci"]
    wilson = binomtest(round(response.json()["accuracy"] * n), n).proportion_ci(0.95, method="wilson")
    assert accuracy_ci == pytest.approx([wilson.low, wilson.high])
    after = client.get("/monitor/data").json()
    totals = after["totals"]
    assert totals["feedback"] == before["feedback"] + 20
    assert totals["predictions"] == before["predictions"] + 20
    right_before = round((before["accuracy"] or 0) * before["feedback"])
    assert totals["accuracy"] == pytest.approx((right_before + correct) / totals["feedback"])
    assert totals["accuracy_ci"] == pytest.approx(accuracy_ci)
    assert sum(w["feedback"] for w in after["windows"]) == totals["feedback"]
    assert sum(totals["class_shares"].values()) == pytest.approx(1)

    samples = metric_samples(client)
    assert samples[("capas_live_accuracy", ())] == pytest.approx(totals["accuracy"])
    per_class = [p["label"] for p in predictions]
    for label in set(per_class):
        key = ("capas_predictions_total", (("label", label),))
        assert samples[key] - samples_before.get(key, 0) == per_class.count(label)
    key = ("capas_requests_total", (("method", "POST"), ("route", "/predict"), ("status", "200")))
    assert samples[key] - samples_before.get(key, 0) == 3  # the first /predict of the server, run alone
    assert samples[("capas_request_latency_seconds_count", (("route", "/predict"),))] >= 3
    assert ("capas_request_latency_seconds_bucket", (("le", "0.05"), ("route", "/predict"))) in samples
    assert ("capas_drift_statistic", ()) in samples and ("capas_drift_p_value", ()) in samples
    refused = ("capas_requests_total", (("method", "POST"), ("route", "/predict"), ("status", "415")))
    assert client.post("/predict", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    assert metric_samples(client)[refused] == samples.get(refused, 0) + 1
    assert max(w["latency_ms"]["p99"] or 0 for w in after["windows"]) > 0  # the last may be a new, quiet one


def test_load_on_loopback_has_no_errors(server, test_images):
    """8 clients × 25 requests at once; every answer must be a correct 200."""
    images, _ = test_images
    bodies = [png(images[i]) for i in range(25)]
    errors: list[str] = []
    latencies: list[float] = []

    def client_thread() -> None:
        with httpx.Client(base_url=server, headers=AUTH, timeout=30) as c:
            for body in bodies:
                started = time.perf_counter()
                try:
                    response = c.post("/predict", files={"file": ("x.png", body, "image/png")})
                    if response.status_code != 200 or len(response.json()["predictions"]) != 1:
                        errors.append(f"{response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as error:
                    errors.append(repr(error))
                latencies.append(time.perf_counter() - started)

    with httpx.Client(base_url=server, headers=AUTH) as c:
        before = metric_samples(c)
    threads = [threading.Thread(target=client_thread) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == [] and len(latencies) == 200
    with httpx.Client(base_url=server, headers=AUTH) as c:
        after = metric_samples(c)
    images_done = after[("capas_batch_size_sum", ())] - before[("capas_batch_size_sum", ())]
    passes = after[("capas_batch_size_count", ())] - before[("capas_batch_size_count", ())]
    assert images_done == 200
    assert passes < 200, "concurrent requests should share forward passes"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_and_stops_on_ctrl_c(tiny_run):
    port = _free_port()
    env = {**os.environ, "CAPAS_TOKEN": TOKEN}
    process = subprocess.Popen(
        [sys.executable, "-m", "capas", "serve", str(tiny_run), "--port", str(port), "--max-batch", "4"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()  # first: reading the output of a server still running waits for good
                pytest.fail(f"no answer from /health: {process.communicate()[0]}")
            time.sleep(0.2)
        assert httpx.get(f"{url}/info").status_code == 401  # the token came from CAPAS_TOKEN
        info = httpx.get(f"{url}/info", headers=AUTH).json()
        assert info["serving"]["max_batch"] == 4
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output


def test_cli_refuses_a_bad_run_directory(tmp_path: Path):
    result = CliRunner().invoke(cli, ["serve", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "not a run directory" in result.output
    result = CliRunner().invoke(cli, ["serve", str(tmp_path), "--max-batch", "0"])
    assert result.exit_code == 2 and "--max-batch" in result.output
    for option in ("--max-body-mb", "--max-wait-ms"):
        for value in ("inf", "nan"):  # 'inf' MB was an OverflowError's traceback
            result = CliRunner().invoke(cli, ["serve", str(tmp_path), option, value])
            assert result.exit_code == 2 and "finite number" in result.output, (option, value, result.output)


def test_an_address_it_cannot_listen_on_is_one_line_naming_the_options(tiny_run):
    """A port in use was uvicorn's log lines after the model had loaded and warmed up, exit status 3;
    an unknown host was '[Errno -2] Name or service not known', naming neither the host nor --host."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["serve", str(tiny_run), "--port", str(port)])
    assert result.exit_code == 2, result.output
    assert f"cannot listen on 127.0.0.1:{port} (--host, --port): Address already in use" in result.output
    result = CliRunner().invoke(cli, ["serve", str(tiny_run), "--host", "no-such-host.invalid"])
    assert result.exit_code == 2, result.output
    assert "cannot listen on no-such-host.invalid:8000 (--host, --port)" in result.output


def test_a_queue_smaller_than_a_request_is_refused(tmp_path: Path, monkeypatch):
    """With CAPAS_MAX_QUEUE under max_images, a request of more images than the queue holds was
    answered 503 'server busy: 0 images are waiting …; retry later' however often it was retried."""
    monkeypatch.setenv("CAPAS_MAX_QUEUE", "4")
    result = CliRunner().invoke(cli, ["serve", str(tmp_path)])
    assert result.exit_code == 2
    assert "max_images (64) cannot exceed max_queue (4)" in " ".join(result.output.split())


@pytest.mark.parametrize("how", ["option", "environment"])
def test_an_empty_token_is_refused(tmp_path: Path, monkeypatch, how):
    """An empty token is no secret: the cookie it sets is an HMAC under the empty key, which anyone can
    compute, and a token turns the Host check off. `CAPAS_TOKEN=` (set, but empty) is how one comes."""
    if how == "environment":
        monkeypatch.setenv("CAPAS_TOKEN", "")
    result = CliRunner().invoke(cli, ["serve", str(tmp_path), *(["--token", ""] if how == "option" else [])])
    assert result.exit_code == 2
    source = "--token (CAPAS_TOKEN)" if how == "option" else "CAPAS_TOKEN"
    assert f"serve settings: {source}: an empty token would let anyone in" in " ".join(result.output.split())


def test_no_drift_sampling_is_refused(tmp_path: Path, monkeypatch):
    """CAPAS_DRIFT_PER_BATCH=0 fed drift nothing: /drift said 'collecting (0/50 inputs)' after any
    traffic while /metrics had capas_drift_enabled 1 and capas_drift_detected 0, a monitor that never tests."""
    monkeypatch.setenv("CAPAS_DRIFT_PER_BATCH", "0")
    result = CliRunner().invoke(cli, ["serve", str(tmp_path)])
    assert result.exit_code == 2
    assert "CAPAS_DRIFT_PER_BATCH: Input should be greater than or equal to 1" in " ".join(
        result.output.split()
    )


@pytest.mark.parametrize(
    "variable, value, message",
    [
        (
            "CAPAS_THREADS",
            "100000000000000000000",
            "CAPAS_THREADS: Input should be less than or equal to 1024",
        ),
        ("CAPAS_DECODE_THREADS", "5000", "CAPAS_DECODE_THREADS: Input should be less than or equal to 1024"),
        ("CAPAS_MAX_BODY_MB", "1e308", "CAPAS_MAX_BODY_MB: Input should be less than or equal to 1000"),
        (
            "CAPAS_HISTORY",
            "100000000000000000000",
            "CAPAS_HISTORY: Input should be less than or equal to 100000",
        ),
        (
            "CAPAS_DRIFT_WINDOW",
            "100000000000000000000",
            "CAPAS_DRIFT_WINDOW: Input should be less than or equal to 10000",
        ),
        (
            "CAPAS_DRIFT_PERMUTATIONS",
            "1000000",
            "CAPAS_DRIFT_PERMUTATIONS: Input should be less than or equal to 10000",
        ),
        ("CAPAS_HOST", "", "CAPAS_HOST: an empty address would bind every interface"),
        (
            "CAPAS_DRIFT_EVERY_S",
            "1e-7",
            "CAPAS_DRIFT_EVERY_S: Input should be greater than or equal to 0.1 (allowed: 0.1 to 86400)",
        ),
        (
            "CAPAS_BUCKET_S",
            "1e308",
            "CAPAS_BUCKET_S: Input should be less than or equal to 86400 (allowed: 0.1 to 86400)",
        ),
    ],
)
def test_settings_no_server_can_run_with_are_refused(tmp_path: Path, monkeypatch, variable, value, message):
    """Accepted before: threads, history or drift_window of 1e20 were overflow tracebacks at start-up, a
    max_body_mb of 1e308 one too (an infinite byte count), 10**6 drift permutations stalled it in its first
    drift test; an empty host bound every interface; drift_every_s 1e-7 kept a core busy on an idle server
    (its loop woke without pause), bucket_s 1e308 dated every chart window 1970."""
    monkeypatch.setenv(variable, value)
    result = CliRunner().invoke(cli, ["serve", str(tmp_path)])
    assert result.exit_code == 2
    assert f"serve settings: {message}" in " ".join(result.output.split())


def test_too_few_drift_permutations_to_ever_flag_drift_are_refused(tmp_path: Path, monkeypatch):
    """A permutation test's smallest p-value is 1 / (1 + permutations): with 50 at alpha 0.01 (1/51 =
    0.0196) no drift could ever be flagged, and the server started and monitored nothing."""
    monkeypatch.setenv("CAPAS_DRIFT_PERMUTATIONS", "99")  # 1/100 is not below 0.01 either
    result = CliRunner().invoke(cli, ["serve", str(tmp_path)])
    assert result.exit_code == 2
    assert (
        "drift_permutations (99) can never flag drift at drift_alpha 0.01: a permutation test's p-value is "
        "at least 1/(1 + permutations) = 0.01; raise CAPAS_DRIFT_PERMUTATIONS to at least 100 or "
        "CAPAS_DRIFT_ALPHA above 0.01"
    ) in " ".join(result.output.split())


@pytest.mark.parametrize(
    "option, message",
    [
        (["--workers-threads", "0"], "--workers-threads: Input should be greater than or equal to 1"),
        (["--max-body-mb", "1e308"], "--max-body-mb: Input should be less than or equal to 1000"),
        (["--host", ""], "--host: an empty address would bind every interface"),
    ],
)
def test_a_bad_option_is_named_as_typed(tmp_path: Path, option, message):
    """A bad value is named by where the user wrote it: `capas serve RUN --workers-threads 0` said
    'threads: …', a name the command line does not have (nor does the environment: CAPAS_THREADS)."""
    result = CliRunner().invoke(cli, ["serve", str(tmp_path), *option])
    assert result.exit_code == 2
    assert f"serve settings: {message}" in " ".join(result.output.split())
