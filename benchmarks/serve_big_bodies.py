"""/health's latency while clients send large /predict bodies, as base64 JSON and as multipart files.

One `capas serve` of benchmarks/serve.py's run (the Keras MNIST example, random weights) on loopback;
four client threads post the same ~9 MB of 256×256 noise PNGs back to back, as a JSON body of base64
strings or as multipart files, while this process times `/health` calls: what one large body costs
every other client while the server reads it. Both formats are measured in this one run, alternating,
each repeat its own load.

    python benchmarks/serve_big_bodies.py               # 20 /health calls, 3 repeats per format
    python benchmarks/serve_big_bodies.py --repeats 1   # proves the script works
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import free_port, health_while, make_run, wait_healthy

MEGABYTES = 9  # per request, as base64
CLIENTS = 4


def noise_png() -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def measure(url: str, image: bytes, count: int, mode: str, calls: int) -> list[float]:
    """/health latencies (s) while CLIENTS threads post `count` images per request in `mode`."""
    body = {"images": [base64.b64encode(image).decode()] * count}
    files = [("file", (f"{i}.png", image, "image/png")) for i in range(count)]
    statuses: list[int] = []

    def post(c: httpx.Client) -> None:
        response = c.post("/predict", json=body) if mode == "json" else c.post("/predict", files=files)
        statuses.append(response.status_code)

    # after 1 s: the clients' first bodies in flight
    waits = health_while(url, post, CLIENTS, calls, settle_s=1.0, pause_s=0.1)
    if set(statuses) != {200}:
        raise SystemExit(f"{mode}: /predict answered {sorted(set(statuses))}")
    return waits


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=20, help="/health calls per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers-threads", type=int, default=1, help="capas serve's torch threads")
    args = parser.parse_args()

    from capas.runs import machine_line

    image = noise_png()
    count = MEGABYTES * 10**6 // (len(image) * 4 // 3)
    results: dict[str, list[list[float]]] = {"json": [], "multipart": []}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = make_run(Path(tmp) / "keras-mnist")
        port = free_port()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "capas",
                "serve",
                str(run_dir),
                "--port",
                str(port),
                "--workers-threads",
                str(args.workers_threads),
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_healthy(port, server)
            for _ in range(args.repeats):
                for mode in results:
                    results[mode].append(measure(f"http://127.0.0.1:{port}", image, count, mode, args.calls))
        finally:
            server.terminate()
            server.wait()
    print(machine_line())
    print(
        f"load average {os.getloadavg()[0]:.1f}; {CLIENTS} clients, {count} images of {len(image):,} bytes a request"
    )
    print(f"{'body':<10} {'/health median ms':>18} {'per repeat':<16} {'max ms, per repeat':<22}")
    for mode, repeats in results.items():
        medians = [statistics.median(waits) * 1e3 for waits in repeats]
        maxima = [max(waits) * 1e3 for waits in repeats]
        print(
            f"{mode:<10} {statistics.median(medians):>18.0f} {' / '.join(f'{m:.0f}' for m in medians):<16} "
            f"{' / '.join(f'{m:.0f}' for m in maxima):<22}"
        )


if __name__ == "__main__":
    main()
