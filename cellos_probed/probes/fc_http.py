"""HTTP/1.1 as Firecracker's API speaks it: two fixed requests, one strict answer parser. Pure.

Firecracker's micro_http answers with a status line (``HTTP/1.1 204 \\r\\n``,
the reason may be empty), a few headers and, when there is a body, a
``Content-Length``; it never sends chunked bodies or interim answers. A
general client (h11) cost ~46 us an exchange, a tenth of a core at a
thousand VMs, for framing we can check in a few microseconds. Anything
outside that shape is refused with a :class:`ProbeParseError` that names
what was wrong, never the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

from cellos_probed.probes import ProbeIoError, ProbeParseError

#: Firecracker's answers are a few hundred bytes; anything past these is refused.
MAX_HEAD_BYTES: Final = 8 * 1024
MAX_RESPONSE_BYTES: Final = 64 * 1024
#: Room for Firecracker's fault messages in a probe_error, never more.
MAX_FAULT_CHARS: Final = 200

FLUSH_BODY: Final = b'{"action_type":"FlushMetrics"}'
FLUSH_REQUEST: Final = (
    b"PUT /actions HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
    b"Content-Type: application/json\r\nContent-Length: "
    + str(len(FLUSH_BODY)).encode()
    + b"\r\n\r\n"
    + FLUSH_BODY
)
INSTANCE_REQUEST: Final = b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"


@dataclass(frozen=True, slots=True)
class ApiResponse:
    status_code: int
    body: bytes
    #: False when the VMM said ``Connection: close`` (or spoke HTTP/1.0)
    keep_alive: bool = True

    def json(self) -> Any:
        return orjson.loads(self.body)


def _malformed(what: str) -> ProbeParseError:
    return ProbeParseError(f"malformed HTTP answer ({what})")


def parse_response(
    buffer: bytes | bytearray, *, at_eof: bool = False
) -> tuple[ApiResponse, int] | None:
    """The first whole answer in ``buffer`` and the bytes it used; None if more are needed.

    ``at_eof``: the VMM closed the connection, so nothing more will come:
    an answer cut short is an error, and one without ``Content-Length``
    ends here.
    """
    end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
    if end < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            raise ProbeParseError(f"answer head larger than {MAX_HEAD_BYTES} bytes")
        if at_eof:
            raise _malformed("connection closed in the middle of the head")
        return None
    lines = bytes(buffer[:end]).split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise _malformed("status line")
    code = rest[:3]
    if len(code) != 3 or not code.isdigit() or rest[3:4] not in (b"", b" "):
        raise _malformed("status code")
    status = int(code)
    if status < 200:
        raise _malformed("interim answer")
    keep_alive = version == b"HTTP/1.1"
    length: int | None = None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name.strip(b" \t") != name:
            raise _malformed("header line")
        lowered = name.lower()
        value = value.strip(b" \t")
        if lowered == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise _malformed("Content-Length")
            length = int(value)
        elif lowered == b"transfer-encoding":
            raise _malformed("a transfer encoding; Firecracker sends none")
        elif lowered == b"connection":
            tokens = {token.strip().lower() for token in value.split(b",")}
            if b"close" in tokens:
                keep_alive = False
            elif b"keep-alive" in tokens:
                keep_alive = True
    start = end + 4
    if status in (204, 304):
        if length:
            raise _malformed(f"a body on a {status}")
        length = 0
    elif length is None:  # no framing: the body runs to the end of the connection
        if not at_eof:
            if len(buffer) - start > MAX_RESPONSE_BYTES:
                raise ProbeParseError(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
            return None
        length = len(buffer) - start
        keep_alive = False
    if length > MAX_RESPONSE_BYTES:
        raise ProbeParseError(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
    total = start + length
    if len(buffer) < total:
        if at_eof:
            raise _malformed("connection closed in the middle of the body")
        return None
    return ApiResponse(status, bytes(buffer[start:total]), keep_alive), total


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


def parse_instance(response: ApiResponse) -> dict[str, Any]:
    """``GET /``'s answer: the instance's id, state and version."""
    if response.status_code != 200:
        raise ProbeIoError(f"GET / refused: {describe(response)}")
    try:
        info = response.json()
    except orjson.JSONDecodeError:
        raise ProbeParseError("GET / answered with a body that is not JSON") from None
    if not isinstance(info, dict):
        raise ProbeParseError("GET / answered with JSON that is not an object")
    return {key: info.get(key) for key in ("id", "state", "vmm_version")}
