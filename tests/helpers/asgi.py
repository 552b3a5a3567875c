"""Calling an ASGI app in-process, with control over the client's side of the connection
(when it disconnects, whether sending fails) and the arrival time of each body chunk."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reply:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[tuple[float, bytes]] = field(default_factory=list)  # (arrival time, bytes)

    @property
    def body(self) -> bytes:
        return b"".join(c for _, c in self.chunks)

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[str]:
        """The `data:` payloads of a server-sent-event stream."""
        lines = self.body.decode().splitlines()
        return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


async def call(
    app: Any,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    disconnect: asyncio.Event | None = None,
    on_send: Callable[[dict], Awaitable[None]] | None = None,
) -> Reply:
    """One request. `disconnect`: the client goes away once it is set (then, as with uvicorn,
    what the app sends is dropped); `on_send` sees every message the app sends."""
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    hdrs = {"content-type": "application/json", **(headers or {})}
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},  # as uvicorn's http scope
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "headers": [(k.lower().encode(), v.encode()) for k, v in hdrs.items()],
    }
    sent = False
    gone = disconnect or asyncio.Event()
    reply = Reply()

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": data, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if on_send is not None:
            await on_send(message)  # it may wait: a client slow to read
        if gone.is_set():
            return
        if message["type"] == "http.response.start":
            reply.status = message["status"]
            reply.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            reply.chunks.append((time.perf_counter(), message.get("body", b"")))

    await app(scope, receive, send)
    return reply


@contextlib.asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[Any]:
    """The app's startup and shutdown around the block."""
    async with app.router.lifespan_context(app):
        yield app
