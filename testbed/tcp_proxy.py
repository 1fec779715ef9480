"""A loopback TCP proxy between a NATS client and its server that can lose the server's replies.

Bytes from the client pass to the server untouched. Bytes from the server are
read as NATS protocol frames: ``INFO``, ``PING``, ``PONG``, ``+OK`` and ``-ERR``
are one line each, ``MSG`` and ``HMSG`` a line and a payload whose size the line
gives. While :attr:`ReplyDroppingProxy.dropping` is set, a ``MSG`` or ``HMSG``
on a subject under ``drop_prefix`` (the client's reply inbox: JetStream
acknowledgements and API replies) is dropped and counted; everything else
passes, so the connection stays up and the server stores what the client
publishes while the client never hears so.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

#: the server's messages to a client carry their payload size as the line's last token
_MESSAGE_OPS = (b"MSG", b"HMSG")


def split_frames(buffer: bytearray) -> list[tuple[bytes, bytes | None]]:
    """Take the whole frames off the front of ``buffer``: ``(frame, subject)``, the
    subject for ``MSG``/``HMSG`` and ``None`` for the one-line operations."""
    frames: list[tuple[bytes, bytes | None]] = []
    while True:
        end = buffer.find(b"\r\n")
        if end < 0:
            return frames
        line = bytes(buffer[:end])
        tokens = line.split()
        if tokens and tokens[0].upper() in _MESSAGE_OPS:
            size = end + 2 + int(tokens[-1]) + 2
            if len(buffer) < size:
                return frames  # the payload is still on its way
            frames.append((bytes(buffer[:size]), tokens[1]))
        else:
            size = end + 2
            frames.append((bytes(buffer[:size]), None))
        del buffer[:size]


class ReplyDroppingProxy:
    """Listens on an ephemeral loopback port; each client gets its own server connection."""

    def __init__(self, upstream_port: int, *, drop_prefix: bytes = b"_INBOX.") -> None:
        self.upstream_port = upstream_port
        self.drop_prefix = drop_prefix
        self.port = 0
        self.dropping = False
        #: replies dropped so far
        self.dropped = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept clients until cancelled; started (and :attr:`port` known) once listening."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._relay, listeners)
            task_status.started()

    async def _relay(self, client: trio.SocketStream) -> None:
        try:
            server = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        except OSError:
            await client.aclose()  # no server: the client sees its connection refused, late
            return
        async with client, server, trio.open_nursery() as nursery:

            async def upstream() -> None:
                await _pump(client, server, None)
                nursery.cancel_scope.cancel()

            async def downstream() -> None:
                await _pump(server, client, self._keep)
                nursery.cancel_scope.cancel()

            nursery.start_soon(upstream)
            nursery.start_soon(downstream)

    def _keep(self, subject: bytes | None) -> bool:
        if self.dropping and subject is not None and subject.startswith(self.drop_prefix):
            self.dropped += 1
            return False
        return True


async def _pump(
    source: trio.SocketStream,
    sink: trio.SocketStream,
    keep: Callable[[bytes | None], bool] | None,
) -> None:
    """Copy ``source`` to ``sink`` until either end closes; with ``keep`` (a frame
    filter), frame by frame."""
    buffer = bytearray()
    try:
        while data := await source.receive_some(65536):
            if keep is None:
                await sink.send_all(data)
                continue
            buffer += data
            kept = b"".join(frame for frame, subject in split_frames(buffer) if keep(subject))
            if kept:
                await sink.send_all(kept)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
