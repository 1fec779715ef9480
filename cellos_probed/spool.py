"""The disk spool: readings that survive NATS outages longer than memory and restarts.

A directory of append-only segment files plus one ``acked`` cursor file::

    seg-00000001.spool   records: [crc32 u32][length u32][body]
    seg-00000002.spool   body:    [meta length u16][meta JSON][payload]
    acked                "<segment> <offset>": everything before it was confirmed

A record is *accepted* once it is written (it is then in the page cache and
survives ``kill -9`` of the daemon). The publisher reads from the ``acked``
cursor, sends, and moves the cursor on confirmation; fully confirmed
segments are deleted, so the spool does not grow. After a restart the
unconfirmed records are re-sent with the same bytes and ids (JetStream's
duplicate window, and past it a look-up of what the stream holds, make that
exactly-once: see ``nats_sink``). A torn record at the end of a
segment (a crash mid-write) is cut off. When ``max_bytes`` is exceeded the
oldest segment goes and a ``gap`` event names each (boot, cell, probe)
range it held; gap events themselves are carried forward, never dropped.

The I/O is done inline on the trio thread on purpose: appends of ~1 KB go
to the page cache in microseconds, while a worker-thread hop per event
would cost a hundred. A disk that stalls stalls the tick, and the systemd
watchdog sees it.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import orjson
import structlog

from cellos_probed.cloudevent import CloudEvent
from cellos_probed.events import gap_event
from cellos_probed.outbox import GapRange, GapTracker, OutboxEntry, entry_for

log = structlog.get_logger("cellos_probed.spool")
_HEADER = struct.Struct(">II")
_META_LEN = struct.Struct(">H")


@dataclass(slots=True)
class SpoolRecord:
    segment: int
    end: int  # offset just past this record
    entry: OutboxEntry
    boot_id: str


def _encode(entry: OutboxEntry, boot_id: str) -> bytes:
    meta = orjson.dumps(
        [
            entry.subject,
            entry.msg_id,
            entry.sequence,
            entry.probe_source,
            entry.attribution,
            boot_id,
        ]
    )
    body = _META_LEN.pack(len(meta)) + meta + entry.payload
    return _HEADER.pack(zlib.crc32(body), len(body)) + body


def _decode(body: bytes) -> tuple[OutboxEntry, str]:
    (meta_len,) = _META_LEN.unpack_from(body)
    subject, msg_id, sequence, probe, attribution, boot = orjson.loads(body[2 : 2 + meta_len])
    payload = body[2 + meta_len :]
    return OutboxEntry(0, subject, payload, msg_id, sequence, probe, attribution), boot


def read_segment(
    path: Path, start: int = 0, limit: int | None = None
) -> tuple[list[tuple[int, OutboxEntry, str]], int]:
    """Up to ``limit`` records from ``start``: ``[(end offset, entry, boot)]``, and their end."""
    records: list[tuple[int, OutboxEntry, str]] = []
    offset = start
    with path.open("rb") as handle:
        handle.seek(start)
        while limit is None or len(records) < limit:
            header = handle.read(_HEADER.size)
            if len(header) < _HEADER.size:
                break
            crc, length = _HEADER.unpack(header)
            body = handle.read(length)
            if len(body) < length or zlib.crc32(body) != crc:
                break  # torn by a crash mid-write: everything after is unusable
            offset += _HEADER.size + length
            entry, boot = _decode(body)
            records.append((offset, entry, boot))
    return records, offset


class SpoolOutbox:
    """The :class:`~cellos_probed.outbox.Outbox` interface, backed by a spool directory."""

    def __init__(
        self,
        directory: Path,
        subject_prefix: str,
        boot_id: str,
        *,
        max_bytes: int,
        segment_bytes: int | None = None,
    ) -> None:
        self.directory = directory
        self.subject_prefix = subject_prefix
        self.boot_id = boot_id
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or max(64 * 1024, min(8 << 20, max_bytes // 8))
        self.accepted = 0
        self.recovered = 0
        self._serials = itertools.count(1)
        self._window: deque[SpoolRecord] = deque()
        #: (segment, end) of the records of the batch being published: a segment
        #: dropped meanwhile may hold some, and they may still arrive
        self._in_flight: set[tuple[int, int]] = set()
        #: such records: declared lost only if their batch fails
        self._held: list[tuple[OutboxEntry, str]] = []
        self._gaps = GapTracker(self._seal)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._ack = self._read_ack()
        self._sizes: dict[int, int] = {}
        self._pending = 0
        self._recover()
        self._write_segment = max(self._sizes, default=0) + 1
        #: segments numbered below it were written by an earlier run, which may have
        #: sent (and the stream stored) their records without hearing so
        self._first_own_segment = self._write_segment
        self._write_fd = self._open_segment(self._write_segment)
        # where the next read starts: just past the newest record in the window
        self._read = self._ack

    # --- files -------------------------------------------------------------
    def _segment_path(self, number: int) -> Path:
        return self.directory / f"seg-{number:08d}.spool"

    def _open_segment(self, number: int) -> int:
        self._sizes[number] = 0
        return os.open(
            self._segment_path(number),
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
            0o600,
        )

    def _read_ack(self) -> tuple[int, int]:
        try:
            segment, offset = (self.directory / "acked").read_text().split()
            return int(segment), int(offset)
        except (OSError, ValueError):
            return (0, 0)

    def _write_ack(self) -> None:
        tmp = self.directory / "acked.tmp"
        tmp.write_text(f"{self._ack[0]} {self._ack[1]}\n")
        os.replace(tmp, self.directory / "acked")

    def _recover(self) -> None:
        """Find what a previous run left unconfirmed; cut torn tails; drop confirmed segments."""
        for path in sorted(self.directory.glob("seg-*.spool")):
            number = int(path.stem.removeprefix("seg-"))
            if number < self._ack[0]:
                path.unlink()
                continue
            start = self._ack[1] if number == self._ack[0] else 0
            records, end = read_segment(path, start)
            if end < path.stat().st_size:
                log.warning("spool: cut a torn record", segment=path.name, at=end)
                os.truncate(path, end)
            self._sizes[number] = end
            self._pending += len(records)
        self.recovered = self._pending
        if self._pending:
            log.info("spool: resending what was not confirmed before", records=self._pending)

    # --- the Outbox interface ------------------------------------------------
    def __len__(self) -> int:
        return self._pending

    @property
    def dropped(self) -> int:
        return sum(self._gaps.dropped_by_reason.values())

    @property
    def dropped_by_reason(self) -> dict[str, int]:
        return self._gaps.dropped_by_reason

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    def has_open_gaps(self) -> bool:
        return bool(self._gaps)

    def put(self, event: CloudEvent) -> list[GapRange]:
        entry = entry_for(event, self.subject_prefix, 0)
        self._append(entry, self.boot_id)
        self.accepted += 1
        return self._enforce_bound()

    def _append(self, entry: OutboxEntry, boot_id: str) -> None:
        if self._sizes[self._write_segment] >= self.segment_bytes:
            os.close(self._write_fd)
            self._write_segment += 1
            self._write_fd = self._open_segment(self._write_segment)
        record = _encode(entry, boot_id)
        os.write(self._write_fd, record)
        self._sizes[self._write_segment] += len(record)
        self._pending += 1

    def _enforce_bound(self) -> list[GapRange]:
        dropped: list[GapRange] = []
        while self.bytes > self.max_bytes and len(self._sizes) > 1:
            oldest = min(self._sizes)
            if oldest == self._write_segment:
                break
            dropped.extend(self._drop_segment(oldest))
        return dropped

    def _drop_segment(self, number: int) -> list[GapRange]:
        path = self._segment_path(number)
        start = self._ack[1] if number == self._ack[0] else 0
        records, _ = read_segment(path, start) if number >= self._ack[0] else ([], 0)
        path.unlink()
        del self._sizes[number]
        self._window = deque(r for r in self._window if r.segment != number)
        if self._ack[0] <= number:
            self._ack = (number + 1, 0)
            self._write_ack()
        if self._read[0] <= number:
            self._read = (number + 1, 0)
        self._pending -= len(records)
        lost = []
        for end, entry, boot in records:
            if (number, end) in self._in_flight:
                self._held.append((entry, boot))  # being published: see batch_failed
            else:
                lost.append((entry, boot))
        new_gaps = self._lose(lost)
        log.warning("spool full: dropped the oldest segment", segment=path.name,
                    records=len(records))  # fmt: skip
        return new_gaps

    def reject(self, entries: list[OutboxEntry], reason: str) -> None:
        """Count ``entries`` (of a batch about to be confirmed) as dropped for ``reason``."""
        boots = {record.entry.serial: record.boot_id for record in self._window}
        for entry in entries:
            self._gaps.drop(entry, reason, boots.get(entry.serial, self.boot_id))

    def batch_failed(self) -> list[GapRange]:
        """The batch in flight was not confirmed: it stays spooled, to be sent again,
        but for its records whose segment was dropped meanwhile: lost, declared."""
        self._in_flight.clear()
        held, self._held = self._held, []
        return self._lose(held)

    def _lose(self, records: list[tuple[OutboxEntry, str]]) -> list[GapRange]:
        """Records gone with a dropped segment: readings declared, gap events kept."""
        new_gaps = []
        for entry, boot in records:
            if entry.sequence is None:
                # a gap or agent event: gaps are carried forward, agent figures superseded
                if entry.subject.startswith(f"{self.subject_prefix}.gap."):
                    self._append(entry, boot)
                continue
            gap = self._gaps.drop(entry, "spool_full", boot)
            if gap is not None:
                new_gaps.append(gap)
        return new_gaps

    def seal_gaps(self) -> list[GapRange]:
        return self._gaps.seal_all()

    def _seal(self, gap: GapRange) -> None:
        event = gap_event(
            gap.attribution, gap.probe_source, gap.first, gap.last, gap.reason, gap.boot_id
        )
        entry = entry_for(event, self.subject_prefix, 0)
        self._append(entry, gap.boot_id)

    def batch(self, limit: int) -> list[OutboxEntry]:
        """The next records after the confirmed cursor, read ahead into memory; they
        are in flight until :meth:`confirm` or :meth:`batch_failed`."""
        while len(self._window) < limit and self._read_more(limit - len(self._window)):
            pass
        records = list(itertools.islice(self._window, limit))
        self._in_flight = {(record.segment, record.end) for record in records}
        return [record.entry for record in records]

    def _read_more(self, wanted: int) -> bool:
        segment, offset = self._read
        while segment <= self._write_segment:
            if segment in self._sizes and offset < self._sizes[segment]:
                records, end = read_segment(self._segment_path(segment), offset, wanted)
                for record_end, entry, boot in records:
                    entry.serial = next(self._serials)
                    if segment < self._first_own_segment:
                        entry.first_sent = -math.inf  # when, if ever, is unknown
                    self._window.append(SpoolRecord(segment, record_end, entry, boot))
                if records:
                    self._read = (segment, end)
                    return True
            segment, offset = segment + 1, 0
            if segment <= self._write_segment:
                self._read = (segment, 0)
        return False

    def confirm(self, batch: list[OutboxEntry]) -> None:
        self._in_flight.clear()
        self._held.clear()  # their segment was dropped, but they arrived
        serials = {entry.serial for entry in batch}
        while self._window and self._window[0].entry.serial in serials:
            record = self._window.popleft()
            self._ack = (record.segment, record.end)
            self._pending -= 1
        self._write_ack()
        for number in [n for n in self._sizes if n < self._ack[0]]:
            self._segment_path(number).unlink(missing_ok=True)
            del self._sizes[number]
        size = self._sizes[self._write_segment]
        all_confirmed = self._ack == (self._write_segment, size)
        if all_confirmed and size >= self.segment_bytes // 4:
            # everything is confirmed: start a fresh segment so the old one can go
            os.close(self._write_fd)
            old = self._write_segment
            self._write_segment += 1
            self._write_fd = self._open_segment(self._write_segment)
            self._segment_path(old).unlink(missing_ok=True)
            del self._sizes[old]
            self._ack = self._read = (self._write_segment, 0)
            self._write_ack()

    def close(self) -> None:
        os.close(self._write_fd)
