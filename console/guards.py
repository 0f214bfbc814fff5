"""The ASGI layers every request and response of the console passes, outermost first.

- `SecurityHeaders`: every response, errors included, is ``no-store`` (a
  decrypted payload must never rest in a browser's or proxy's cache), with a
  content security policy that allows no inline script and no framing.
- `HostCheck`: a request whose ``Host`` is not one the console is served
  as is refused (400), so that a web page whose name an attacker points at
  127.0.0.1 (DNS rebinding) cannot reach it from the victim's browser.
- `BodyLimit`: a request body over the limit is refused (413) before any
  route reads it, whether it declared its length or streamed it. A route
  taking larger uploads (an audit export) is given its own limit; its body
  is counted as the route reads it, not held in memory first.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Collection, Mapping, MutableMapping
from typing import Any

from console.errors import UploadTooLarge

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"cache-control", b"no-store"),
    (b"pragma", b"no-cache"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
MAX_BODY = 1024 * 1024
"""Bytes a request body may have (1 MiB): payloads are far smaller (`schemas.registry`)."""


class SecurityHeaders:
    """Adds `HEADERS` to every HTTP response, replacing any the app set for the same names."""

    def __init__(self, app: ASGIApp) -> None:
        """Wrap `app`."""
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; rewrite the start of its response."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        names = {name for name, _ in HEADERS}

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message["headers"] = kept + list(HEADERS)
            await send(message)

        await self.app(scope, receive, with_headers)


async def _refuse(send: Send, status: int, reason: str, detail: str) -> None:
    body = json.dumps({"detail": {"reason": reason, "message": detail}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class HostCheck:
    """Refuses (400) a request whose Host header is none of `allowed` (``host[:port]``)."""

    def __init__(self, app: ASGIApp, allowed: Collection[str]) -> None:
        """Wrap `app`, serving only the names in `allowed` (compared without case)."""
        self.app = app
        self.allowed = frozenset(a.lower() for a in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse or pass on."""
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = ""
        for name, value in scope.get("headers", []):
            if name == b"host":
                host = value.decode("latin-1").lower()
                break
        if host not in self.allowed:
            await _refuse(
                send, 400, "host", "this console is not served under that name (Host header)"
            )
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses (413) a request whose body exceeds `limit` bytes, or its path's in `uploads`."""

    def __init__(
        self, app: ASGIApp, limit: int = MAX_BODY, uploads: Mapping[str, int] | None = None
    ) -> None:
        """Wrap `app`; `uploads` maps exact paths to their own, larger limits."""
        self.app = app
        self.limit = limit
        self.uploads = dict(uploads or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse a declared oversize body at once; count a streamed one as it arrives."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.uploads.get(scope.get("path", ""), self.limit)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                await _refuse(send, 413, "too_large", f"the body is over {limit} bytes")
                return
        if limit != self.limit:
            await self.app(scope, _counted(receive, limit), send)
            return
        # Read the whole body first (it is at most `limit`), so no route has
        # started work when it turns out to be too large.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message]), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await _refuse(send, 413, "too_large", f"the body is over {self.limit} bytes")
                return
            chunks.append(chunk)
            more = bool(message.get("more_body", False))
        body = b"".join(chunks)
        await self.app(scope, _replay([{"type": "http.request", "body": body}], receive), send)


def _counted(receive: Receive, limit: int) -> Receive:
    """`receive`, raising UploadTooLarge (answered 413) once the body passed `limit` bytes."""
    size = 0

    async def counting() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise UploadTooLarge(f"the upload is over {limit} bytes")
        return message

    return counting


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    """A receive that hands out `messages`, then waits on `then` (a disconnect) if given."""
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive
