"""ASGI middleware: request metrics, the bearer token or the Host check, the body size and time limits,
HEAD answered as GET.

Plain ASGI classes rather than `BaseHTTPMiddleware`, which adds a task and a memory stream per
request. The token is checked here and not in a route dependency because it must also cover what
no router owns: the mounted static files and the API docs.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import time
from collections.abc import Callable, Sequence
from urllib.parse import unquote, unquote_plus

from fastapi import HTTPException
from starlette.requests import cookie_parser
from starlette.routing import BaseRoute, Match
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


def route_label(scope: Scope, routes: Sequence[BaseRoute] = ()) -> str:
    """The route's path template (bounded cardinality), not the raw path. A request refused before
    routing (401, 413, 421) is labelled with the route its path matches among `routes`."""
    route = scope.get("route")
    if route is None:
        matching = (r for r in routes if getattr(r, "path", None) and r.matches(scope)[0] is not Match.NONE)
        route = next(matching, None)
    return getattr(route, "path", None) or "unmatched"


class RequestMetrics:
    """Counts requests by route, method and status and times them; `on_predict` gets /predict latencies.
    `routes` (the app's) label the requests that middleware answers before the router sees them."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        on_predict: Callable[[float], None],
        routes: Sequence[BaseRoute] = (),
    ):
        self.app, self.metrics, self.on_predict, self.routes = app, metrics, on_predict, routes

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
            route = route_label(scope, self.routes)
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            if route == "/predict" and status == 200:
                self.on_predict(seconds)


def _query_tokens(query: str) -> set[str]:
    """The `token` values of a query string, each read both ways a '+' is meant: a space (form
    encoding, as HTTP clients send it) and a '+' (typed into a browser's address bar, as base64 tokens
    have them)."""
    values = (
        value for name, _, value in (part.partition("=") for part in query.split("&")) if name == "token"
    )
    return {decoded for value in values for decoded in (unquote_plus(value), unquote(value))}


class TokenGuard:
    """Every route but /health needs the token: `Authorization: Bearer TOKEN`, the cookie, or `?token=`.

    A page opened as /?token=TOKEN sets an HttpOnly cookie, so its scripts, stylesheets and API
    calls are authorised without the token appearing in the page. The cookie holds a digest of the
    token, not the token: a cookie value cannot hold every character a token may have (a space or
    a ';' ended it), and the browser never stores the token itself.
    """

    def __init__(self, app: ASGIApp, token: str):
        self.app, self.token = app, token.encode()
        self.cookie = hmac.new(self.token, b"capas serve cookie", "sha256").hexdigest().encode()

    @staticmethod
    def _matches(candidate: str | None, secret: bytes) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode(), secret)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        # as UTF-8, the token's encoding here and in clients (curl sends a non-ASCII token's UTF-8 bytes)
        authorization = headers.get(b"authorization", b"").decode("utf-8", "replace")
        bearer = authorization[7:] if authorization[:7].lower() == "bearer " else None
        # Starlette's lenient parser: another site's cookie with a name Python's SimpleCookie calls
        # illegal ('a(b') made every request a 500
        cookie = cookie_parser(headers.get(b"cookie", b"").decode("latin-1")).get(COOKIE)
        query = _query_tokens(scope.get("query_string", b"").decode("latin-1"))
        if self._matches(bearer, self.token) or self._matches(cookie, self.cookie):
            return await self.app(scope, receive, send)
        if not any(self._matches(candidate, self.token) for candidate in query):
            return await send_json(
                send,
                401,
                "missing or wrong token: send the header 'Authorization: Bearer "
                "TOKEN' (or open the page once as /?token=TOKEN)",
                [(b"www-authenticate", b"Bearer")],
            )

        async def set_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                cookie_header = f"{COOKIE}={self.cookie.decode()}; HttpOnly; SameSite=Strict; Path=/"
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"set-cookie", cookie_header.encode())],
                }
            await send(message)

        await self.app(scope, receive, set_cookie)


def host_name(host: str) -> str:
    """The name in a Host header, without its port: "[::1]:8000" -> "::1", "a.example:80" -> "a.example"."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostGuard:
    """Without a token, only requests addressed to this server's own names are answered (else 421).

    A web page can make a browser send requests to 127.0.0.1 under its own domain name (DNS
    rebinding) and read the answers; such requests carry that domain in their Host header. Allowed:
    localhost, the loopback addresses, the bound host, and — when bound to every interface — any IP
    address (rebinding needs a domain name, so IP literals are safe).
    """

    def __init__(self, app: ASGIApp, bound: str):
        self.app = app
        self.allowed = {"localhost", "127.0.0.1", "::1", host_name(bound).lower()}
        self.any_ip = bound in ("0.0.0.0", "::", "")

    def allows(self, host: str) -> bool:
        name = host_name(host).lower().rstrip(".")
        return name in self.allowed or (self.any_ip and _is_ip(name))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host")
        if host is None or self.allows(host.decode("latin-1")):
            return await self.app(scope, receive, send)
        shown = host[:100].decode("latin-1")
        await send_json(
            send,
            421,
            f"Host header {shown!r} is not this server's name ({', '.join(sorted(self.allowed))}); "
            "serve with --token to accept requests under other names",
        )


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"body: larger than the {limit / 1e6:g} MB allowed (see --max-body-mb)")


class BodyTooSlow(HTTPException):
    def __init__(self, seconds: float):
        super().__init__(408, f"body: not received within {seconds:g} s (CAPAS_READ_TIMEOUT_S)")


class BodyLimit:
    """Refuses bodies over `limit` bytes (at once from Content-Length, or while streaming a chunked
    body) and bodies that take longer than `timeout` seconds to arrive (stalled or trickled uploads
    would otherwise hold their buffers and a connection forever).

    An answer that starts before the request's body is all in (these refusals, and any other answer
    given without reading the body: 401, 415, 421…) closes the connection: the rest of the body is never
    read, and uvicorn, discarding it as it came, let a client trickling it hold the connection past
    every timeout. Outside the token and Host checks, so that their answers close it too."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        received = 0
        # a body follows the head unless the head says there is none
        complete = b"transfer-encoding" not in headers and length in (None, b"0")

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start" and not complete:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        if length is not None and length.isdigit() and int(length) > self.limit:
            return await send_json(closing, 413, BodyTooLarge(self.limit).detail)
        deadline = asyncio.get_running_loop().time() + self.timeout

        async def counted() -> Message:
            nonlocal received, complete
            if complete:  # the body is in; what follows is the wait for a disconnect
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                raise BodyTooSlow(self.timeout) from None  # the app's handlers answer 408
            received += len(message.get("body", b""))
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            if received > self.limit:
                raise BodyTooLarge(self.limit)  # an HTTPException: the app's handlers answer 413
            return message

        await self.app(scope, counted, closing)


class HeadAsGet:
    """HEAD is answered wherever GET is, with GET's status and headers and no body (RFC 9110 §9.1:
    uptime checks and load balancers probe with it); FastAPI's GET routes answer it 405."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)
