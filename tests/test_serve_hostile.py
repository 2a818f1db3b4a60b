"""`capas serve` under hostile input and overload (issue 14), against real uvicorn servers on loopback
ports: in a thread (`live_server`) or as the real `capas serve` process where memory is measured."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import hostile
from capas.cli import app as cli
from capas.data import make_splits
from capas.runs import REFERENCE, load_run
from serve_support import live_server, micro_batcher, png


@pytest.fixture(scope="module")
def good_png():
    return png(make_splits("fashion-mnist", limit=2000).test.images[0])


def post(client: httpx.Client, case: hostile.Case) -> httpx.Response:
    return client.request(case.method, case.path, content=case.body, headers=case.headers)


# 1 (memory) --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def cli_server(run_dir: Path, *options: str):
    """The real `capas serve` process on a free loopback port; yields (base URL, process)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "capas", "serve", str(run_dir), "--port", str(port), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read().decode()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "capas serve did not become healthy"
            time.sleep(0.2)
        yield url, process
    finally:
        process.terminate()
        process.wait(30)


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_large_pixel_images_cost_memory_by_model_size_not_image_size(tiny_run):
    palette = hostile.palette_png()  # 20 KB on the wire, 4000×4000 = 16 M pixels
    with (
        cli_server(tiny_run, "--workers-threads", "1") as (url, process),
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        body, headers = hostile.multipart(("a.png", hostile.palette_png(64)))
        assert client.post("/predict", content=body, headers=headers).status_code == 200
        before = peak_rss_mb(process.pid)
        # 3 × 16 M pixels: within the per-request budget (48 M)
        body, headers = hostile.multipart(*[(f"p{i}.png", palette) for i in range(3)])
        response = client.post("/predict", content=body, headers=headers)
        assert response.status_code == 200, response.text
        grown = peak_rss_mb(process.pid) - before
        # 8 × 16 M pixels in one request: refused from the headers, before decoding
        body, headers = hostile.multipart(*[(f"p{i}.png", palette) for i in range(8)])
        refused = client.post("/predict", content=body, headers=headers)
        grown_after_refusal = peak_rss_mb(process.pid) - before
    print(f"peak RSS grew {grown:.0f} MB for 3 × 16 M pixels, {grown_after_refusal:.0f} MB after the refusal")
    # Full-size decoding stacked 3 × 48 MB of RGB and converted it to 3 × 192 MB of float32 (~750 MB);
    # decoding one image at a time and shrinking it leaves one 64 MB RGBA image at a time.
    assert grown < 200
    assert refused.status_code == 413 and "128,000,000 pixels" in refused.json()["detail"]
    assert grown_after_refusal < 200


# 2 (event loop) ---------------------------------------------------------------------------------


def _health_waits(
    url: str, body: bytes | None, headers: dict, clients: int, calls: int, path: str = "/predict"
) -> tuple[list, list]:
    """/health's latencies (s) over `calls` calls while `clients` clients post `body` to `path` back to
    back (GET it if `body` is None); and the statuses of their requests."""
    stop = threading.Event()
    statuses = []

    def hammer():
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                response = (
                    client.get(path, headers=headers)
                    if body is None
                    else client.post(path, content=body, headers=headers)
                )
                statuses.append(response.status_code)

    with ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(hammer)
        time.sleep(0.5)
        waits = []
        with httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(calls):
                start = time.perf_counter()
                assert client.get("/health").status_code == 200
                waits.append(time.perf_counter() - start)
                time.sleep(0.05)
        stop.set()
    return waits, statuses


def test_health_answers_while_large_pixel_images_decode(tiny_run):
    palette = hostile.palette_png()
    body, headers = hostile.multipart(*[(f"p{i}.png", palette) for i in range(3)])
    with live_server(run_dir=tiny_run, threads=1) as (url, _):
        waits, statuses = _health_waits(url, body, headers, clients=4, calls=20)
    print(f"/health while decoding: max {max(waits) * 1e3:.0f} ms, median {sorted(waits)[10] * 1e3:.0f} ms")
    assert statuses and set(statuses) == {200}
    # Decoded on the event loop, each 48 M-pixel request stalled every other request (~1 s here): nearly
    # every call waited. The 90th percentile, not the maximum: in the suite, beside another test file's
    # worker, one call in 20 once waited 1.3 s (alone: at most 8-11 ms in three runs)
    assert sorted(waits)[17] < 0.3


def test_health_answers_while_large_json_bodies_are_parsed(tiny_run):
    """A JSON body was parsed and its base64 decoded on the event loop: a 23 MB body of base64 broken by
    spaces (2.9 M pieces to join) held it for ~0.5 s, and /health waited. Now a decode thread does it."""
    body = json.dumps({"images": ["Q U F B " * 45_000] * 64}).encode()
    with live_server(run_dir=tiny_run, threads=1, max_body_mb=25) as (url, _):
        waits, statuses = _health_waits(url, body, {"Content-Type": "application/json"}, clients=1, calls=10)
    print(
        f"/health while parsing JSON: median {sorted(waits)[5] * 1e3:.0f} ms, max {max(waits) * 1e3:.0f} ms"
    )
    assert statuses and set(statuses) == {422}  # "AAA…" is no image
    assert sorted(waits)[5] < 0.15


def test_health_answers_while_clients_fetch_a_large_info(tiny_run, tmp_path):
    """/info was encoded again at every call, on the event loop: a 1,000-class run's (2 MB, nearly all
    its confusion matrix) took ~50 ms a call, and /health waited a median 185 ms while 4 clients fetched
    it. It is fixed once the run is loaded, so it is encoded once. A 1,000-class matrix in test.json
    stands in for such a run."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    test = json.loads((run / "test.json").read_text())
    test["confusion_matrix"] = [[7] * 1000] * 1000
    (run / "test.json").write_text(json.dumps(test))
    with live_server(run_dir=run, threads=1) as (url, _):
        waits, statuses = _health_waits(url, None, {}, clients=4, calls=10, path="/info")
    print(
        f"/health while /info is fetched: median {sorted(waits)[5] * 1e3:.0f} ms, max {max(waits) * 1e3:.0f} ms"
    )
    assert statuses and set(statuses) == {200}
    assert sorted(waits)[5] < 0.05


def test_metrics_and_monitor_data_are_written_off_the_event_loop(tiny_run):
    """Writing out /metrics ran on the event loop: ~35 ms a scrape for a 1,000-class server (0.35 s the
    first), and the first /monitor/data poll after a busy hour summed up its windows there (~0.1 s), every
    other client waiting. Both routes now run in the server's thread pool: a collector in the server's
    own registry, and the monitor's snapshot, see no running event loop in their thread."""

    def loop_running() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    seen = {}

    class Probe:
        def collect(self):
            seen["/metrics"] = loop_running()
            return []

    with live_server(run_dir=tiny_run, threads=1) as (url, app):
        server = app.state.server
        server.metrics.registry.register(Probe())
        snapshot = server.monitor.snapshot

        def watched_snapshot() -> bytes:
            seen["/monitor/data"] = loop_running()
            return snapshot()

        server.monitor.snapshot = watched_snapshot
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/metrics").status_code == 200
            assert client.get("/monitor/data").status_code == 200
    assert seen == {"/metrics": False, "/monitor/data": False}


# 3 (overload) -----------------------------------------------------------------------------------


def test_a_full_queue_answers_503_with_retry_after(tiny_run, good_png):
    body, headers = hostile.multipart(*[(f"{i}.png", good_png) for i in range(4)])
    with live_server(
        run_dir=tiny_run, threads=1, max_batch=1, max_queue=4, max_images=4, decode_threads=4
    ) as (url, _):

        def client_loop(_):
            got = []
            with httpx.Client(base_url=url, timeout=60) as client:
                for _ in range(15):
                    response = client.post("/predict", content=body, headers=headers)
                    got.append((response.status_code, response.headers.get("retry-after")))
            return got

        with ThreadPoolExecutor(16) as pool:
            results = [r for part in pool.map(client_loop, range(16)) for r in part]
    statuses = {status for status, _ in results}
    print({status: sum(1 for s, _ in results if s == status) for status in statuses})
    assert statuses == {200, 503}
    assert all(retry == "1" for status, retry in results if status == 503)


def test_a_stalled_upload_gets_408_and_frees_the_connection(tiny_run):
    with live_server(run_dir=tiny_run, read_timeout_s=1.0) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n" + b'{"images": ["'
            )
            start = time.monotonic()
            answer = sock.recv(65536)
            waited = time.monotonic() - start
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert 0.8 < waited < 5


