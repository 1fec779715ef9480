"""Issue 17, emulator: the metrics writer fails on a full pipe as Rust's ``LineWriter`` does.

``Metrics::write`` (firecracker ``src/vmm/src/logger/metrics.rs``) serialises
with one ``write_all`` per JSON token into a ``LineWriter<File>`` (std
``library/std/src/io/buffered/linewritershim.rs`` and ``bufwriter.rs``,
1 KiB), then ``write_all(b"\\n")``. The expected bytes below follow from
that code by hand, with a buffer small enough to follow.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from testbed.fc_emulator import open_emulator
from testbed.fc_emulator.line_writer import MetricsLineWriter
from tests.fc_helpers import counters_only, raw_request, short_root

LINE_START = b'{"utc_timestamp_ms":'
FLUSH = (
    b'PUT /actions HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n{"action_type":"FlushMetrics"}'
)


@pytest.fixture
def fc_root() -> Iterator[Path]:
    yield from short_root()


def written(tmp_path: Path, capacity: int, fail_after: int) -> tuple[bytes, list[bool]]:
    """Two lines through a writer whose ``fail_after+1``-th write(2) gets EAGAIN."""
    path = tmp_path / "m.ndjson"
    writer = MetricsLineWriter(str(path), capacity=capacity)
    try:
        writer.inject_eagain(after_writes=fail_after)
        first = writer.write_line(b'{"a":1,"bb":22}')
        second = writer.write_line(b'{"a":3,"bb":44}')
    finally:
        writer.close()
    return path.read_bytes(), [first.written, second.written]


def test_eagain_at_a_lines_end_keeps_line_and_newline_buffered_for_the_next_write(
    tmp_path: Path,
) -> None:
    # 15 bytes of JSON, then b"\n" buffered (it fits: 16) and flushed together: that
    # flush fails, the buffer keeps both; the next line's first token flushes them
    # first (flush_if_completed_line): the failed line arrives whole, then the next
    data, ok = written(tmp_path, capacity=16, fail_after=0)
    assert ok == [False, True]
    assert data == b'{"a":1,"bb":22}\n{"a":3,"bb":44}\n'


def test_eagain_with_the_buffer_exactly_full_at_the_newline_loses_that_newline(
    tmp_path: Path,
) -> None:
    # the JSON fills the 15-byte buffer exactly: b"\n" does not fit, BufWriter flushes
    # first, that fails, b"\n" is never buffered; the next line follows the old one
    data, ok = written(tmp_path, capacity=15, fail_after=0)
    assert ok == [False, True]
    assert data == b'{"a":1,"bb":22}{"a":3,"bb":44}\n'


def test_eagain_mid_line_stops_serialising_and_the_next_line_follows_its_prefix(
    tmp_path: Path,
) -> None:
    # 8 bytes buffered ('{"a":1,"'); the token 'bb' does not fit, the flush fails:
    # serialisation stops there, the prefix stays buffered and the next line follows it
    data, ok = written(tmp_path, capacity=8, fail_after=0)
    assert ok == [False, True]
    assert data == b'{"a":1,"{"a":3,"bb":44}\n'


class Reader:
    """A FIFO's reading end: the newline-ended records received so far."""

    def __init__(self, path: Path | None) -> None:
        assert path is not None
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.partial = b""

    def records(self, limit: int = 1 << 30) -> list[bytes]:
        """Read up to ``limit`` bytes (what is there if less); the records they ended."""
        while limit > 0:
            try:
                chunk = os.read(self.fd, min(limit, 65536))
            except BlockingIOError:
                break
            if not chunk:
                break
            self.partial += chunk
            limit -= len(chunk)
        *done, self.partial = self.partial.split(b"\n")
        return done

    def close(self) -> None:
        os.close(self.fd)


