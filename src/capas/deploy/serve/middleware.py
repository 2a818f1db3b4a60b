"""ASGI middleware: request metrics, the bearer token, the body size limit.

Plain ASGI classes rather than `BaseHTTPMiddleware`, which adds a task and a memory stream per
request. The token is checked here and not in a route dependency because it must also cover what
no router owns: the mounted static files and the API docs.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from capas.deploy.serve.monitor import Metrics

COOKIE = "capas_token"
OPEN_PATHS = ("/health",)  # liveness probes carry no credentials


async def send_json(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def route_label(scope: Scope) -> str:
    """The route's path template (bounded cardinality), not the raw path."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class RequestMetrics:
    """Counts requests by route, method and status and times them; `on_predict` gets /predict latencies."""

    def __init__(self, app: ASGIApp, metrics: Metrics, on_predict: Callable[[float], None]):
        self.app, self.metrics, self.on_predict = app, metrics, on_predict

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # if the app raises before answering, the server error handler answers 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            seconds = time.perf_counter() - started
            route = route_label(scope)
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            if route == "/predict" and status == 200:
                self.on_predict(seconds)


class TokenGuard:
    """Every route but /health needs the token: `Authorization: Bearer TOKEN`, the cookie, or `?token=`.

    A page opened as /?token=TOKEN sets an HttpOnly cookie, so its scripts, stylesheets and API
    calls are authorised without the token appearing in the page.
    """

    def __init__(self, app: ASGIApp, token: str):
        self.app, self.token = app, token.encode()

    def _matches(self, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode(), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        bearer = authorization[7:] if authorization[:7].lower() == "bearer " else None
        cookie = SimpleCookie(headers.get(b"cookie", b"").decode("latin-1"))
        query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [None])[0]
        if self._matches(bearer) or (COOKIE in cookie and self._matches(cookie[COOKIE].value)):
            return await self.app(scope, receive, send)
        if not self._matches(query):
            return await send_json(
                send,
                401,
                "missing or wrong token: send the header 'Authorization: Bearer "
                "TOKEN' (or open the page once as /?token=TOKEN)",
                [(b"www-authenticate", b"Bearer")],
            )

        async def set_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                cookie_header = f"{COOKIE}={self.token.decode()}; HttpOnly; SameSite=Strict; Path=/"
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"set-cookie", cookie_header.encode())],
                }
            await send(message)

        await self.app(scope, receive, set_cookie)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"body: larger than the {limit / 1e6:g} MB allowed (see --max-body-mb)")


class BodyLimit:
    """Refuses bodies over `limit` bytes: at once from Content-Length, or while streaming a chunked body."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await send_json(send, 413, BodyTooLarge(self.limit).detail)
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(self.limit)  # an HTTPException: the app's handlers answer 413
            return message

        await self.app(scope, counted, send)