def test_an_answer_before_the_body_is_in_closes_the_connection(tiny_run):
    """A request refused before its body is read leaves the rest of that body unread: the connection
    must close. It stayed open, uvicorn discarding whatever came, and a client trickling a byte now and
    then held it past every timeout (read, keep-alive, header): CAPAS_MAX_CONNECTIONS such clients kept
    the server answering 503 to everyone else for as long as they liked."""
    head = b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: %s\r\n%s\r\n"
    length = b"Content-Length: 100000\r\n"
    chunk = b"%x\r\n%s\r\n" % (1_100_000, b"a" * 1_100_000)
    cases = {
        "413 Content-Length": (
            413,
            head % (b"/predict", b"localhost", b"application/json", b"Content-Length: 10000000\r\n"),
        ),
        "413 chunked": (
            413,
            head % (b"/predict", b"localhost", b"application/json", b"Transfer-Encoding: chunked\r\n")
            + chunk,
        ),
        "413 feedback": (413, head % (b"/feedback", b"localhost", b"application/json", length) + b"a" * 5000),
        "415": (415, head % (b"/predict", b"localhost", b"text/plain", length) + b"a"),
        "421": (421, head % (b"/predict", b"evil.example", b"application/json", length) + b"a"),
        "408": (408, head % (b"/predict", b"localhost", b"application/json", length) + b"{"),
    }
    with live_server(run_dir=tiny_run, max_body_mb=1.0, read_timeout_s=0.5) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        for case, (status, request_start) in cases.items():
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(request_start)
                answer, headers, _ = read_answer(sock)
                sock.settimeout(1)  # keep-alive would close it only after 5 s
                assert (answer, headers.get("connection")) == (status, "close"), case
                assert sock.recv(1) == b"", case


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer: (status, lower-case headers, body); status 0 if the server closed without one."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            assert not data, f"closed mid-answer: {data!r}"
            return 0, {}, b""
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    return int(status.split()[1]), headers, body


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_slow_headers_get_408_and_free_the_connection(tiny_run, parser):
    """A slowloris client (a header byte every 0.3 s, never the blank line) is cut off after
    header_timeout_s, a silent connection closed; slow but complete headers, and a kept-alive
    connection idle for longer than header_timeout_s (but less than keep_alive_s), are served."""
    timeout = 1.0
    head = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with live_server(run_dir=tiny_run, header_timeout_s=timeout, keep_alive_s=3.0, parser=parser) as (url, _):
        port = int(url.rsplit(":", 1)[1])

        def connect() -> socket.socket:
            return socket.create_connection(("127.0.0.1", port), timeout=5)

        def slowloris():
            with connect() as sock:
                start = time.monotonic()
                # a byte every 0.3 s: none arrives just as the server closes (that would reset the
                # connection before its 408 is read)
                assert not hostile.slowloris(sock, every=0.3, seconds=timeout + 2), "not cut off"
                answer = read_answer(sock)
                closed = sock.recv(1) == b""
                return answer, closed, time.monotonic() - start

        def silent():
            with connect() as sock:
                start = time.monotonic()
                return read_answer(sock)[0], time.monotonic() - start

        def slow_but_complete():
            with connect() as sock:
                start = time.monotonic()
                assert hostile.trickle(sock, head, every=0.015), "cut off"
                sent = time.monotonic() - start
                return read_answer(sock)[0], sent

        def kept_alive():
            with connect() as sock:
                sock.sendall(head)
                first = read_answer(sock)[0]
                time.sleep(1.5 * timeout)  # idle: keep_alive_s (3 s) governs, not header_timeout_s
                sock.sendall(head)
                return first, read_answer(sock)[0]

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(f) for f in (slowloris, silent, slow_but_complete, kept_alive)]
            time.sleep(0.5)  # the slowloris client is mid-head: others are served meanwhile
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
            (status, headers, body), closed, slow_waited = futures[0].result()
            silent_status, silent_waited = futures[1].result()
            complete_status, sent = futures[2].result()
            assert futures[3].result() == (200, 200)
    print(f"{parser}: slowloris cut off after {slow_waited:.2f} s, silent after {silent_waited:.2f} s")
    assert status == 408 and headers["connection"] == "close" and closed
    assert "CAPAS_HEADER_TIMEOUT_S" in json.loads(body)["detail"]
    assert timeout * 0.9 < slow_waited < timeout + 1.5
    assert silent_status == 0 and timeout * 0.9 < silent_waited < timeout + 1.5
    assert complete_status == 200 and sent > timeout / 2  # its head arrived over more than half the limit


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_an_oversized_request_head_is_cut_off(tiny_run, parser):
    """A header streamed past max_header_kb gets 431 (h11's own limit: uvicorn's 400) and the
    connection closes: the server reads no more of it, so it cannot keep the event loop busy (a
    90 MB header stalled every client for 11 s). A head within the limit is served."""
    with live_server(run_dir=tiny_run, max_header_kb=16, parser=parser) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Pad: ")
            assert not hostile.trickle(sock, b"a" * 4_000_000, every=0.01, size=4096), "not cut off"
            status, headers, body = read_answer(sock)
            assert sock.recv(1) == b""  # closed
        assert httpx.get(f"{url}/health", headers={"X-Pad": "a" * 8_000}, timeout=5).status_code == 200
    if parser == "httptools":
        assert status == 431 and "CAPAS_MAX_HEADER_KB" in json.loads(body)["detail"], (status, body)
        assert headers["connection"] == "close"
    else:
        assert status == 400, (status, body)