async def test_a_periodic_flush_failing_at_its_lines_end_reaches_the_reader_whole(
    fc_root: Path,
) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            spec = emulator.spec("vm")
            vm = await emulator.add(spec)
            assert vm.writer is not None
            reader = Reader(spec.metrics_path)
            try:
                reader.records()  # the boot line
                before = vm.writer.writes
                vm.write_metrics("measure")
                per_line = vm.writer.writes - before
                reader.records()
                vm.metrics.add("vcpu", "exit_io_in", 7)
                vm.inject_full_pipe(after_writes=per_line - 1)  # the line's last write(2)
                failed = vm.periodic_flush()
                assert failed is not None
                assert not failed.written
                vm.metrics.add("vcpu", "exit_io_in", 5)
                later = vm.periodic_flush()
                assert later is not None
                assert later.written
                got = [json.loads(record) for record in reader.records()]
            finally:
                reader.close()
    assert [line["vcpu"]["exit_io_in"] for line in got] == [7, 5]
    # Firecracker counted the failed write, though nothing was lost
    assert [line["logger"]["missed_metrics_count"] for line in got] == [0, 1]
    assert vm.lost_lines == 0
    assert vm.emitted_totals()["vcpu"]["exit_io_in"] == 12


async def test_flush_metrics_failing_at_its_lines_end_is_a_400_and_its_line_comes_later(
    fc_root: Path,
) -> None:
    with trio.fail_after(10):
        async with open_emulator(fc_root) as emulator:
            spec = emulator.spec("vm")
            vm = await emulator.add(spec)
            assert vm.writer is not None
            reader = Reader(spec.metrics_path)
            try:
                reader.records()
                before = vm.writer.writes
                vm.write_metrics("measure")
                per_line = vm.writer.writes - before
                reader.records()
                vm.inject_full_pipe(after_writes=per_line - 1)
                refused = await raw_request(spec.api_socket, FLUSH)
                assert reader.records() == []  # the line's head is in the pipe, its tail buffered
                assert reader.partial.startswith(LINE_START)
                accepted = await raw_request(spec.api_socket, FLUSH)
                got = [json.loads(record) for record in reader.records()]
            finally:
                reader.close()
    message = (
        b"Internal VMM error: Metrics error: Failed to write metrics: "
        b"Resource temporarily unavailable (os error 11)"
    )
    assert refused.endswith(b'{"fault_message":"' + message + b'"}')
    assert accepted.startswith(b"HTTP/1.1 204 \r\n")
    assert [line["put_api_requests"]["actions_count"] for line in got] == [1, 1]
    assert [line["logger"]["missed_metrics_count"] for line in got] == [0, 0]
    assert vm.lost_lines == 0


def recovered(record: bytes) -> dict[str, object]:
    """A record's line as a reader recovers it: from the last line start in it."""
    line: dict[str, object] = json.loads(record[record.rfind(LINE_START) :])
    return line


async def test_a_small_fifo_left_full_then_drained_loses_exactly_the_lines_counted_lost(
    fc_root: Path,
) -> None:
    rng = random.Random(17)
    with trio.fail_after(30):
        async with open_emulator(fc_root) as emulator:
            spec = emulator.spec("vm")
            vm = await emulator.add(spec)
            reader = Reader(spec.metrics_path)
            try:
                fcntl.fcntl(reader.fd, fcntl.F_SETPIPE_SZ, 16384)  # room for about two lines
                got = reader.records()
                for _ in range(60):  # nobody reads for a while, then the reader reads some
                    for _ in range(rng.randint(1, 4)):
                        vm.metrics.bump_everything(rng)
                        vm.periodic_flush()
                    got += reader.records(rng.randint(1, 20000))
                got += reader.records()
                # the last flush may have left a tail buffered: one more, read, sends it
                vm.periodic_flush()
                got += reader.records()
                errors = [outcome.error for _, outcome in vm.flushes]
                lost_lines = vm.lost_lines
                true, emitted = vm.true_counts(), vm.emitted_totals()
                lost = vm.lost_totals()
            finally:
                reader.close()
    assert "serde" in errors  # a line cut short
    assert "write" in errors  # a line whose newline waited
    lines = [recovered(record) for record in got]
    assert lost_lines == len(errors) - len(lines) > 0
    # Firecracker counted every failed periodic write (a line lost later loses that count)
    assert counters_only(true)[("logger", "missed_metrics_count")] == len(errors) - errors.count(
        None
    )
    # what the reader summed is what the emulator says its whole lines carried ...
    summed: dict[tuple[str, ...], int] = {}
    for line in lines:
        shaped = {key: value for key, value in line.items() if isinstance(value, dict)}
        for leaf, value in counters_only(shaped).items():
            summed[leaf] = summed.get(leaf, 0) + value
    assert summed == counters_only(emitted)
    # ... and what happened is that plus what the lost lines carried
    assert counters_only(true) == {
        leaf: value + counters_only(lost)[leaf] for leaf, value in counters_only(emitted).items()
    }
