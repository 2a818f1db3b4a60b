"""/health's latency while clients scrape /metrics of a 1,000-class server.

A 1,000-class model's /metrics holds a prediction counter per class (every class appears from the
start), so writing it out takes tens of milliseconds; capas serve writes it out in its thread pool,
not on the event loop. One `capas serve` of a run with 1,000 classes (Flatten → Dense(1000) on 28×28
images, random weights) on loopback; four client threads scrape `/metrics` back to back while this
process times `/health` calls, with `/predict` traffic before it so that the counters are not all 0.
A repeat without scrapers, in the same run, gives the quiet baseline.

    python benchmarks/serve_scrape.py               # 40 /health calls, 3 repeats each
    python benchmarks/serve_scrape.py --repeats 1   # proves the script works
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import free_port, health_while, wait_healthy

CLASSES = 1000
SCRAPERS = 4


def make_run(out: Path) -> Path:
    """A run directory of a 1,000-class model with random weights (no drift reference)."""
    from capas.data import default_preprocess
    from capas.models import build_model
    from capas.runs import write_run
    from capas.spec import ModelSpec

    spec = ModelSpec.from_dict(
        {
            "name": "thousand-classes",
            "input_shape": [28, 28, 1],
            "layers": ["Flatten", {"Dense": {"units": CLASSES, "activation": "softmax"}}],
        }
    )
    write_run(
        out,
        spec=spec,
        model=build_model(spec, seed=0).eval(),
        preprocess=default_preprocess(spec.input_shape),
        classes=tuple(f"class_{i:04d}" for i in range(CLASSES)),
        config={"note": "random weights for the /metrics benchmark"},
        history=None,
        test=None,
    )
    return out


def png() -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def measure(url: str, scrapers: int, calls: int) -> tuple[list[float], list[float]]:
    """(/health latencies, /metrics scrape times) in s while `scrapers` threads scrape back to back."""
    scrapes: list[float] = []
    statuses: list[int] = []

    def scrape(c: httpx.Client) -> None:
        started = time.perf_counter()
        response = c.get("/metrics")
        scrapes.append(time.perf_counter() - started)
        statuses.append(response.status_code)

    waits = health_while(url, scrape, scrapers, calls, settle_s=0.5, pause_s=0.05)
    if statuses and set(statuses) != {200}:
        raise SystemExit(f"/metrics answered {sorted(set(statuses))}")
    return waits, scrapes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=40, help="/health calls per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from capas.runs import machine_line

    results: dict[str, list[tuple[list[float], list[float]]]] = {"quiet": [], "scraped": []}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = make_run(Path(tmp) / "thousand-classes")
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "capas", "serve", str(run_dir), "--port", str(port)],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(port, server)
            with httpx.Client(base_url=url, timeout=60) as c:
                image = png()
                for _ in range(50):  # predictions spread over the classes' counters
                    files = [("file", (f"{i}.png", image, "image/png")) for i in range(8)]
                    c.post("/predict", files=files).raise_for_status()
                lines = c.get("/metrics").text.count("\n")
            for _ in range(args.repeats):
                for mode in results:
                    results[mode].append(measure(url, SCRAPERS if mode == "scraped" else 0, args.calls))
        finally:
            server.terminate()
            server.wait()
    print(machine_line())
    print(f"load average {os.getloadavg()[0]:.1f}; {CLASSES} classes, /metrics {lines:,} lines")
    print(
        f"{'scrapers':<9} {'/health median ms':>18} {'per repeat':<16} {'max ms, per repeat':<20} "
        f"{'/metrics median ms':>18} {'scrapes':>8}"
    )
    for mode, repeats in results.items():
        medians = [statistics.median(waits) * 1e3 for waits, _ in repeats]
        maxima = [max(waits) * 1e3 for waits, _ in repeats]
        scrapes = [s for _, run in repeats for s in run]
        scrape = f"{statistics.median(scrapes) * 1e3:.0f}" if scrapes else "—"
        print(
            f"{SCRAPERS if mode == 'scraped' else 0:<9} {statistics.median(medians):>18.0f} "
            f"{' / '.join(f'{m:.0f}' for m in medians):<16} {' / '.join(f'{m:.0f}' for m in maxima):<20} "
            f"{scrape:>18} {len(scrapes):>8}"
        )


if __name__ == "__main__":
    main()
