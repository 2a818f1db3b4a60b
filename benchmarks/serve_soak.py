"""Soak test of `capas serve`: a steady 80% of its measured maximum throughput for 60 s, with the
hostile corpus (tests/hostile) interleaved, on the Keras MNIST example (random weights, as
benchmarks/serve.py).

1. The maximum: `--probe-clients` closed-loop clients (benchmarks/serve.py's generator) for
   `--probe-seconds`; its requests/s is the maximum.
2. The soak: good requests (a 28×28 Fashion-MNIST PNG) sent open-loop at `--load` × that rate, on
   a fixed schedule (latency is measured from each request's scheduled time, so a stalled server
   cannot hide behind a slowed-down client), while another thread sends one hostile request every
   `--hostile-every` seconds, cycling through the corpus plus uploads abandoned halfway.
3. The server's resident memory (VmRSS) is sampled every 0.5 s; its peak (VmHWM) is read at the end.

    python benchmarks/serve_soak.py               # 60 s at 80%
    python benchmarks/serve_soak.py --seconds 10  # a shorter check

Passes when good requests had 0 errors, no answer was a 5xx, every hostile request got one of its
expected statuses, and the memory at the end is within `--rss-slack-mb` of the memory after warm-up.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

from serve import BOUNDARY, free_port, load, make_run, payload, wait_healthy  # noqa: E402

import hostile  # noqa: E402  (tests/hostile: the corpus)


def memory_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")


def good_requests(port: int, body: bytes, rate: float, start: float, stop: float, workers: int) -> dict:
    """Open loop: request i is due at start + i / rate; `workers` threads with keep-alive connections
    take the next due slot. Latency counts from the due time."""
    slots = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    transport_errors = [0]
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}

    def worker() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            with lock:
                due = start + next(slots) / rate
            if due >= stop:
                return
            time.sleep(max(0.0, due - time.time()))
            try:
                connection.request("POST", "/predict", body=body, headers=headers)
                response = connection.getresponse()
                response.read()
                status = response.status
            except OSError:
                status = 0
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            with lock:
                latencies.append(time.time() - due)
                if status == 0:
                    transport_errors[0] += 1
                else:
                    statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "statuses": statuses,
        "transport_errors": transport_errors[0],
        "p50_ms": 1000 * latencies[n // 2] if n else float("nan"),
        "p99_ms": 1000 * latencies[min(n - 1, int(n * 0.99))] if n else float("nan"),
    }


def hostile_requests(port: int, stop: float, every: float, good_body: bytes, once: bool = False) -> dict:
    """One hostile request every `every` seconds until `stop` (or one pass), cycling through the corpus."""
    cases = hostile.cases()
    outcome = {"sent": 0, "unexpected": [], "server_errors": 0, "abandoned": 0}
    for i in itertools.count():
        if time.time() >= stop or (once and i > len(cases)):
            return outcome
        if i % (len(cases) + 1) == len(cases):
            hostile.abandon_upload(
                port, good_body * 20, f"multipart/form-data; boundary={BOUNDARY}", wait=0.05
            )
            outcome["abandoned"] += 1
        else:
            case = cases[i % (len(cases) + 1)]
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            try:
                connection.request(case.method, case.path, body=case.body or None, headers=case.headers)
                response = connection.getresponse()
                response.read()
                status = response.status
            except OSError as error:  # the server may answer 413 and close before a huge body is sent
                status = -1 if case.expect == (413,) else 0
                if status == 0:
                    outcome["unexpected"].append(f"{case.name}: {error}")
            finally:
                connection.close()
            outcome["sent"] += 1
            if status >= 500:
                outcome["server_errors"] += 1
            if status > 0 and status not in case.expect:
                outcome["unexpected"].append(f"{case.name}: {status}")
        time.sleep(every)
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="soak duration")
    parser.add_argument("--load", type=float, default=0.8, help="fraction of the measured maximum")
    parser.add_argument("--probe-seconds", type=float, default=10.0)
    parser.add_argument("--probe-clients", type=int, default=32)
    parser.add_argument("--hostile-every", type=float, default=0.25, help="seconds between hostile requests")
    parser.add_argument("--workers", type=int, default=16, help="threads sending the good requests")
    parser.add_argument("--rss-slack-mb", type=float, default=100.0)
    args = parser.parse_args()

    from capas.runs import environment

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = make_run(Path(tmp) / "keras-mnist")
        body = payload()
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "capas", "serve", str(run_dir), "--port", str(port)],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_healthy(port, server)
            probe = load(port, body, args.probe_clients, args.probe_seconds, warmup=1.0)
            rate = args.load * probe["rps"]
            print(
                f"maximum: {probe['rps']:.1f} req/s ({args.probe_clients} closed-loop clients, "
                f"{args.probe_seconds:g} s); soak at {rate:.1f} req/s for {args.seconds:g} s",
                file=sys.stderr,
                flush=True,
            )
            # Warm-up: the corpus once, so the allocator's arenas hold what decoding needs (that is
            # not growth); "bounded" means no growth after this.
            warm = hostile_requests(port, time.time() + 600, 0.0, body, once=True)
            if warm["unexpected"]:
                raise SystemExit(
                    f"the corpus got unexpected answers during the warm-up: {warm['unexpected']}"
                )
            rss_start = memory_mb(server.pid, "VmRSS")
            start = time.time() + 0.5
            stop = start + args.seconds
            samples: list[float] = []
            sampling = threading.Event()

            def sample() -> None:
                while not sampling.is_set():
                    samples.append(memory_mb(server.pid, "VmRSS"))
                    time.sleep(0.5)

            sampler = threading.Thread(target=sample)
            sampler.start()
            hostile_outcome: dict = {}
            attacker = threading.Thread(
                target=lambda: hostile_outcome.update(hostile_requests(port, stop, args.hostile_every, body))
            )
            attacker.start()
            good = good_requests(port, body, rate, start, stop, args.workers)
            attacker.join()
            time.sleep(2)  # let the last requests' buffers go
            sampling.set()
            sampler.join()
            rss_end = memory_mb(server.pid, "VmRSS")
            rss_peak = memory_mb(server.pid, "VmHWM")
        finally:
            server.terminate()
            server.wait(30)
            log = server.stderr.read()

    good_errors = good["transport_errors"] + sum(n for status, n in good["statuses"].items() if status != 200)
    fives = (
        sum(n for status, n in good["statuses"].items() if status >= 500) + hostile_outcome["server_errors"]
    )
    tracebacks = log.count("Traceback")
    print("\n| measure | value |\n|---|---:|")
    rows = {
        "maximum (closed loop, requests/s)": f"{probe['rps']:.1f}",
        "soak rate (requests/s)": f"{rate:.1f}",
        "soak duration (s)": f"{args.seconds:g}",
        "good requests": f"{good['requests']}",
        "good requests failed": f"{good_errors}",
        "good p50 / p99 (ms, from schedule)": f"{good['p50_ms']:.1f} / {good['p99_ms']:.1f}",
        "hostile requests (+ abandoned uploads)": f"{hostile_outcome['sent']} (+ {hostile_outcome['abandoned']})",
        "hostile answered unexpectedly": f"{len(hostile_outcome['unexpected'])}",
        "5xx answers": f"{fives}",
        "tracebacks in the server log": f"{tracebacks}",
        "RSS after warm-up (one pass of the corpus) / end / peak (MB)": f"{rss_start:.0f} / {rss_end:.0f} / {rss_peak:.0f}",
        "RSS max sampled during the soak (MB)": f"{max(samples):.0f}",
        "RSS at 25 / 50 / 75 / 100% of the soak (MB)": " / ".join(
            f"{samples[min(len(samples) - 1, int(len(samples) * q))]:.0f}" for q in (0.25, 0.5, 0.75, 1.0)
        ),
    }
    for name, value in rows.items():
        print(f"| {name} | {value} |")
    for problem in hostile_outcome["unexpected"][:10]:
        print(f"unexpected: {problem}")
    bounded = rss_end - rss_start <= args.rss_slack_mb
    passed = (
        good_errors == 0 and fives == 0 and not hostile_outcome["unexpected"] and tracebacks == 0 and bounded
    )
    print(
        f"\n{'PASS' if passed else 'FAIL'} (memory growth {rss_end - rss_start:+.0f} MB, slack {args.rss_slack_mb:g} MB)"
    )
    print("environment:", json.dumps(environment()))
    print(f"load average at the end: {os.getloadavg()}")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
