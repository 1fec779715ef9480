"""One VM's API socket: a non-blocking Unix stream connection, kept alive between ticks.

Driven by ``fc_exchange`` from a worker thread, many VMs at once; HTTP
framing is ``fc_http``'s. Firecracker serves at most ten connections;
we keep one per VM. Failures are typed probe errors naming the cause.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path
from typing import Final

from cellos_probed.confine import EscapeError, open_beneath
from cellos_probed.probes import ProbeIoError, ProbeParseError
from cellos_probed.probes.fc_http import (
    MAX_HEAD_BYTES,
    MAX_RESPONSE_BYTES,
    ApiResponse,
    parse_response,
)

RECEIVE_BYTES: Final = 16 * 1024


class ConnectionLost(Exception):
    """The kept-alive connection was closed by the VMM before it answered (retry once)."""


class ApiConnection:
    """The VMM's API socket. Not thread-safe: one round at a time uses it."""

    def __init__(self, socket_path: str, root: Path | None = None) -> None:
        self.socket_path = socket_path
        self.root = root
        self.sock: socket.socket | None = None
        self._buffer = bytearray()
        #: connections opened so far: a new one may mean a new VMM process
        self.connections = 0
        #: rounds in a row that ended before the VMM answered (the answer is still owed)
        self.owed = 0

    def fileno(self) -> int:
        assert self.sock is not None
        return self.sock.fileno()

    def close(self) -> None:
        sock, self.sock = self.sock, None
        self._buffer.clear()
        self.owed = 0
        if sock is not None:
            sock.close()

    def open(self) -> None:
        """Connect if not connected; ProbeIoError naming why not."""
        if self.sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            self._connect_confined(sock)
        except EscapeError:
            sock.close()
            raise ProbeIoError("API socket path goes through a symlink, not followed") from None
        except OSError as exc:
            sock.close()
            raise ProbeIoError(_connect_message(exc)) from None
        self.sock = sock
        self.connections += 1

    def _connect_confined(self, sock: socket.socket) -> None:
        """Connect without following a symlink anywhere below the jail root.

        connect() has no O_NOFOLLOW: the socket's directory is opened from the
        root refusing symlinks, and the socket reached through that open
        directory (``/proc/self/fd/N/name``), after checking the name itself is
        not a symlink.
        """
        if self.root is None:
            sock.connect(self.socket_path)
            return
        path = Path(self.socket_path)
        dir_fd = open_beneath(self.root, path.parent, os.O_RDONLY, directory=True)
        try:
            if stat.S_ISLNK(os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                raise EscapeError(errno.ELOOP, "the API socket is a symlink")
            sock.connect(f"/proc/self/fd/{dir_fd}/{path.name}")
        finally:
            os.close(dir_fd)

    def send(self, request: bytes) -> None:
        """Write a whole request (a few hundred bytes: it fits the socket's buffer)."""
        assert self.sock is not None
        try:
            sent = self.sock.send(request)
        except BlockingIOError:
            sent = 0
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ConnectionLost(exc.strerror) from None
        except OSError as exc:
            raise ProbeIoError(f"cannot write to the API socket: {exc.strerror}") from None
        if sent != len(request):
            raise ProbeIoError("API socket is not taking requests (its buffer is full)")

    def receive(self) -> ApiResponse | None:
        """Read what is there (one read); the answer once it is whole."""
        assert self.sock is not None
        try:
            data = self.sock.recv(RECEIVE_BYTES)
        except BlockingIOError:
            return None
        except ConnectionResetError:
            data = b""
        except OSError as exc:
            raise ProbeIoError(f"cannot read the API socket: {exc.strerror}") from None
        if not data:
            if not self._buffer:
                raise ConnectionLost("connection closed")
            parsed = parse_response(self._buffer, at_eof=True)
        else:
            self._buffer += data
            if len(self._buffer) > MAX_HEAD_BYTES + MAX_RESPONSE_BYTES:
                raise ProbeParseError(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
            parsed = parse_response(self._buffer)
        if parsed is None:
            return None
        response, used = parsed
        if used != len(self._buffer):
            raise ProbeParseError("the API socket sent more than one answer to one request")
        self._buffer.clear()
        return response


def _connect_message(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "API socket does not exist: the VM is gone (or not started yet)"
    if exc.errno == errno.ECONNREFUSED:
        return "API socket refused the connection: the VM is gone (stale socket)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied on the API socket"
    if exc.errno == errno.EAGAIN:
        return "API socket is not accepting connections (its backlog is full): the VMM is stuck"
    return f"cannot connect to the API socket: {exc.strerror or type(exc).__name__}"
