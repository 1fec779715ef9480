"""The Firecracker API socket: HTTP/1.1 over a Unix socket, with h11 and a trio stream.

h11 (python-hyper, the protocol engine under httpcore and httpx) does the
HTTP: framing, keep-alive, the reason-less status line Firecracker sends.
We skip httpx's client machinery on purpose: at a thousand VMs and two
requests per VM per tick it cost ~0.6 ms a request, more than a core; this
costs a fraction of that. One kept-alive connection per VM (Firecracker
serves at most ten); a connection the VMM closed (it restarted) is
reopened once. Answers are bounded; failures are typed probe errors.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import h11
import orjson
import trio

from cellos_probed.confine import EscapeError, open_beneath
from cellos_probed.probes import ProbeIoError, ProbeParseError, ProbeTimeoutError

#: A backstop only: the daemon cancels a read at ``probe_timeout_seconds``.
API_TIMEOUT_SECONDS: Final = 5.0
#: Firecracker's answers are a few hundred bytes; anything past this is refused.
MAX_RESPONSE_BYTES: Final = 64 * 1024
FLUSH_BODY: Final = b'{"action_type":"FlushMetrics"}'
#: Room for Firecracker's fault messages in a probe_error, never more.
MAX_FAULT_CHARS: Final = 200


@dataclass(frozen=True, slots=True)
class ApiResponse:
    status_code: int
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class _Retry(Exception):
    """The kept-alive connection was closed by the VMM before it answered."""


class FirecrackerApi:
    """The VMM's API socket; failures as typed probe errors."""

    def __init__(self, socket_path: str, root: Path | None = None) -> None:
        self.socket_path = socket_path
        self.root = root
        self._stream: trio.SocketStream | None = None
        self._conn: h11.Connection | None = None
        #: connections opened so far: a new one may mean a new VMM process
        self.connections = 0

    async def aclose(self) -> None:
        stream, self._stream, self._conn = self._stream, None, None
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _connect(self) -> tuple[trio.SocketStream, h11.Connection]:
        if self._stream is None or self._conn is None:
            try:
                self._stream = await self._open_confined()
            except EscapeError:
                raise ProbeIoError("API socket path goes through a symlink, not followed") from None
            except OSError as exc:
                raise ProbeIoError(_connect_message(exc)) from None
            self.connections += 1
            self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=16 * 1024)
        return self._stream, self._conn

    async def _open_confined(self) -> trio.SocketStream:
        """Connect without following a symlink anywhere below the jail root.

        connect() has no O_NOFOLLOW: the socket's directory is opened from the
        root refusing symlinks, and the socket reached through that open
        directory (``/proc/self/fd/N/name``), after checking the name itself is
        not a symlink.
        """
        if self.root is None:
            return await trio.open_unix_socket(self.socket_path)
        path = Path(self.socket_path)
        dir_fd = open_beneath(self.root, path.parent, os.O_RDONLY, directory=True)
        try:
            if stat.S_ISLNK(os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                raise EscapeError(errno.ELOOP, "the API socket is a symlink")
            return await trio.open_unix_socket(f"/proc/self/fd/{dir_fd}/{path.name}")
        finally:
            os.close(dir_fd)

    async def request(self, method: str, path: str, body: bytes | None = None) -> ApiResponse:
        what = f"{method} {path}"
        with trio.move_on_after(API_TIMEOUT_SECONDS) as scope:
            for attempt in (1, 2):
                try:
                    return await self._exchange(method, path, body)
                except _Retry as exc:
                    await self.aclose()
                    if attempt == 2:
                        raise ProbeIoError(
                            f"API socket closed the connection during {what}: {exc}"
                        ) from None
                except BaseException:
                    await self.aclose()  # never reuse a connection in an unknown state
                    raise
        assert scope.cancelled_caught
        raise ProbeTimeoutError(f"API socket did not answer {what}")

    async def _exchange(self, method: str, path: str, body: bytes | None) -> ApiResponse:
        stream, conn = await self._connect()
        headers = [("Host", "localhost"), ("Accept", "application/json")]
        if body is not None:
            headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        out = conn.send(h11.Request(method=method, target=path, headers=headers))
        if body is not None:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        try:
            await stream.send_all(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _Retry(_cause(exc)) from None
        status, chunks, size = 0, [], 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if status == 0 and conn.their_state is h11.ERROR and not size:
                    raise _Retry("connection closed") from None
                raise ProbeParseError(f"{method} {path}: malformed HTTP answer ({exc})") from None
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(16 * 1024)
                except trio.BrokenResourceError as exc:
                    raise _Retry(_cause(exc)) from None
                if not data and status == 0:
                    raise _Retry("connection closed")
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_RESPONSE_BYTES:
                    raise ProbeParseError(
                        f"{method} {path}: answer larger than {MAX_RESPONSE_BYTES} bytes"
                    )
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise _Retry("connection closed")
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()  # keep the connection for the next tick
        else:
            await self.aclose()
        return ApiResponse(status, b"".join(chunks))

    async def flush_metrics(self) -> None:
        response = await self.request("PUT", "/actions", FLUSH_BODY)
        if response.status_code == 204:
            return
        raise ProbeIoError(f"FlushMetrics refused: {describe(response)}")

    async def instance(self) -> dict[str, Any]:
        response = await self.request("GET", "/")
        if response.status_code != 200:
            raise ProbeIoError(f"GET / refused: {describe(response)}")
        try:
            info = response.json()
        except orjson.JSONDecodeError:
            raise ProbeParseError("GET / answered with a body that is not JSON") from None
        if not isinstance(info, dict):
            raise ProbeParseError("GET / answered with JSON that is not an object")
        return {key: info.get(key) for key in ("id", "state", "vmm_version")}


def _cause(exc: BaseException) -> str:
    """The innermost OS error's text, else the exception's class."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


def _connect_message(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "API socket does not exist: the VM is gone (or not started yet)"
    if exc.errno == errno.ECONNREFUSED:
        return "API socket refused the connection: the VM is gone (stale socket)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied on the API socket"
    return f"cannot connect to the API socket: {exc.strerror or type(exc).__name__}"


def describe(response: ApiResponse) -> str:
    """``400 <fault_message>``: Firecracker's own words, bounded and printable."""
    message = ""
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("fault_message"), str):
            message = body["fault_message"]
    except orjson.JSONDecodeError:
        pass
    message = "".join(ch if ch.isprintable() else "?" for ch in message[:MAX_FAULT_CHARS])
    return f"{response.status_code} {message}".rstrip()
