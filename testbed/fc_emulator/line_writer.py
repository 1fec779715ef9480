"""Firecracker's metrics destination: ``LineWriter<File>`` over a non-blocking fd.

Firecracker opens the metrics path read + write + create + ``O_NONBLOCK``
(no append, no truncate; ``src/vmm/src/utils/mod.rs``) and ``Metrics::write``
(``src/vmm/src/logger/metrics.rs``) serialises one line with
``serde_json::to_writer``, one ``write_all`` per JSON token, into a
``std::io::LineWriter`` of 1 KiB, then ``write_all(b"\\n")``. This module
follows std's ``library/std/src/io/buffered/linewritershim.rs`` and
``bufwriter.rs`` token by token:

- a token that does not fit in the buffer flushes it first; a full pipe
  (``EAGAIN``) fails that flush: serialisation stops there, the buffer
  keeps what was not written, and the tokens after are never produced
  (``MetricsError::Serde``). The next line's tokens go in after that
  buffer: one torn line, the lost line's prefix then the next line whole;
- at the line's end ``b"\\n"`` goes into the buffer with the line's tail and
  the buffer is flushed; if that fails both stay buffered
  (``MetricsError::Write``), and the next line's first token flushes them
  first (``flush_if_completed_line``): the line arrives whole, only late.
  Only when the tail fills the buffer exactly must it be flushed before
  ``b"\\n"`` fits; if that fails the newline is never buffered and the next
  line is joined to this one.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final

#: std's LineWriter capacity (library/std/src/io/buffered/linewriter.rs)
LINE_WRITER_CAPACITY: Final = 1024

_EAGAIN_TEXT: Final = f"{os.strerror(errno.EAGAIN)} (os error {errno.EAGAIN})"


#: serde_json's short escapes (ser.rs, ``CharEscape``); other controls are ``\\u00XX``
_SHORT_ESCAPES: Final = {
    0x22: b'\\"', 0x5C: b"\\\\", 0x08: b"\\b", 0x0C: b"\\f",
    0x0A: b"\\n", 0x0D: b"\\r", 0x09: b"\\t",
}  # fmt: skip


def json_string_tokens(text: str) -> list[bytes]:
    """A JSON string as serde_json writes it (ser.rs ``format_escaped_str``): the
    quotes, each run between escapes and each escape are one ``write_all`` each."""
    data = text.encode()
    tokens = [b'"']
    start = 0
    for index, byte in enumerate(data):
        if byte >= 0x20 and byte not in (0x22, 0x5C):
            continue
        if start < index:
            tokens.append(data[start:index])
        tokens.append(_SHORT_ESCAPES.get(byte) or b"\\u%04x" % byte)
        start = index + 1
    if start < len(data):
        tokens.append(data[start:])
    tokens.append(b'"')
    return tokens


class Fate(Enum):
    """Where a line stands once ``Metrics::write`` returned."""

    #: its newline reached the file: a reader has the line
    DELIVERED = "delivered"
    #: whole, its newline still in the buffer: delivered by a later write, or never
    PENDING = "pending"
    #: it will never reach a reader as a line (cut short, or its newline lost)
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """What one ``Metrics::write`` did.

    ``written``: it returned ``Ok``. ``produced``: bytes of this line put
    into the writer before a failure (all of them when serialisation
    completed). ``error``: ``None``, ``"serde"`` (failed while serialising)
    or ``"write"`` (failed writing the newline). ``earlier_delivered``: the
    line pending before this call reached the file during it.
    """

    written: bool
    produced: int
    fate: Fate
    error: str | None = None
    earlier_delivered: bool = False

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
        #: the BufWriter's buffer: bytes taken but not yet written
        self.buffer = bytearray()
        self.writes = 0
        #: fault injection: let this many write(2) calls succeed, then fail ``_fail`` of them
        self._pass_before_fail = 0
        self._fail = 0

    @property
    def pending(self) -> bool:
        """A whole line waits in the buffer, its newline last."""
        return self.buffer.endswith(b"\n")

    def close(self) -> bool:
        """Close the fd; True if a pending line dies with it.

        ``METRICS`` is a static: at exit its buffer is never flushed.
        """
        dropped = self.pending
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.buffer.clear()
        return dropped

    def inject_eagain(self, *, after_writes: int = 0, failures: int = 1) -> None:
        """Make the pipe look full: ``failures`` write(2) calls fail after ``after_writes``."""
        self._pass_before_fail = after_writes
        self._fail = failures

    # -- std::io, as Firecracker's writer uses it ------------------------------------------

    def _write(self, data: bytes | bytearray | memoryview) -> int | None:
        """One write(2): bytes written, None on EAGAIN (a pipe write <= PIPE_BUF is all or none)."""
        if self._fail:
            if self._pass_before_fail:
                self._pass_before_fail -= 1
            else:
                self._fail -= 1
                return None
        try:
            done = os.write(self.fd, data)
        except BlockingIOError:
            return None
        self.writes += 1
        return done

    def _flush_buf(self) -> bool:
        """``BufWriter::flush_buf``: write until empty; on error the unwritten rest stays."""
        while self.buffer:
            done = self._write(self.buffer)
            if done is None:
                return False
            del self.buffer[:done]
        return True

    def _write_all_direct(self, data: bytes) -> bool:
        """``File::write_all``: a write too big for the buffer goes straight to the fd."""
        view = memoryview(data)
        while view:
            done = self._write(view)
            if done is None:
                return False
            view = view[done:]
        return True

    def _buffered_write_all(self, token: bytes) -> bool:
        """``BufWriter::write_all``: flush first if ``token`` does not fit; then buffer it."""
        if len(token) > self.capacity - len(self.buffer) and not self._flush_buf():
            return False
        if len(token) >= self.capacity:
            return self._write_all_direct(token)
        self.buffer += token
        return True

    def _write_body(self, body: bytes) -> int:
        """``body``'s tokens through :meth:`_buffered_write_all`, a buffer at a time; bytes taken.

        In ``body`` (objects of numbers under plain keys) every token is one
        of ``{ } , : "`` (serde_json's CompactFormatter writes each alone) or
        the run between two (a key, a number), so a token boundary is any
        position next to one of them. The buffer takes tokens while they
        fit, up to exactly full; the token that does not fit flushes it first.
        """
        position, end = 0, len(body)
        while position < end:
            limit = position + self.capacity - len(self.buffer)
            if limit >= end:
                self.buffer += body[position:]
                return end
            stop = limit + 1
            last = max(  # ~300 tokens a line, ~6 cuts: unrolled, this runs for every VM
                body.rfind(b'"', position, stop),
                body.rfind(b",", position, stop),
                body.rfind(b":", position, stop),
                body.rfind(b"{", position, stop),
                body.rfind(b"}", position, stop),
            )
            cut = limit if last == limit else last + 1
            if cut > position:
                self.buffer += body[position:cut]
                position = cut
            else:
                assert self.buffer, "a token of the body longer than the buffer"
            if not self._flush_buf():
                return position
        return end

    # -- Metrics::write ------------------------------------------------------------------------

    def write_line(self, body: bytes, head: Sequence[bytes] = ()) -> WriteOutcome:
        """One line: the ``head`` tokens one by one, then ``body`` (see :meth:`_write_body`).

        ``head`` holds what may contain any character (the ``id`` and
        ``properties`` strings), each token as serde_json writes it.
        """
        earlier = False
        if self.pending:
            # flush_if_completed_line, which the shim runs before every token: only
            # the first can find an earlier line's newline at the buffer's end
            if not self._flush_buf():
                return WriteOutcome(False, 0, Fate.LOST, "serde")
            earlier = True
        produced = 0
        for token in head:
            if not self._buffered_write_all(token):
                return WriteOutcome(False, produced, Fate.LOST, "serde", earlier)
            produced += len(token)
        taken = self._write_body(body)
        produced += taken
        if taken < len(body):
            return WriteOutcome(False, produced, Fate.LOST, "serde", earlier)
        # LineWriterShim::write_all(b"\n") with data buffered: the newline joins the
        # buffer, which is then flushed; a tail filling the buffer exactly is flushed
        # first, and if that fails the newline is never buffered
        if self.buffer:
            if not self._buffered_write_all(b"\n"):
                return WriteOutcome(False, produced, Fate.LOST, "write", earlier)
            if not self._flush_buf():
                return WriteOutcome(False, produced, Fate.PENDING, "write", earlier)
        elif not self._write_all_direct(b"\n"):  # (only after a token too big to buffer)
            return WriteOutcome(False, produced, Fate.LOST, "write", earlier)
        return WriteOutcome(True, produced, Fate.DELIVERED, None, earlier)
