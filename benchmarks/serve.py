"""Serving speed: `capas serve` (FastAPI, micro-batched) against a minimal Flask server in the seed's style.

Both servers serve the same weights of the Keras MNIST example (examples/keras-mnist.yaml, 1,199,882
parameters) on loopback, one after the other in this one run; a load generator of N concurrent
clients (threads with keep-alive HTTP/1.1 connections, spread over a few processes so that the
generator's own GIL does not cap the rate) posts a 28×28 Fashion-MNIST PNG as multipart, the way
the seed's Flask app receives files. The weights are random (Keras' initialisation, seed 0): the
speed of a forward pass does not depend on their values, and no training time is spent.

    python benchmarks/serve.py            # 1, 8, 32 clients, 10 s each, median of 3 repeats
    python benchmarks/serve.py --quick    # 2 s each, one repeat: proves the script works
    python benchmarks/serve.py --tools python wrk --servers "capas serve"   # also measured by wrk

Two load generators: `python` (the threads above: a closed loop, each client sends its next request
when the previous answer is in) and `wrk` (apt-get install wrk; one thread, N connections, the same
body through benchmarks/wrk_predict.lua). Both run on the same cores as the server, as a user's
client on one machine would.

Targets (issue 5): at 32 clients, at least 10× the Flask baseline's requests/s; p99 < 50 ms at 8 clients.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOUNDARY = "capasbenchboundary"


def make_run(out: Path) -> Path:
    """A run directory of the Keras MNIST example with random weights, plus a drift reference."""
    from capas.data import default_preprocess, make_splits
    from capas.models import build_model
    from capas.runs import write_run
    from capas.spec import load_spec

    spec = load_spec(ROOT / "examples" / "keras-mnist.yaml")
    model = build_model(spec, seed=0).eval()
    splits = make_splits("fashion-mnist", limit=2000)
    preprocess = default_preprocess(spec.input_shape)
    write_run(
        out,
        spec=spec,
        model=model,
        preprocess=preprocess,
        classes=splits.train.classes,
        config={"note": "random weights for the serving benchmark"},
        history=[],
        test=None,
        reference=splits.val,
    )
    return out


def payload() -> bytes:
    """A multipart body with one Fashion-MNIST test image as PNG."""
    import io

    from PIL import Image

    from capas.data import make_splits

    image = make_splits("fashion-mnist", limit=2000).test.images[0, 0].numpy()
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    return head + buffer.getvalue() + f"\r\n--{BOUNDARY}--\r\n".encode()


def flask_server(run_dir: str, port: int) -> None:
    """The baseline, as the seed writes it: one request, one forward pass, Flask's threaded server."""
    import logging

    from flask import Flask, jsonify, request

    from capas.data import read_image
    from capas.runs import load_run

    run = load_run(run_dir)
    app = Flask("baseline")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log, as capas serve

    @app.route("/health")
    def health():
        return jsonify(status="ok")

    @app.route("/predict", methods=["POST"])
    def predict():
        image = read_image(request.files["file"].read())
        x = run.preprocess(image.unsqueeze(0))  # (1, C, H, W)
        probabilities = run.model.predict_proba(x)[0]
        index = int(probabilities.argmax())
        return jsonify(label=run.classes[index], index=index, probabilities=probabilities.tolist())

    app.run(host="127.0.0.1", port=port, threaded=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server on port {port} exited with status {process.returncode}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server on port {port} did not become healthy")


def health_while(url: str, request, clients: int, calls: int, settle_s: float, pause_s: float) -> list[float]:
    """/health latencies (s) timed from this thread while `clients` threads call `request(client)` back to
    back, each on a kept-alive httpx.Client of its own (after `settle_s`, one /health call every
    `pause_s`): what their requests cost every other client."""
    import httpx

    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while not stop.is_set():
                request(c)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(settle_s)
    waits = []
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            for _ in range(calls):
                started = time.perf_counter()
                c.get("/health").raise_for_status()
                waits.append(time.perf_counter() - started)
                time.sleep(pause_s)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return waits


def _client_process(
    port: int, body: bytes, threads: int, start_at: float, measure_from: float, stop_at: float, queue
) -> None:
    """`threads` clients, each on its own keep-alive connection, posting from `start_at` until `stop_at`;
    requests sent before `measure_from` warm up and are not counted. The latencies are those of the
    requests answered 200; the others are counted as errors."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine: list[float] = []
        failed = 0
        while time.time() < start_at:
            time.sleep(0.001)
        while (now := time.time()) < stop_at:
            try:
                connection.request("POST", "/predict", body=body, headers=headers)
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except OSError:
                ok = False
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            if now >= measure_from:  # a failed request is an error, not a request served
                if ok:
                    mine.append(time.time() - now)
                else:
                    failed += 1
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    pool = [threading.Thread(target=client) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    queue.put((latencies, errors[0]))


def load(port: int, body: bytes, clients: int, seconds: float, warmup: float) -> dict:
    """Requests/s and latency percentiles of `clients` concurrent clients over `seconds` (after a warm-up)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = min(clients, 4)
    start_at = time.time() + 1.5  # spawning takes a moment; everyone starts together
    measure_from = start_at + warmup
    stop_at = measure_from + seconds
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    workers = [
        context.Process(target=_client_process, args=(port, body, n, start_at, measure_from, stop_at, queue))
        for n in shares
    ]
    for worker in workers:
        worker.start()
    results = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    latencies = sorted(latency for part, _ in results for latency in part)
    errors = sum(e for _, e in results)
    total = len(latencies)
    return {
        "clients": clients,
        "requests": total,
        "errors": errors,
        "rps": total / seconds,
        "p50_ms": 1000 * latencies[total // 2] if total else float("nan"),
        "p99_ms": 1000 * latencies[min(total - 1, int(total * 0.99))] if total else float("nan"),
    }


def server_latency_counts(port: int) -> tuple[float, float]:
    """(/predict requests timed inside capas serve, of which within 50 ms), from /metrics' histogram:
    the server's own view, which leaves out time spent in the kernel's queues and waiting for a core."""
    from prometheus_client.parser import text_string_to_metric_families

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    total = within = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "capas_request_latency_seconds_bucket"
                and sample.labels.get("route") == "/predict"
            ):
                if sample.labels["le"] == "+Inf":
                    total = sample.value
                elif float(sample.labels["le"]) == 0.05:
                    within = sample.value
    return total, within


WRK_SCRIPT = ROOT / "benchmarks" / "wrk_predict.lua"
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _wrk_ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * UNITS[unit]


def wrk_load(port: int, body_file: Path, clients: int, seconds: float) -> dict:
    """The same measurement by wrk: one thread, `clients` keep-alive connections, --latency percentiles."""
    output = subprocess.run(
        [
            *("wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--latency"),
            *("-s", str(WRK_SCRIPT), f"http://127.0.0.1:{port}/predict"),
        ],
        env={**os.environ, "CAPAS_WRK_BODY": str(body_file)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    percentiles = dict(re.findall(r"^\s*(50|99)(?:\.0+)?%\s+(\S+)", output, re.MULTILINE))
    if set(percentiles) != {"50", "99"}:
        raise SystemExit(f"could not read the percentiles in wrk's output:\n{output}")
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    errors = (int(non_2xx.group(1)) if non_2xx else 0) + (
        sum(map(int, socket_errors.groups())) if socket_errors else 0
    )
    return {
        "clients": clients,
        "requests": requests,
        "errors": errors,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
        "p50_ms": _wrk_ms(percentiles["50"]),
        "p99_ms": _wrk_ms(percentiles["99"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 s per measurement, one repeat")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=None, help="per measurement (default 10, quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="median of this many (default 3, quick 1)")
    parser.add_argument(
        "--tools", nargs="+", choices=["python", "wrk"], default=["python"], help="load generators"
    )
    parser.add_argument(
        "--servers", nargs="+", choices=["capas serve", "flask"], default=["capas serve", "flask"]
    )
    parser.add_argument(
        "--flask", nargs=2, metavar=("RUN", "PORT"), help=argparse.SUPPRESS
    )  # the baseline's process
    args = parser.parse_args()
    if args.flask:
        return flask_server(args.flask[0], int(args.flask[1]))
    seconds = args.seconds or (2.0 if args.quick else 10.0)
    repeats = args.repeats or (1 if args.quick else 3)
    if "wrk" in args.tools and shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk), or leave it out of --tools")

    from capas.runs import environment

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = make_run(Path(tmp) / "keras-mnist")
        body = payload()
        body_file = Path(tmp) / "body.bin"
        body_file.write_bytes(body)
        ports = {"capas serve": free_port(), "flask": free_port()}
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        commands = {
            "capas serve": lambda: subprocess.Popen(
                [sys.executable, "-m", "capas", "serve", str(run_dir), "--port", str(ports["capas serve"])],
                env=env,
                stderr=subprocess.DEVNULL,
            ),
            "flask": lambda: subprocess.Popen(
                [sys.executable, __file__, "--flask", str(run_dir), str(ports["flask"])],
                env=env,
                stderr=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            ),
        }
        servers = {name: commands[name]() for name in args.servers}
        try:
            for name, process in servers.items():
                wait_healthy(ports[name], process)
            rows = []
            for clients in args.clients:
                for name in servers:
                    for tool in args.tools:
                        runs = []
                        for _ in range(repeats):
                            before = server_latency_counts(ports[name]) if name == "capas serve" else None
                            if tool == "wrk":
                                runs.append(wrk_load(ports[name], body_file, clients, seconds))
                            else:
                                runs.append(load(ports[name], body, clients, seconds, warmup=0.5))
                            if before is not None:
                                after = server_latency_counts(ports[name])
                                timed = after[0] - before[0]
                                runs[-1]["server_within_50ms"] = (after[1] - before[1]) / max(timed, 1)
                        runs.sort(key=lambda r: r["rps"])
                        rows.append(
                            {"server": name, "tool": tool, **runs[len(runs) // 2]}
                        )  # the median by req/s
                        row = rows[-1]
                        print(
                            f"{name:12s} {tool:6s} {clients:3d} clients: {row['rps']:8.1f} req/s  "
                            f"p50 {row['p50_ms']:6.1f} ms  p99 {row['p99_ms']:6.1f} ms  errors {row['errors']}  "
                            f"server-side within 50 ms {100 * row.get('server_within_50ms', float('nan')):.1f}%",
                            file=sys.stderr,
                            flush=True,
                        )
        finally:
            for process in servers.values():
                process.terminate()
                process.wait(30)

    print(
        f"\nServing the Keras MNIST example (random weights), multipart PNG 28×28, loopback; "
        f"{seconds:g} s per measurement, median of {repeats}\n"
    )
    print(
        "| server | load generator | clients | requests/s | p50 ms | p99 ms | errors | server-side ≤ 50 ms |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        inside = f"{100 * row['server_within_50ms']:.1f}%" if "server_within_50ms" in row else "–"
        print(
            f"| {row['server']} | {row['tool']} | {row['clients']} | {row['rps']:.1f} | {row['p50_ms']:.1f} "
            f"| {row['p99_ms']:.1f} | {row['errors']} | {inside} |"
        )
    by = {(r["server"], r["tool"], r["clients"]): r for r in rows}
    top = max(args.clients)
    for tool in args.tools:
        if ("flask", tool, top) in by and ("capas serve", tool, top) in by:
            ratio = by[("capas serve", tool, top)]["rps"] / max(by[("flask", tool, top)]["rps"], 1e-9)
            print(f"\nat {top} clients ({tool}): capas serve / flask = {ratio:.1f}× (target ≥ 10×)")
        if ("capas serve", tool, 8) in by:
            print(
                f"p99 at 8 clients ({tool}): {by[('capas serve', tool, 8)]['p99_ms']:.1f} ms (target ≤ 50 ms)"
            )
    print("\nenvironment:", json.dumps(environment()))
    print(
        "server threads: capas serve uses its defaults (max_batch 32, max_wait_ms 2, cores - 1 PyTorch threads);"
        " flask uses PyTorch's default thread count"
    )


if __name__ == "__main__":
    main()