def split_answers(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The HTTP/1.1 answers (status, lower-case headers, body) one after another in `data`."""
    answers = []
    while data:
        head, data = data.split(b"\r\n\r\n", 1)
        status, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
        length = int(headers["content-length"])
        answers.append((int(status.split()[1]), headers, data[:length]))
        data = data[length:]
    return answers


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_malformed_pipelined_request_leaves_the_answer_before_it_alone(tiny_run, parser):
    """A request pipelined behind another with bytes the parser refuses: the first gets its own answer,
    then the 400 comes, as JSON naming what was wrong, and the connection closes. httptools' 400 went
    out at once, so the client read 'Invalid HTTP request received.' as the answer to its valid
    request, whose real answer was lost."""
    with live_server(run_dir=tiny_run, parser=parser) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(
                b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
                b"GET /info HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\n"
            )
            received = b""
            while chunk := sock.recv(65536):  # until the server closes
                received += chunk
    first, second = split_answers(received)
    assert first[0] == 200 and json.loads(first[2])["status"] == "ok", first
    status, headers, body = second
    assert status == 400 and headers["connection"] == "close", second
    assert json.loads(body)["detail"].startswith("request: not valid HTTP/1.1 ("), body


def test_connections_beyond_the_limit_get_503(tiny_run):
    """max_connections connections are served, one more gets 503. uvicorn's limit counts the connection
    asking: given max_connections as it was, 3 open connections made a 4th answered 503 with
    CAPAS_MAX_CONNECTIONS=4, and CAPAS_MAX_CONNECTIONS=1 answered 503 to every request."""
    with live_server(run_dir=tiny_run, max_connections=4) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        try:
            time.sleep(0.3)
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # the 4th
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            time.sleep(0.3)
            response = httpx.get(f"{url}/health", timeout=10)
            assert response.status_code == 503
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.3)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_a_client_that_reads_none_of_its_answer_is_cut_off(tiny_run):
    """A client that pipelines large GETs and reads nothing held its connection forever once the
    answers filled the socket buffers: uvicorn times no write, and a closed connection waits for its
    unsent bytes: CAPAS_MAX_CONNECTIONS such clients kept the server answering 503 to all others.
    Cut off (as when such a client hangs up), the answer being written is not a 500 with a traceback:
    uvicorn marked only the latest pipelined request as disconnected, not the one being answered."""
    records = Records()
    logger = logging.getLogger("")
    logger.addHandler(records)
    try:
        # a timeout well above the first check's delay: on a loaded machine 0.5 s had passed before it
        with live_server(run_dir=tiny_run, max_connections=1, send_timeout_s=2.0) as (url, _):
            port = int(url.rsplit(":", 1)[1])
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", port))
                sock.sendall(b"GET /docs-assets/swagger-ui-bundle.js HTTP/1.1\r\nHost: localhost\r\n\r\n" * 8)
                time.sleep(0.3)
                assert httpx.get(f"{url}/health", timeout=5).status_code == 503  # the connection is held
                deadline = time.monotonic() + 20
                while (status := httpx.get(f"{url}/health", timeout=5).status_code) != 200:
                    assert status == 503 and time.monotonic() < deadline  # until it is cut off
                    time.sleep(0.2)
    finally:
        logger.removeHandler(records)
    bad = [r for r in records.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_a_client_leaving_mid_upload_logs_no_traceback_and_is_not_a_500(tiny_run, good_png):
    with live_server(run_dir=tiny_run) as (url, _):
        records = Records()
        loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "capas.serve", "")]
        for logger in loggers:
            logger.addHandler(records)
        try:
            port = int(url.rsplit(":", 1)[1])
            body, headers = hostile.multipart(("a.png", good_png * 50))
            for _ in range(3):
                hostile.abandon_upload(port, body, headers["Content-Type"], wait=0.2)
            time.sleep(0.5)
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
        finally:
            for logger in loggers:
                logger.removeHandler(records)
    bad = [r for r in records.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]
    assert 'route="/predict",status="500"' not in metrics
    assert 'route="/predict",status="499"' in metrics


# 4 (isolation) ----------------------------------------------------------------------------------


def test_one_bad_request_in_a_batch_fails_only_itself(tiny_run):
    """Four requests batched into one forward pass, one of them with inputs the model cannot take."""
    run = load_run(tiny_run)
    good = run.preprocess.each(list(make_splits("fashion-mnist", limit=2000).test.images[:3]))
    bad = torch.zeros(1, 2, 28, 28)  # two channels: the first convolution refuses it

    async def scenario():
        batcher = micro_batcher(run, 32)
        await batcher.start()
        sizes = []
        batcher.on_batch = sizes.append
        try:
            with batcher.receiving():  # another request is on its way: the batch waits for all four
                tasks = [
                    asyncio.create_task(batcher.predict(x)) for x in (good[:1], bad, good[1:2], good[2:])
                ]
                await asyncio.sleep(0.05)
            return await asyncio.gather(*tasks, return_exceptions=True), sizes
        finally:
            await batcher.stop()

    results, sizes = asyncio.run(scenario())
    assert isinstance(results[1], RuntimeError)
    for position, result in zip((0, 2, 3), (results[0], results[2], results[3]), strict=True):
        assert not isinstance(result, Exception), result
        expected = run.model.predict_proba(good[position - (position > 1) : position - (position > 1) + 1])
        assert torch.allclose(result.probabilities, expected, atol=1e-5)
    assert sizes == [1, 1, 1]  # the batch of four failed (not counted), then each ran alone


def test_no_forward_pass_exceeds_max_batch(tiny_run):
    """A request of 10 images with max_batch 4 is run in slices, and requests that would overflow a
    batch wait for the next one; each image still gets its own probabilities."""
    run = load_run(tiny_run)
    images = run.preprocess.each(list(make_splits("fashion-mnist", limit=2000).test.images[:15]))

    async def scenario():
        sizes = []
        batcher = micro_batcher(run, 4, drift_per_batch=2, on_batch=sizes.append)
        await batcher.start()
        sizes.clear()  # the warm-up's passes
        try:
            with batcher.receiving():
                tasks = [
                    asyncio.create_task(batcher.predict(x)) for x in (images[:10], images[10:13], images[13:])
                ]
                await asyncio.sleep(0.05)
            return await asyncio.gather(*tasks), sizes
        finally:
            await batcher.stop()

    outputs, sizes = asyncio.run(scenario())
    assert max(sizes) <= 4 and sum(sizes) == 15, sizes
    got = torch.cat([output.probabilities for output in outputs])
    assert torch.allclose(got, run.model.predict_proba(images), atol=1e-5)
    assert len(outputs[0].embeddings) == len(outputs[0].input_stats) <= 10


# 5 (image modes through the server) -------------------------------------------------------------


def test_image_modes_predict_as_their_8_bit_equivalents(tiny_run):
    """A 16-bit, 32-bit integer and 32-bit float version of one ramp predict what its 8-bit PNG predicts."""
    ramp = torch.from_numpy(hostile.gradient("float64", 255).round().astype("uint8")).unsqueeze(
        0
    )  # (1, 28, 28)
    with live_server(run_dir=tiny_run) as (url, _), httpx.Client(base_url=url, timeout=30) as client:

        def probabilities(name: str, data: bytes) -> list[float]:
            body, headers = hostile.multipart((name, data))
            response = client.post("/predict", content=body, headers=headers)
            assert response.status_code == 200, response.text
            return response.json()["predictions"][0]["probabilities"]

        reference = probabilities("ramp.png", png(ramp))
        for name in ("grey16.png", "int32.tiff", "float32.tiff"):
            got = probabilities(name, hostile.images()[name])
            # equal up to one grey level of rounding (clipped, a 16-bit ramp was 99% white)
            assert max(abs(a - b) for a, b in zip(got, reference, strict=True)) < 0.01, name


# 6 (bad JSON, long ids, damaged run files) -------------------------------------------------------


def test_deeply_nested_json_and_huge_ids_get_small_4xx_answers(tiny_run):
    with live_server(run_dir=tiny_run) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        nested = {"Content-Type": "application/json"}
        response = client.post("/predict", content=hostile.nested_json(), headers=nested)
        assert response.status_code == 400 and "nested" in response.json()["detail"]
        response = client.post("/feedback", content=hostile.nested_json(), headers=nested)
        assert response.status_code == 413  # refused while it streams in: feedback bodies are small
        response = client.post("/feedback", json={"id": "x" * 9_000_000, "label": 0})
        assert response.status_code == 413 and len(response.content) < 1000
        response = client.post("/feedback", json={"id": "x" * 1_000, "label": 0})
        assert response.status_code == 422
        assert len(response.content) < 1000 and "id" in response.json()["detail"]


def damaged_copy(tiny_run: Path, tmp_path: Path, name: str, content: bytes) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / name).write_bytes(content)
    return run


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("test.json", b'{"accuracy": 0.8', ["test.json", "damaged"]),
        ("metrics.jsonl", b'{"epoch": 1}\n{"epo', ["metrics.jsonl", "damaged"]),
        (REFERENCE, None, ["reference", "features", "another model"]),
    ],
)
def test_damaged_run_files_are_a_clear_start_up_error(tiny_run, tmp_path, name, content, words):
    if content is None:  # a drift reference of another model: 7 features per image
        run = damaged_copy(tiny_run, tmp_path, "unused", b"")
        save_file({"embeddings": torch.rand(50, 7), "input_stats": torch.rand(50, 2)}, str(run / REFERENCE))
    else:
        run = damaged_copy(tiny_run, tmp_path, name, content)
    result = CliRunner().invoke(cli, ["serve", str(run), "--port", str(free_port())])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, result.output


# 7 (DNS rebinding) ------------------------------------------------------------------------------


def test_without_a_token_only_this_servers_names_are_answered(tiny_run):
    with live_server(run_dir=tiny_run) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        port = url.rsplit(":", 1)[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
            assert client.get("/info", headers={"Host": host}).status_code == 200, host
        for host in (f"attacker.example:{port}", "127.0.0.1.attacker.example", "localhost.evil"):
            response = client.get("/monitor/data", headers={"Host": host})
            assert response.status_code == 421, host
            assert "Host" in response.json()["detail"]


# the corpus -------------------------------------------------------------------------------------


def test_the_hostile_corpus_gets_the_expected_4xx_and_the_server_keeps_serving(tiny_run, good_png):
    cases = hostile.cases()
    with live_server(run_dir=tiny_run) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        for case in cases:
            response = post(client, case)
            assert response.status_code in case.expect, (case.name, response.status_code, response.text[:300])
            if response.status_code >= 400:
                assert len(response.content) < 2000, case.name  # nothing is echoed back
                json.loads(response.content)
            body, headers = hostile.multipart(("good.png", good_png))
            assert client.post("/predict", content=body, headers=headers).status_code == 200, case.name


def test_the_server_caps_glibc_malloc_arenas():
    """The soak's unbounded growth came from per-thread malloc arenas; on glibc the cap must take."""
    import platform

    from capas.deploy.serve.app import limit_malloc_arenas

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt's arena cap is glibc's")
    assert limit_malloc_arenas() is True
