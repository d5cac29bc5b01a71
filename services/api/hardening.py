"""What both of elborl's HTTP services do alike (the status service and ``elborl
reward-serve``): security headers on every response, HEAD answered wherever GET is, request
methods and log text bounded to what cannot grow a metric or corrupt a terminal.

Pure ASGI middlewares (``HardenedHTTP``, ``LimitInFlight``), so they wrap any Starlette/FastAPI
app, including the standalone reward server's app that ``elborl reward-serve`` runs.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

SECURITY_HEADERS = {
    # The dashboard loads its script, style and grid PNGs (blob: URLs) from this origin only.
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' blob: data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def method_label(method: str) -> str:
    """A request method as a metric label: one of the known methods, else ``OTHER`` (a client
    sending made-up methods must not add label values without bound)."""
    return method if method in KNOWN_METHODS else "OTHER"


def printable(text: str, limit: int = 200) -> str:
    """``text`` safe for a log line: control characters (terminal escapes, newlines) escaped,
    at most ``limit`` characters."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return out if len(out) <= limit else out[:limit] + "..."


class HardenedHTTP:
    """ASGI middleware: HEAD served as GET without the body, security headers added."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = scope["method"] == "HEAD"
        if head:
            scope = {**scope, "method": "GET"}

        async def send_hardened(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {bytes(k).lower() for k, _ in message.get("headers", [])}
                extra = [
                    (k.encode(), v.encode())
                    for k, v in SECURITY_HEADERS.items()
                    if k.encode() not in present
                ]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}  # the headers (Content-Length too) stay GET's
            await send(message)

        await self.app(scope, receive, send_hardened)


class LimitInFlight:
    """ASGI middleware: at most ``limit`` HTTP requests in progress; one more is answered 503
    at once (``Retry-After: 1``) instead of queueing, so a burst costs bounded work and memory.
    Requests, not connections: idle keep-alive connections (a dashboard tab holds several) do
    not count."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit, self.in_flight = app, limit, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            await _busy(send, self.limit)
            return
        self.in_flight += 1  # one event loop: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


async def _busy(send: Send, limit: int) -> None:
    body = json.dumps({"detail": f"busy: {limit} requests in progress; retry shortly"}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})
