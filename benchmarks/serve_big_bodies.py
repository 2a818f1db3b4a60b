"""/health latency while four clients send ~9 MB /predict requests back to back, as base64 JSON or multipart.

Usage: python benchmarks/serve_big_bodies.py PORT json|multipart, against `capas serve RUN --port PORT`.
"""

import base64
import io
import sys
import threading
import time

import httpx
import numpy as np
from PIL import Image

port = int(sys.argv[1])
mode = sys.argv[2]
url = f"http://127.0.0.1:{port}"
rng = np.random.default_rng(0)
buf = io.BytesIO()
Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, "PNG")
img = buf.getvalue()
n = 9_000_000 // (len(img) * 4 // 3)
b64 = base64.b64encode(img).decode()
body = {"images": [b64] * n}
print("images", n, "json MB %.1f" % (len(b64) * n / 1e6))
stop = [False]
codes = []


def client():
    with httpx.Client(base_url=url, timeout=60) as c:
        while not stop[0]:
            if mode == "json":
                r = c.post("/predict", json=body)
            else:
                r = c.post("/predict", files=[("file", (f"{i}.png", img, "image/png")) for i in range(n)])
            codes.append(r.status_code)


ths = [threading.Thread(target=client) for _ in range(4)]
[t.start() for t in ths]
time.sleep(1)
lat = []
with httpx.Client(base_url=url, timeout=60) as c:
    for _ in range(20):
        t = time.perf_counter()
        c.get("/health")
        lat.append(time.perf_counter() - t)
        time.sleep(0.1)
stop[0] = True
[t.join() for t in ths]
lat.sort()
print(
    mode,
    f"health median {lat[10] * 1000:.0f} ms max {lat[-1] * 1000:.0f} ms",
    "codes",
    set(codes),
    len(codes),
)
