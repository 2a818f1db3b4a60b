"""The hostile corpus: requests an attacker or a careless client sends to `capas serve`, generated
here (small, deterministic, nothing committed as binary) and shared by the tests and
benchmarks/serve_soak.py.

Each `Case` is one HTTP request and the statuses a healthy server may answer; none may be a 5xx.
The images are also used alone (`images()`) by the decoder tests. The slow-header client
(`slowloris`) is no `Case`: it holds a socket of its own.
"""

from __future__ import annotations

import base64
import io
import json
import select
import socket
import struct
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

BOUNDARY = "capashostileboundary"


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    expect: tuple[int, ...] = (200,)  # statuses a healthy server may answer


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def palette_png(side: int = 4000) -> bytes:
    """A ~20 KB palette PNG of side × side pixels: tiny on the wire, millions of pixels to decode."""
    image = Image.new("P", (side, side))
    image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    image.paste(Image.linear_gradient("L").resize((side, side // 2)).convert("P"), (0, 0))
    return _save(image, "PNG", optimize=False)


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A tiny PNG whose header claims width × height grey pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\x00" * (width + 1) * 64)  # a few rows of zeros; decoding would need 400 MB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def gradient(dtype, high: float, shape=(28, 28)) -> np.ndarray:
    """A left-to-right ramp from 0 to `high` (inclusive)."""
    ramp = np.linspace(0, high, shape[1], dtype=np.float64)
    return np.broadcast_to(ramp, shape).astype(dtype)


def png16() -> bytes:
    """A 16-bit grey PNG ramping over the full 0..65535."""
    values = gradient(np.uint16, 65535)
    return _save(Image.frombytes("I;16", (28, 28), values.astype("<u2").tobytes()), "PNG")


def tiff_int32() -> bytes:
    return _save(Image.fromarray(gradient(np.int32, 1_000_000)), "TIFF")


def tiff_float() -> bytes:
    return _save(Image.fromarray(gradient(np.float32, 1.0)), "TIFF")


def rgba_png() -> bytes:
    """Black pixels, left half opaque, right half fully transparent."""
    array = np.zeros((28, 28, 4), np.uint8)
    array[:, :14, 3] = 255
    return _save(Image.fromarray(array, "RGBA"), "PNG")


def exif_rotated_jpeg() -> bytes:
    """A 40 wide × 20 high JPEG whose EXIF says 'rotate 90° clockwise to view' (orientation 6)."""
    array = np.zeros((20, 40), np.uint8)
    array[:, :20] = 255  # left half white as stored: the top half once upright
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(Image.fromarray(array), "JPEG", exif=exif, quality=95)


def corrupt_exif_jpeg() -> bytes:
    """An 8×8 JPEG whose EXIF says it holds 50 tags and holds one: Pillow warns 'Corrupt EXIF data'."""
    exif = bytearray(Image.Exif().tobytes())  # b"Exif\0\0", the TIFF header, then IFD0 at byte 14
    struct.pack_into(">H", exif, 14, 50)
    return _save(Image.fromarray(np.zeros((8, 8), np.uint8)), "JPEG", exif=bytes(exif))


def truncated_png() -> bytes:
    return palette_png(64)[:200]


def tiff_undefined_offsets() -> bytes:
    """A TIFF whose StripOffsets tag says its type is UNDEFINED (7) instead of LONG: Pillow then
    reads the offsets as bytes and fails with a TypeError, not one of its usual decoding errors."""
    data = bytearray(_save(Image.linear_gradient("L").resize((28, 28)), "TIFF"))
    ifd = struct.unpack_from("<I", data, 4)[0]
    for entry in range(ifd + 2, ifd + 2 + 12 * struct.unpack_from("<H", data, ifd)[0], 12):
        if struct.unpack_from("<H", data, entry)[0] == 273:  # StripOffsets
            struct.pack_into("<H", data, entry + 2, 7)
    return bytes(data)


def blp_unknown_encoding() -> bytes:
    """A BLP texture (a format capas does not read) whose encoding byte is unknown to Pillow too."""
    data = bytearray(_save(Image.linear_gradient("L").resize((28, 28)).convert("P"), "BLP"))
    data[8] = 127
    return bytes(data)


def images() -> dict[str, bytes]:
    """Image files a decoder must handle (or refuse clearly), by name."""
    return {
        "palette-4000x4000.png": palette_png(),
        "bomb-20000x20000.png": bomb_png(),
        "grey16.png": png16(),
        "int32.tiff": tiff_int32(),
        "float32.tiff": tiff_float(),
        "alpha.png": rgba_png(),
        "exif-rotated.jpg": exif_rotated_jpeg(),
        "truncated.png": truncated_png(),
        "not-an-image.png": b"GIF89a? no: " + bytes(range(256)) * 4,
        "undefined-offsets.tiff": tiff_undefined_offsets(),
        "unknown-encoding.blp": blp_unknown_encoding(),
        "postscript.eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
    }


REFUSED = {  # the images() a decoder must refuse: what capas' message says about each
    "bomb-20000x20000.png": "pixels",
    "truncated.png": "damaged or truncated image",
    "not-an-image.png": "not a readable image in a format capas reads",
    "undefined-offsets.tiff": "damaged or truncated image",
    "unknown-encoding.blp": "not a readable image in a format capas reads",
    "postscript.eps": "not a readable image in a format capas reads",  # Pillow would run Ghostscript
}


def trickle(sock: socket.socket, data: bytes, every: float, size: int = 1) -> bool:
    """Send `data` `size` bytes at a time, `every` seconds apart; False as soon as the server answers
    or closes the connection (the rest is not sent), True once all of it is sent."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one piece per segment, no Nagle wait
    for i in range(0, len(data), size):
        if i and select.select([sock], [], [], every)[0]:  # readable: an answer, or the end
            return False
        sock.sendall(data[i : i + size])
    return True


def slowloris(sock: socket.socket, every: float, seconds: float) -> bool:
    """A slow-header client: a request line and a first header at once, then a byte of another
    header every `every` seconds, never the blank line that would end the head. False as soon as
    the server answers or closes; True if it still had not after `seconds`."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return trickle(sock, (b"X-Slow: " + b"a" * 10_000)[: int(seconds / every) + 1], every)


def abandon_upload(port: int, body: bytes, content_type: str, wait: float) -> None:
    """POST /predict with the head and half of `body`, wait `wait` seconds, then hang up."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[: len(body) // 2]
        )
        time.sleep(wait)


def multipart(*files: tuple[str, bytes]) -> tuple[bytes, dict[str, str]]:
    body = b"".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files
    )
    return body + f"--{BOUNDARY}--\r\n".encode(), {
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"
    }


def nested_json(depth: int = 100_000) -> bytes:
    return b"[" * depth + b"]" * depth


def cases(max_body_bytes: int = 10_000_000) -> list[Case]:
    """The hostile requests, for a server with its default limits (max_body_mb 10, 64 images)."""
    files = images()
    out = []
    for name, data in files.items():
        expect = (422,) if name in REFUSED else (200,)
        body, headers = multipart((name, data))
        out.append(Case(f"predict {name}", "POST", "/predict", body, headers, expect))
    body, headers = multipart(*[(f"p{i}.png", files["palette-4000x4000.png"]) for i in range(8)])
    out.append(
        Case(
            "predict 8 × 16 M pixels (128 M pixels in one request)", "POST", "/predict", body, headers, (413,)
        )
    )
    json_headers = {"Content-Type": "application/json"}
    out += [
        Case("predict nested JSON 100k deep", "POST", "/predict", nested_json(), json_headers, (400,)),
        Case("feedback nested JSON 100k deep", "POST", "/feedback", nested_json(), json_headers, (413,)),
        Case(
            "feedback with a 9 MB id",
            "POST",
            "/feedback",
            json.dumps({"id": "x" * 9_000_000, "label": 0}).encode(),
            json_headers,
            (413,),
        ),
        Case(
            "predict malformed base64",
            "POST",
            "/predict",
            json.dumps({"images": ["@@not base64@@"]}).encode(),
            json_headers,
            (400,),
        ),
        Case(
            "predict base64 bomb",
            "POST",
            "/predict",
            json.dumps({"images": [base64.b64encode(files["bomb-20000x20000.png"]).decode()]}).encode(),
            json_headers,
            (422,),
        ),
        Case(
            "predict wrong content type", "POST", "/predict", b"hello", {"Content-Type": "text/plain"}, (415,)
        ),
        Case("predict empty body", "POST", "/predict", b"", json_headers, (400,)),
        Case(
            "predict body over the limit",
            "POST",
            "/predict",
            b"0" * (max_body_bytes + 1),
            {"Content-Type": "application/octet-stream"},
            (413,),
        ),
        Case(
            "info under a rebinding Host",
            "GET",
            "/info",
            headers={"Host": "attacker.example:8000"},
            expect=(421,),
        ),
        Case("unknown path", "GET", "/../../etc/passwd", expect=(404,)),
    ]
    return out
