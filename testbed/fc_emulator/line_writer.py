"""Firecracker's metrics destination: ``LineWriter<File>`` over a non-blocking fd.

Firecracker opens the metrics path read + write + create + ``O_NONBLOCK``
(no append, no truncate) and writes through ``std::io::LineWriter``, whose
1 KiB buffer turns one ~6 KB line into several ``write(2)`` calls
(reference section 1). When a call fails with ``EAGAIN`` (a full pipe):

- serialisation stops at that point; the bytes already written stay in the
  pipe and the unwritten buffer stays in the ``LineWriter``, to go out ahead
  of the next line: one corrupt line, a prefix of the lost line followed by
  the complete next one;
- counters serialised before the failure have had their baselines advanced:
  their deltas are lost with the line.

``BufWriter`` flushes when the next small write (a key, a number, a brace)
would overflow its buffer, so chunks end on JSON token boundaries; the
model cuts them at the last structural character that fits.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Final

#: std's LineWriter capacity
LINE_WRITER_CAPACITY: Final = 1024

_EAGAIN_TEXT: Final = f"{os.strerror(errno.EAGAIN)} (os error {errno.EAGAIN})"


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """What one ``Metrics::write`` did.

    ``produced``: bytes of this line serialised before a failure (the whole
    line when it completed). ``error``: ``None``, ``"serde"`` (failed while
    serialising) or ``"write"`` (failed writing the final chunk or newline).
    """

    written: bool
    produced: int
    error: str | None = None

    @property
    def detail(self) -> str:
        """The text Firecracker puts after ``Metrics error: `` for this failure."""
        if self.error == "serde":
            return _EAGAIN_TEXT
        return f"Failed to write metrics: {_EAGAIN_TEXT}"


class MetricsLineWriter:
    """The open metrics path, written as Firecracker's ``FcLineWriter`` writes it."""

    def __init__(self, path: str, *, capacity: int = LINE_WRITER_CAPACITY) -> None:
        self.path = path
        self.capacity = capacity
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CREAT | os.O_CLOEXEC, 0o644)
        #: the LineWriter's buffer: bytes serialised but not yet written
        self.buffer = b""
        self.writes = 0
        #: fault injection: let this many write(2) calls succeed, then fail ``_fail`` of them
        self._pass_before_fail = 0
        self._fail = 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def inject_eagain(self, *, after_writes: int = 0, failures: int = 1) -> None:
        """Make the pipe look full: ``failures`` write(2) calls fail after ``after_writes``."""
        self._pass_before_fail = after_writes
        self._fail = failures

    def _write(self, data: bytes) -> bool:
        """One write(2); False on EAGAIN. A pipe write of <= PIPE_BUF bytes is all or nothing."""
        if self._fail:
            if self._pass_before_fail:
                self._pass_before_fail -= 1
            else:
                self._fail -= 1
                return False
        try:
            done = os.write(self.fd, data)
        except BlockingIOError:
            return False
        self.writes += 1
        if done != len(data):  # only a regular file on a full disk; keep the rest buffered
            self.buffer = data[done:]
            return False
        return True

    def _flush_buffer(self) -> bool:
        if not self.buffer:
            return True
        if not self._write(self.buffer):
            return False
        self.buffer = b""
        return True

    def write_line(self, line: bytes) -> WriteOutcome:
        """Serialise ``line`` (compact JSON, no newline) through the buffer, then ``\\n``."""
        position = 0
        while position < len(line):
            room = self.capacity - len(self.buffer)
            rest = len(line) - position
            if rest <= room:
                self.buffer += line[position:]
                position = len(line)
                break
            window = line[position : position + room]
            cut = max(window.rfind(b","), window.rfind(b"{"), window.rfind(b":"))
            cut = max(cut, window.rfind(b"}")) + 1
            if cut == 0 and not self.buffer:  # one token longer than the buffer
                cut = room
            self.buffer += window[:cut]
            position += cut
            if not self._flush_buffer():
                return WriteOutcome(False, position, "serde")
        if not self._flush_buffer():
            return WriteOutcome(False, position, "write")
        if not self._write(b"\n"):
            return WriteOutcome(False, position, "write")
        return WriteOutcome(True, position)
