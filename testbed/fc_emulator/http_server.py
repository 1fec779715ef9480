"""The API socket's HTTP/1.1, framed as micro-http frames it.

Responses (micro-http ``src/response.rs``): the status line has no reason
phrase (``HTTP/1.1 204 \\r\\n``); the headers are always
``Server: Firecracker API`` and ``Connection: keep-alive``; a response with
a body adds ``Content-Type`` and ``Content-Length``; a 204 has neither.
Requests are read by ``Content-Length``; connections are kept alive until
the client closes them. At most ten connections are served at once; an
eleventh is told so (micro-http ``src/server.rs``) and closed.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import trio

MAX_CONNECTIONS: Final = 10
#: micro-http src/server.rs SERVER_FULL_ERROR_MESSAGE: no space after 503, its own headers
SERVER_FULL: Final = (
    b"HTTP/1.1 503\r\nServer: Firecracker API\r\nConnection: close\r\n"
    b'Content-Length: 40\r\n\r\n{ "error": "Too many open connections" }'
)
MAX_HEADER_BYTES: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes | None = None

    def encode(self) -> bytes:
        head = f"HTTP/1.1 {self.status} \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n"
        if self.body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(self.body)}\r\n"
        return head.encode("ascii") + b"\r\n" + (self.body or b"")


def json_response(status: int, payload: dict[str, Any]) -> Response:
    """Firecracker serialises bodies with serde_json: compact, in field order."""
    return Response(status, json.dumps(payload, separators=(",", ":")).encode())


def fault(message: str) -> Response:
    return json_response(400, {"fault_message": message})


NO_CONTENT: Final = Response(204)

Handler = Callable[[Request], Awaitable[Response]]


class _Framer:
    """Requests out of a byte stream, by ``Content-Length``."""

    def __init__(self) -> None:
        self.data = b""

    def next_request(self) -> Request | None:
        end = self.data.find(b"\r\n\r\n")
        if end < 0:
            if len(self.data) > MAX_HEADER_BYTES:
                raise ValueError("request headers too long")
            return None
        head = self.data[:end].decode("latin-1").split("\r\n")
        method, path, _version = head[0].split(" ", 2)
        length = 0
        for header in head[1:]:
            name, _, value = header.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        start = end + 4
        if len(self.data) < start + length:
            return None
        body = self.data[start : start + length]
        self.data = self.data[start + length :]
        return Request(method, path, body)


async def serve_connection(stream: trio.SocketStream, handler: Handler) -> None:
    """Answer requests in order until the client closes (or sends garbage)."""
    framer = _Framer()
    async with stream:
        while True:
            try:
                request = framer.next_request()
            except ValueError:
                return
            if request is None:
                try:
                    data = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                framer.data += data
                continue
            response = await handler(request)
            try:
                await stream.send_all(response.encode())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return


async def serve_unix(
    listener: trio.socket.SocketType,
    handler: Handler,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on a listening Unix socket until cancelled."""
    open_connections = 0

    async def one(stream: trio.SocketStream) -> None:
        nonlocal open_connections
        try:
            await serve_connection(stream, handler)
        finally:
            open_connections -= 1

    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            sock, _ = await listener.accept()
            stream = trio.SocketStream(sock)
            if open_connections >= MAX_CONNECTIONS:
                # micro-http src/server.rs: ServerFull, one write of the message, then dropped
                try:
                    await stream.send_all(SERVER_FULL)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                await stream.aclose()
                continue
            open_connections += 1
            nursery.start_soon(one, stream)
